"""Real e3nn models from their own packages (mace-torch), for the tests and ``fastflow bench e3nn-models``.

``mace_model`` builds a ``ScaleShiftMACE`` with random weights from mace-torch's constructor; ``mace_batch`` packs
randomly rotated ethanol molecules (ASE's geometry, each molecule in its own region of space, no periodic cell)
into the dict MACE's ``forward`` reads; ``energy_and_forces`` runs it the way an ASE calculator does.
"""

from __future__ import annotations

import importlib.util
import os

import numpy as np
import torch

ELEMENTS = (1, 6, 8)  # H, C, O


def mace_unavailable_reason() -> str | None:
    """None if mace-torch imports here, else why not."""
    if importlib.util.find_spec("mace") is None:
        return "mace-torch is not installed (`pip install -e .[mace]`)"
    # e3nn 0.4.4 (mace-torch's pin) calls torch.load without weights_only, refused by torch >= 2.6.
    os.environ.setdefault("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    try:
        import mace.modules  # noqa: F401
    except ImportError as error:
        return f"mace-torch does not import: {error}"
    return None


def mace_model(
    hidden_irreps: str = "32x0e+32x1o",
    max_ell: int = 3,
    correlation: int = 3,
    num_interactions: int = 2,
    r_max: float = 5.0,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
):
    """A ``ScaleShiftMACE`` with residual interaction blocks and random weights (the issue's configuration with
    hidden_irreps="128x0e+128x1o"), built in ``dtype`` (float64 for a reference evaluation: load the float32
    model's state_dict into it)."""
    from e3nn import o3
    from mace.modules import RealAgnosticResidualInteractionBlock, ScaleShiftMACE

    torch.manual_seed(seed)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # e3nn computes its Clebsch–Gordan buffers in the default dtype
    try:
        model = ScaleShiftMACE(
            r_max=r_max,
            num_bessel=8,
            num_polynomial_cutoff=5,
            max_ell=max_ell,
            interaction_cls=RealAgnosticResidualInteractionBlock,
            interaction_cls_first=RealAgnosticResidualInteractionBlock,
            num_interactions=num_interactions,
            num_elements=len(ELEMENTS),
            hidden_irreps=o3.Irreps(hidden_irreps),
            MLP_irreps=o3.Irreps("16x0e"),
            atomic_energies=np.zeros(len(ELEMENTS)),
            avg_num_neighbors=8.0,
            atomic_numbers=list(ELEMENTS),
            correlation=correlation,
            gate=torch.nn.functional.silu,
            atomic_inter_scale=1.0,
            atomic_inter_shift=0.0,
        )
    finally:
        torch.set_default_dtype(previous)
    return model.eval()


def ethanol_positions(
    n_molecules: int, spacing: float = 20.0, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """(atomic numbers [N], positions [N, 3]) of ``n_molecules`` randomly rotated ethanol molecules, centred on a
    cubic grid ``spacing`` Å apart (20 Å: isolated molecules; 5 Å: a liquid-like density of edges)."""
    from ase.build import molecule
    from scipy.spatial.transform import Rotation

    ethanol = molecule("CH3CH2OH")
    numbers, base = ethanol.get_atomic_numbers(), ethanol.get_positions()
    base = base - base.mean(axis=0)
    rotations = Rotation.random(n_molecules, random_state=seed).as_matrix()
    side = int(np.ceil(n_molecules ** (1 / 3)))
    centres = spacing * np.array(np.unravel_index(np.arange(n_molecules), (side, side, side))).T
    positions = [base @ R.T + centre for R, centre in zip(rotations, centres)]
    return np.tile(numbers, n_molecules), np.concatenate(positions)


def mace_batch(
    numbers: np.ndarray, positions: np.ndarray, r_max: float = 5.0, dtype: torch.dtype = torch.float32
):
    """MACE's input dict for one graph: every ordered pair of distinct atoms within ``r_max`` is an edge."""
    pos = torch.as_tensor(positions, dtype=torch.float64)
    within = torch.cdist(pos, pos) < r_max
    within.fill_diagonal_(False)  # cdist's self-distances are not exactly 0
    sender, receiver = torch.nonzero(within, as_tuple=True)
    index = {z: i for i, z in enumerate(ELEMENTS)}
    node_attrs = torch.nn.functional.one_hot(torch.as_tensor([index[int(z)] for z in numbers]), len(ELEMENTS))
    n, e = len(numbers), sender.numel()
    return {
        "positions": pos.to(dtype),
        "node_attrs": node_attrs.to(dtype),
        "edge_index": torch.stack([sender, receiver]),
        "shifts": torch.zeros(e, 3, dtype=dtype),
        "unit_shifts": torch.zeros(e, 3, dtype=dtype),
        "cell": torch.zeros(1, 3, 3, dtype=dtype),
        "batch": torch.zeros(n, dtype=torch.int64),
        "ptr": torch.tensor([0, n]),
        "weight": torch.ones(1, dtype=dtype),
        "head": torch.zeros(1, dtype=torch.int64),
    }


def energy_and_forces(model, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """(energy [1], forces [N, 3]) as MACE's calculator computes them (no graph kept for a second derivative)."""
    data = {key: value.clone() for key, value in batch.items()}
    out = model(data, training=False, compute_force=True)
    return out["energy"].detach(), out["forces"].detach()
