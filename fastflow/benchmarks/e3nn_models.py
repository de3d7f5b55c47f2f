"""Real e3nn models from their own packages (mace-torch, nequip), for the tests and ``fastflow bench e3nn-models``.

The benchmark times energy + forces of MACE (the issue-15 configuration and MACE-OFF-like widths) and NequIP
(the issue-15 configuration) on ~300 atoms: ``unpatched``, ``patched_tp_only`` (patch_model with the convolutions
left unfused: what the tensor-product swap alone gives), ``patched_no_sc`` (MACE only: patched, but MACE's symmetric
contractions left as they are: ``patched`` minus this is what fastflow::symmetric_contraction contributes) and
``patched`` (the convolutions as fastflow::tp_conv and the symmetric contractions fused too),
medians of interleaved repeats, as ratios to the unpatched model, with each variant's max force error relative to
the unpatched model's largest force; ``cueq`` (``--cueq``, MACE only: the model converted by mace-torch's own
``convert_e3nn_cueq`` to cuEquivariance's modules, here their CPU path); and ``compiled`` / ``patched_compiled``
(``torch.compile`` of the unpatched and of the patched model) against their own unpatched copy in a child
process, which survives the compiler crashing the process.

``mace_model`` builds a ``ScaleShiftMACE`` with random weights from mace-torch's constructor; ``mace_batch`` packs
randomly rotated ethanol molecules (ASE's geometry, each molecule in its own region of space, no periodic cell)
into the dict MACE's ``forward`` reads; ``energy_and_forces`` runs it the way an ASE calculator does. The
``nequip_*`` functions do the same for nequip's ``NequIPGNNModel``.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import torch

from fastflow.benchmarks.timing import machine_header, machine_metadata, median_seconds
from fastflow.benchmarks.tp import RESULTS_DIR

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
    data["positions"].requires_grad_(True)  # MACE does it itself, except under torch.compile
    out = model(data, training=False, compute_force=True)
    return out["energy"].detach(), out["forces"].detach()


def nequip_unavailable_reason() -> str | None:
    """None if nequip imports here, else why not."""
    if importlib.util.find_spec("nequip") is None:
        return "nequip is not installed (`pip install -e .[nequip]`)"
    try:
        import nequip.model  # noqa: F401
    except ImportError as error:
        return f"nequip does not import: {error}"
    return None


def nequip_model(
    num_layers: int = 4,
    l_max: int = 2,
    num_features: int = 32,
    r_max: float = 5.0,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
):
    """nequip's ``NequIPGNNModel`` (the issue's configuration by default) with random weights, for H, C, O."""
    import e3nn
    from nequip.model import NequIPGNNModel
    from nequip.utils.global_state import set_global_state

    previous, e3nn_defaults = torch.get_default_dtype(), e3nn.get_optimization_defaults()
    set_global_state()  # required by nequip's builders; it also sets these process-wide defaults, restored here
    try:
        model = NequIPGNNModel(
            seed=seed,
            model_dtype=str(dtype).removeprefix("torch."),
            r_max=r_max,
            type_names=["H", "C", "O"],
            num_layers=num_layers,
            l_max=l_max,
            num_features=num_features,
            avg_num_neighbors=8.0,
            per_type_energy_scales=1.0,
            per_type_energy_shifts=0.0,
        )
    finally:
        torch.set_default_dtype(previous)
        e3nn.set_optimization_defaults(**e3nn_defaults)
    return model.eval()


def nequip_batch(numbers: np.ndarray, positions: np.ndarray, r_max: float = 5.0) -> dict:
    """nequip's AtomicDataDict for one molecule set (no periodic cell), with its own neighbour list."""
    import ase
    from nequip.data import compute_neighborlist_, from_ase

    data = compute_neighborlist_(from_ase(ase.Atoms(numbers=numbers, positions=positions)), r_max=r_max)
    index = {z: i for i, z in enumerate(ELEMENTS)}
    data["atom_types"] = torch.as_tensor([index[int(z)] for z in numbers])
    return data


def nequip_energy_and_forces(model, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """(total energy, forces [N, 3]) of nequip's model (it computes forces itself)."""
    out = model({key: value.clone() if torch.is_tensor(value) else value for key, value in batch.items()})
    return out["total_energy"].detach(), out["forces"].detach()


# ---- fastflow bench e3nn-models ----

CONFIGS = {  # name: (family, builder arguments)
    "mace-issue15": ("mace", {"hidden_irreps": "128x0e+128x1o"}),  # the ScaleShiftMACE
    "mace-off-small": ("mace", {"hidden_irreps": "96x0e"}),  # MACE-OFF23 small: scalar messages
    "mace-off-medium": ("mace", {"hidden_irreps": "96x0e+96x1o"}),
    "nequip-issue15": ("nequip", {"num_layers": 4, "l_max": 2, "num_features": 32}),
}
VARIANTS = ("unpatched", "patched_tp_only", "patched_no_sc", "patched")
COMPILED_VARIANTS = ("unpatched", "compiled", "patched_compiled")  # timed in a child process


def _no_symmetric_contraction(model):
    """``model`` patched, with MACE's own symmetric contractions put back (the other swaps stay)."""
    from fastflow.patch import patch_model

    _put_back_symmetric_contractions(patch_model(model))
    return model


def _put_back_symmetric_contractions(handle) -> None:
    from fastflow.nn.symmetric_contraction import SymmetricContraction

    for swap in [swap for swap in handle.swaps if isinstance(swap.fused, SymmetricContraction)]:
        swap.parent._modules[swap.name] = swap.original
        handle.swaps.remove(swap)


def _tp_only(model):
    """``model`` patched with its e3nn tensor products swapped but its convolutions left unfused: each convolution's
    product (MACE's conv_tp, NequIP's tp_scatter.tp) is wrapped in fastflow.nn.TensorProduct first, which
    patch_model neither touches nor recognises as a convolution; MACE's symmetric contractions are put back."""
    from fastflow.nn import TensorProduct
    from fastflow.patch import patch_model

    for module in list(model.modules()):
        if type(module).__name__ == "TensorProductScatter":
            module.tp = TensorProduct(module.tp)
        elif hasattr(module, "conv_tp") and hasattr(module, "conv_tp_weights"):
            module.conv_tp = TensorProduct(module.conv_tp)
    _put_back_symmetric_contractions(patch_model(model))
    return model


def _variant(build, name: str):
    """A model from ``build()`` (seeded: the same weights each time) as the variant ``name`` runs it."""
    from fastflow.patch import patch_model

    variant = build()
    if name == "unpatched":
        return variant
    if name == "patched_tp_only":
        return _tp_only(variant)
    if name == "patched_no_sc":
        return _no_symmetric_contraction(variant)
    if name == "patched":
        patch_model(variant)
        return variant
    if name == "cueq":
        from mace.cli.convert_e3nn_cueq import run as to_cuequivariance

        previous = torch.get_default_dtype()
        try:
            return to_cuequivariance(variant, device="cpu").eval()
        finally:
            torch.set_default_dtype(previous)  # the converter sets the model's dtype as the process default
    if name == "patched_compiled":
        patch_model(variant)
    return torch.compile(variant)


def _case(config: str, n_molecules: int, spacing: float):
    """(model builder, batch, energy-and-forces function) of a configuration."""
    family, arguments = CONFIGS[config]
    numbers, positions = ethanol_positions(n_molecules, spacing=spacing)
    if family == "mace":
        return lambda: mace_model(**arguments), mace_batch(numbers, positions), energy_and_forces
    return lambda: nequip_model(**arguments), nequip_batch(numbers, positions), nequip_energy_and_forces


def time_variants(config: str, n_molecules: int, spacing: float, repeats: int, variants) -> dict:
    """{variant: (median seconds, max force error relative to the unpatched model's largest force)}, and the
    graph's (atoms, edges)."""
    build, batch, run_model = _case(config, n_molecules, spacing)
    models = {name: _variant(build, name) for name in variants}
    forces = {name: run_model(m, batch)[1] for name, m in models.items()}  # compiles, warms up
    seconds = median_seconds({name: (lambda m=m: run_model(m, batch)) for name, m in models.items()}, repeats)
    scale = forces["unpatched"].abs().max()
    timed = {
        name: (seconds[name], ((forces[name] - forces["unpatched"]).abs().max() / scale).item())
        for name in models
    }
    return timed, (int(forces["unpatched"].shape[0]), int(batch["edge_index"].shape[1]))


def _compiled_in_child(config: str, n_molecules: int, spacing: float, repeats: int) -> dict:
    """unpatched vs torch.compile of the unpatched and of the patched model, timed in a child process: compiling
    MACE with forces has crashed the process on torch 2.13 CPU (glibc "double free or corruption"), which is then
    reported, not fatal."""
    code = (
        "import json; from fastflow.benchmarks.e3nn_models import time_variants; "
        f"print(json.dumps(time_variants({config!r}, {n_molecules}, {spacing}, {repeats}, "
        f"{COMPILED_VARIANTS!r})))"
    )
    done = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())},
    )
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["(no output)"])[-1]
        return {"skipped": f"the compiled model's process exited with {done.returncode}: {last[:200]}"}
    timed = json.loads(done.stdout.strip().splitlines()[-1])[0]
    row = {"unpatched_ms": 1e3 * timed["unpatched"][0]}
    for name in COMPILED_VARIANTS[1:]:
        row[f"{name}_ms"] = 1e3 * timed[name][0]
        row[f"speedup_{name}"] = timed["unpatched"][0] / timed[name][0]
        row[f"force_max_rel_error_{name}"] = timed[name][1]
    return row


def bench(
    config: str, n_molecules: int, spacing: float, repeats: int, compile_model: bool, cueq: bool = False
) -> dict:
    mace = CONFIGS[config][0] == "mace"
    variants = tuple(v for v in VARIANTS if mace or v != "patched_no_sc") + (
        ("cueq",) if mace and cueq else ()
    )
    timed, (atoms, edges) = time_variants(config, n_molecules, spacing, repeats, variants)
    row = {"config": config, **CONFIGS[config][1], "atoms": atoms, "edges": edges}
    row["force_max_rel_error"] = {name: value[1] for name, value in timed.items()}
    for name, (seconds, _) in timed.items():
        row[f"{name}_ms"] = 1e3 * seconds
        row[f"speedup_{name}"] = timed["unpatched"][0] / seconds
    if compile_model:
        row["compiled_child_process"] = _compiled_in_child(config, n_molecules, spacing, repeats)
    return row


def format_row(row: dict) -> str:
    times = "  ".join(
        f"{name} {row[f'{name}_ms']:8.1f} ms (x{row[f'speedup_{name}']:.2f})"
        for name in (*VARIANTS, "cueq")
        if f"{name}_ms" in row
    )
    compiled = row.get("compiled_child_process", {})
    if "skipped" in compiled:
        times += f"  compiled skipped: {compiled['skipped']}"
    elif compiled:
        speedups = ", ".join(f"{name} x{compiled[f'speedup_{name}']:.2f}" for name in COMPILED_VARIANTS[1:])
        times += f"  ({speedups}: child process, vs its own unpatched)"
    return f"{row['config']:16} N={row['atoms']} E={row['edges']}  {times}"


def run(
    configs=("mace-issue15", "nequip-issue15"),
    n_molecules: int = 32,
    spacing: float = 5.0,
    repeats: int = 5,
    compile_model: bool = True,
    out: Path | None = None,
    cueq: bool = False,
) -> dict:
    for family, reason in (("mace", mace_unavailable_reason()), ("nequip", nequip_unavailable_reason())):
        if reason is not None and any(CONFIGS[config][0] == family for config in configs):
            raise RuntimeError(f"fastflow bench e3nn-models: {reason}")
    machine = machine_metadata()
    print(machine_header(machine))
    print(f"fastflow bench e3nn-models: energy + forces, {torch.get_num_threads()} threads")
    rows = []
    for config in configs:
        rows.append(bench(config, n_molecules, spacing, repeats, compile_model, cueq))
        print(format_row(rows[-1]))
    results = {"benchmark": "e3nn-models", "machine": machine, "repeats": repeats, "rows": rows}
    if out is not None:
        out = Path(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(results, indent=1) + "\n")
        print(f"wrote {out}")
    return results


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--configs", nargs="+", choices=CONFIGS, default=["mace-issue15", "nequip-issue15"])
    parser.add_argument(
        "--molecules", type=int, default=32, help="ethanol molecules (9 atoms each; default 32)"
    )
    parser.add_argument(
        "--spacing", type=float, default=5.0, help="grid spacing of the molecules, Å (default 5)"
    )
    parser.add_argument("--repeats", type=int, default=5, help="timed repeats per variant (default 5)")
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument(
        "--cueq",
        action="store_true",
        help="also time MACE converted to cuEquivariance's modules (its CPU path; slow at thousands of atoms)",
    )
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON here")


def default_out() -> Path:
    date = datetime.now(UTC).date().isoformat()
    return RESULTS_DIR / f"e3nn-models-{platform.node()}-{date}.json"


def run_from_args(args) -> dict:
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    return run(
        configs=tuple(args.configs),
        n_molecules=args.molecules,
        spacing=args.spacing,
        repeats=args.repeats,
        compile_model=args.compile,
        out=args.out,
        cueq=args.cueq,
    )
