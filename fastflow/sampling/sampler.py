"""``sample``: generate molecules with a SemlaFlow-style generator (upstream ``MolecularCFM._generate``).

Per batch: prior at t = 0 → for k = 0 … steps−1: one call of the step function at t_k, Euler / discrete-flow
step to t_{k+1} → the **last prediction** x̂₁ (× coord_scale) with its softmaxed types, bonds and charges is
the sample.

Batch independence: every random number is keyed by (seed, molecule index in the request, step, element)
(:mod:`fastflow.rng`) and padding is zero and masked out, so a molecule's sample depends only on
(seed, its index, its size) — not on batch-mates, batch size or padding — given a model whose real-atom
outputs ignore padding, as Semla's do. Coordinates then agree across batchings up to fp32 rounding (matmul
blocking differs with shapes), and discrete states are identical unless a transition probability lies within
rounding of the drawn uniform.
"""

from __future__ import annotations

import itertools
import math
import numbers
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from fastflow import rng
from fastflow.chem import MolGraph
from fastflow.chem.vocab import QM9_COORD_STD
from fastflow.sampling.integrator import integrate_step
from fastflow.sampling.prior import sample_prior
from fastflow.sampling.schedule import time_grid
from fastflow.sampling.step import FlowState, Prediction, SelfCond, StepFn, model_step

# Atom counts (hydrogens included) of QM9's 100k training molecules, the split used by EDM and SemlaFlow
# (from EDM's qm9_with_h dataset config).
QM9_SIZE_COUNTS: dict[int, int] = {
    3: 1,
    4: 4,
    5: 5,
    6: 9,
    7: 16,
    8: 49,
    9: 124,
    10: 362,
    11: 807,
    12: 1689,
    13: 3060,
    14: 5136,
    15: 7796,
    16: 10644,
    17: 13025,
    18: 13364,
    19: 13832,
    20: 9482,
    21: 9970,
    22: 3393,
    23: 4848,
    24: 539,
    25: 1506,
    26: 48,
    27: 266,
    29: 25,
}

SizeDistribution = Mapping[int, float] | torch.Tensor | Sequence[float]


@dataclass
class SampleResult:
    """Samples in request order. Per molecule i with n_i atoms: coords ``[n_i,3]`` Å and the last prediction's
    probabilities — types ``[n_i,V]``, bonds ``[n_i,n_i,K]``, charges ``[n_i,7]`` (CPU tensors); ``graphs``
    their argmax, ``molecules`` the RDKit molecules (None where building or sanitising fails).

    stats: nfe (network evaluations, counted per molecule), steps, n_molecules, n_batches, sampling_seconds
    (prior to last prediction), wall_seconds (including RDKit conversion), molecules_per_second (from
    sampling_seconds).
    """

    graphs: list
    molecules: list
    coords: list[torch.Tensor]
    type_probs: list[torch.Tensor]
    bond_probs: list[torch.Tensor]
    charge_probs: list[torch.Tensor]
    sizes: list[int]
    stats: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.sizes)


def size_counts(distribution: SizeDistribution) -> torch.Tensor:
    """Float64 counts ``[max_n + 1]`` indexed by atom count, from ``{n_atoms: count}`` or a count sequence."""
    if isinstance(distribution, Mapping):
        if any(int(n) < 0 for n in distribution):
            raise ValueError("size_distribution keys must be atom counts >= 0")
        counts = torch.zeros(max(int(n) for n in distribution) + 1, dtype=torch.float64)
        for n, count in distribution.items():
            counts[int(n)] = float(count)
    else:
        counts = torch.as_tensor(distribution, dtype=torch.float64).flatten().clone()
    if counts.numel() == 0 or not torch.isfinite(counts).all() or (counts < 0).any():
        raise ValueError("size_distribution must hold finite, non-negative counts")
    counts[0] = 0.0  # a molecule has at least one atom
    if counts.sum() <= 0:
        raise ValueError("size_distribution has no mass on atom counts >= 1")
    return counts


def draw_sizes(
    n_molecules: int,
    seed: int,
    distribution: SizeDistribution = QM9_SIZE_COUNTS,
    indices: torch.Tensor | None = None,
) -> torch.Tensor:
    """Atom counts ``[n_molecules]`` drawn from a histogram; molecule i's size depends only on (seed, i).

    ``indices`` (``[n_molecules]``, default ``0 … n_molecules−1``): the request indices to draw for, so a shard
    of a request gets the same sizes as the whole request.
    """
    counts = size_counts(distribution)
    keys = rng.molecule_keys(seed, torch.arange(n_molecules) if indices is None else indices)
    u = rng.uniform(rng.combine(keys, rng.SIZE)).to(torch.float64)
    cdf = counts.cumsum(0)
    return torch.searchsorted(cdf, u * cdf[-1], right=True).clamp(max=len(counts) - 1)


def plan_batches(
    sizes: torch.Tensor, batch_size: int, max_batch_atoms: int | None = None
) -> list[torch.Tensor]:
    """Split molecule indices into batches of similar size (sorted by atom count, so padding is small).

    Each batch holds at most ``batch_size`` molecules and, if given, at most ``max_batch_atoms`` padded atoms
    (molecules × largest size); batch counts are balanced (⌈n / ⌈n / batch_size⌉⌉ each, not full batches and
    a small rest).
    """
    order = torch.argsort(sizes, stable=True)
    per_batch = math.ceil(len(sizes) / math.ceil(len(sizes) / batch_size))
    batches, current = [], []
    for i in order.tolist():
        too_many = len(current) == per_batch
        too_big = max_batch_atoms is not None and (len(current) + 1) * int(sizes[i]) > max_batch_atoms
        if current and (too_many or too_big):
            batches.append(torch.tensor(current))
            current = []
        current.append(i)
    batches.append(torch.tensor(current))
    return batches


def sample(
    model: nn.Module,
    n_molecules: int,
    steps: int = 100,
    schedule: str = "log",
    seed: int = 0,
    sizes: Sequence[int] | torch.Tensor | None = None,
    size_distribution: SizeDistribution | None = None,
    batch_size: int = 256,
    max_batch_atoms: int | None = None,
    device: str | torch.device | None = None,
    coord_scale: float | None = None,
    noise_level: float = 1.0,
    scale_ot: bool = False,
    progress: bool | None = None,
    step_fn: StepFn = model_step,
    indices: Sequence[int] | torch.Tensor | None = None,
    kernels: str | None = None,
) -> SampleResult:
    """Sample ``n_molecules`` molecules from a SemlaFlow-style generator.

    Args:
        model: called as ``model(coords, cat(t, atomics), edge_feats=, cond_coords=, cond_atomics=,
            cond_bonds=, atom_mask=)`` through ``step_fn``; ``model.config.self_cond`` (default False) turns
            on self-conditioning and ``model.config.max_atoms`` bounds the sizes.
        steps, schedule: number of solver steps and time grid (``"log"`` or ``"linear"``, :func:`time_grid`).
        seed: molecule i's sample depends only on (seed, i, its size), never on batch-mates or batching.
        sizes: atom counts, one per molecule; otherwise drawn from ``size_distribution`` ({n_atoms: count} or
            counts indexed by atom count), by default QM9's training-set histogram :data:`QM9_SIZE_COUNTS`.
        batch_size, max_batch_atoms: at most this many molecules / padded atoms per forward (see
            :func:`plan_batches`).
        device: where to sample; defaults to the model's device and must match it.
        coord_scale: Å per model unit; defaults to ``model.config.coord_std``, else the QM9 std.
        noise_level: η of the discrete flow (upstream ``cat_sampling_noise_level``).
        scale_ot: multiply prior coordinates by 0.2·log(n + 1) (per molecule, see :mod:`.prior`).
        progress: tqdm bar; default on when stderr is a terminal.
        step_fn: ``step_fn(model, state, cond) -> Prediction``, how a step calls the network (see :mod:`.step`).
        indices: the request indices of the ``n_molecules`` molecules (distinct integers >= 0; default
            ``0 … n_molecules−1``). Molecule j is sampled as molecule ``indices[j]`` of a larger request — its
            size, prior and every draw keyed by that index — so shards of a request sampled apart equal the
            whole request sampled at once (up to fp32 rounding). Results stay in the order of ``indices``.
        kernels: backend of the solver step's fused op (:mod:`fastflow.ops.discrete_flow_step`): "auto"
            (default: C++ on CPU), "cpp" or "reference". The network's kernels are ``patch_model``'s.
    """
    started = time.perf_counter()
    config = getattr(model, "config", None)
    self_cond = bool(getattr(config, "self_cond", False))
    coord_scale = float(getattr(config, "coord_std", QM9_COORD_STD) if coord_scale is None else coord_scale)
    grid = time_grid(schedule, steps)
    if not _is_int(n_molecules) or n_molecules < 1:
        raise ValueError(f"n_molecules must be an integer >= 1, got {n_molecules!r}")
    if not _is_int(batch_size) or batch_size < 1:
        raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
    check_seed(seed)
    if not isinstance(noise_level, numbers.Real) or not math.isfinite(noise_level) or noise_level < 0:
        raise ValueError(f"noise_level must be a finite number >= 0, got {noise_level!r}")
    if not math.isfinite(coord_scale) or coord_scale <= 0:
        raise ValueError(f"coord_scale must be a finite number > 0 (Å per model unit), got {coord_scale!r}")
    indices = _check_indices(n_molecules, indices)
    max_atoms = getattr(config, "max_atoms", None)
    sizes = _check_sizes(n_molecules, seed, sizes, size_distribution, max_atoms, indices)
    if max_batch_atoms is not None and max_batch_atoms < int(sizes.max()):
        raise ValueError(
            f"max_batch_atoms={max_batch_atoms} is smaller than the largest molecule "
            f"({int(sizes.max())} atoms)"
        )
    device = _check_device(model, device)
    batches = plan_batches(sizes, batch_size, max_batch_atoms)
    keys = rng.molecule_keys(seed, indices)

    outputs: list = [None] * n_molecules
    nfe = 0
    show = sys.stderr.isatty() if progress is None else progress
    was_training = model.training
    model.eval()
    try:
        bar = tqdm(total=len(batches) * steps, unit="step", desc="sampling", disable=not show)
        with torch.no_grad(), bar:
            for index in batches:
                batch_out, batch_nfe = _sample_batch(
                    model,
                    step_fn,
                    indices[index].to(device),
                    sizes[index].to(device),
                    keys[index].to(device),
                    grid,
                    self_cond,
                    noise_level,
                    scale_ot,
                    coord_scale,
                    bar,
                    kernels,
                )
                nfe += batch_nfe
                for i, out in zip(index.tolist(), batch_out):
                    outputs[i] = out
    finally:
        model.train(was_training)
    sampling_seconds = time.perf_counter() - started

    coords, type_probs, bond_probs, charge_probs = (list(column) for column in zip(*outputs))
    graphs = [MolGraph.from_predictions(*out) for out in outputs]
    molecules = [graph.to_rdkit(sanitize=True) for graph in graphs]
    stats = {
        "nfe": nfe,
        "steps": steps,
        "n_molecules": n_molecules,
        "n_batches": len(batches),
        "sampling_seconds": sampling_seconds,
        "wall_seconds": time.perf_counter() - started,
        "molecules_per_second": n_molecules / sampling_seconds,
    }
    return SampleResult(
        graphs, molecules, coords, type_probs, bond_probs, charge_probs, sizes.tolist(), stats
    )


def _sample_batch(
    model, step_fn, mol_index, sizes, keys, grid, self_cond, noise_level, scale_ot, coord_scale, bar, kernels
) -> tuple[list[tuple[torch.Tensor, ...]], int]:
    """Integrate one padded batch: per-molecule (coords Å, type, bond, charge probs) on CPU, and the nfe."""
    steps = len(grid) - 1
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    coords, atomics, bonds, mask = sample_prior(keys, sizes, int(sizes.max()), scale_ot, dtype=dtype)
    pair_mask = mask.unsqueeze(-1) & mask.unsqueeze(-2)
    t = torch.zeros(len(sizes), dtype=dtype, device=coords.device)
    t_next = torch.full_like(t, float(grid[1]))
    state = FlowState(coords, atomics, bonds, mask, t, 0, steps, mol_index, t_next)
    cond = None
    if self_cond:
        cond = SelfCond(torch.zeros_like(coords), torch.zeros_like(atomics), torch.zeros_like(bonds))
    nfe, nonfinite = 0, []
    for _ in range(steps):
        pred = step_fn(model, state, cond)
        nfe += pred.nfe
        nonfinite.append(_nonfinite(pred, mask, pair_mask))  # checked once per batch: no per-step device sync
        # Padding of the prediction is zeroed (here and in the step's probabilities) so that it cannot reach the
        # next call.
        pred_coords = torch.where(mask.unsqueeze(-1), pred.coords, 0.0)
        state, type_probs, bond_probs = integrate_step(
            state, pred_coords, pred.type_logits, pred.bond_logits, grid, noise_level, keys, kernels
        )
        if self_cond:
            cond = SelfCond(pred_coords, type_probs, bond_probs)
        bar.update(1)

    bad_steps = torch.stack(nonfinite).nonzero().flatten().tolist()
    if bad_steps:
        k = bad_steps[0]
        raise FloatingPointError(
            f"the model returned NaN/inf for real atoms at step {k} of {steps} "
            f"(t = {float(grid[k]):.4f}) in a batch of {len(sizes)} molecules"
        )
    charge_probs = F.softmax(pred.charge_logits, dim=-1)
    final = (pred_coords * coord_scale, type_probs, bond_probs, charge_probs)
    final = [tensor.cpu() for tensor in final]
    return [(c[:n], tp[:n], bp[:n, :n], cp[:n]) for n, c, tp, bp, cp in zip(sizes.tolist(), *final)], nfe


def _nonfinite(pred: Prediction, mask: torch.Tensor, pair_mask: torch.Tensor) -> torch.Tensor:
    """0-d bool tensor: does any real atom or pair have a non-finite output?"""
    atom_bad = ~(
        torch.isfinite(pred.coords).all(-1)
        & torch.isfinite(pred.type_logits).all(-1)
        & torch.isfinite(pred.charge_logits).all(-1)
    )
    pair_bad = ~torch.isfinite(pred.bond_logits).all(-1)
    return (atom_bad & mask).any() | (pair_bad & pair_mask).any()


def check_seed(seed) -> None:
    """Seeds are 64-bit keys of the random streams."""
    if not _is_int(seed) or not -(2**63) <= seed < 2**63:
        raise ValueError(f"seed must be an integer in [-2**63, 2**63) (a 64-bit key), got {seed!r}")


def _is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _check_indices(n_molecules, indices) -> torch.Tensor:
    if indices is None:
        return torch.arange(n_molecules)
    indices = torch.as_tensor(indices)
    if indices.dim() != 1 or len(indices) != n_molecules:
        raise ValueError(
            f"indices must list one request index per molecule ({n_molecules}), got shape "
            f"{tuple(indices.shape)}"
        )
    if indices.is_floating_point() or indices.dtype == torch.bool:
        raise ValueError("indices must be integers")
    indices = indices.long().cpu()
    if (indices < 0).any() or len(torch.unique(indices)) != n_molecules:
        raise ValueError("indices must be distinct integers >= 0")
    return indices


def _check_sizes(n_molecules, seed, sizes, size_distribution, max_atoms, indices=None) -> torch.Tensor:
    if sizes is not None and size_distribution is not None:
        raise ValueError("give either sizes or size_distribution, not both")
    if sizes is None:
        distribution = QM9_SIZE_COUNTS if size_distribution is None else size_distribution
        sizes = draw_sizes(n_molecules, seed, distribution, indices)
    else:
        sizes = torch.as_tensor(sizes)
        if sizes.dim() != 1 or len(sizes) != n_molecules:
            raise ValueError(
                f"sizes must list one atom count per molecule ({n_molecules}), got shape {tuple(sizes.shape)}"
            )
        if sizes.is_floating_point() and not torch.equal(sizes, sizes.round()):
            raise ValueError("sizes must be integers")
        sizes = sizes.long()
    if (sizes < 1).any():
        raise ValueError(f"every molecule needs at least 1 atom; got size {int(sizes.min())}")
    # The size embedding has max_atoms rows, indexed by the atom count: the largest usable size is max_atoms-1.
    if max_atoms is not None and (sizes >= max_atoms).any():
        raise ValueError(
            f"size {int(sizes.max())} is too large: the model embeds sizes up to "
            f"max_atoms-1 = {max_atoms - 1}"
        )
    return sizes.cpu()


def _check_device(model: nn.Module, device) -> torch.device:
    model_device = next(itertools.chain(model.parameters(), model.buffers()), torch.zeros(())).device
    if device is None:
        return model_device
    device = torch.device(device)
    same = device.type == model_device.type and (device.index is None or device.index == model_device.index)
    if not same:
        raise ValueError(
            f"the model is on {model_device} but device={device}; "
            f"move it first with model.to({str(device)!r})"
        )
    return model_device
