"""Real e3nn models from their own packages (mace-torch), for the tests and ``fastflow bench e3nn-models``.

The benchmark times energy + forces of MACE (the issue-15 configuration and MACE-OFF-like widths) on ~300 atoms:
``unpatched``, ``patched_tp_only`` (patch_model with the convolutions left unfused: what the tensor-product swap
alone gives), ``patched`` (the convolutions as fastflow::tp_conv too), medians of interleaved repeats, as ratios to the unpatched
model, with each variant's max force error relative to the unpatched model's largest force; and ``compiled``
(``torch.compile`` of the unpatched model) against its own unpatched copy in a child process, which survives the
compiler crashing the process.

``mace_model`` builds a ``ScaleShiftMACE`` with random weights from mace-torch's constructor; ``mace_batch`` packs
randomly rotated ethanol molecules (ASE's geometry, each molecule in its own region of space, no periodic cell)
into the dict MACE's ``forward`` reads; ``energy_and_forces`` runs it the way an ASE calculator does.
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


# ---- fastflow bench e3nn-models ----

MACE_CONFIGS = {  # name: (hidden_irreps, max_ell, correlation)
    "mace-issue15": ("128x0e+128x1o", 3, 3),  # the ScaleShiftMACE
    "mace-off-small": ("96x0e", 3, 3),  # MACE-OFF23 small: scalar messages
    "mace-off-medium": ("96x0e+96x1o", 3, 3),
}
VARIANTS = ("unpatched", "patched_tp_only", "patched")


def _tp_only(model):
    """``model`` patched with its e3nn tensor products swapped but its convolutions left unfused: each conv_tp is
    wrapped in fastflow.nn.TensorProduct first, which patch_model does not touch."""
    from fastflow import patch_model
    from fastflow.nn import TensorProduct

    for block in model.interactions:
        block.conv_tp = TensorProduct(block.conv_tp)
    patch_model(model)
    return model


def _variant(model, name: str):
    """A copy of the unpatched ``model`` as the variant ``name`` runs it."""
    import copy

    from fastflow import patch_model

    if name == "unpatched":
        return model
    variant = copy.deepcopy(model)
    if name == "patched_tp_only":
        return _tp_only(variant)
    if name == "patched":
        patch_model(variant)
        return variant
    return torch.compile(variant)


def time_variants(config: str, n_molecules: int, spacing: float, repeats: int, variants) -> dict:
    """{variant: (median seconds, max force error relative to the unpatched model's largest force)}."""
    hidden, max_ell, correlation = MACE_CONFIGS[config]
    model = mace_model(hidden_irreps=hidden, max_ell=max_ell, correlation=correlation)
    batch = mace_batch(*ethanol_positions(n_molecules, spacing=spacing))
    models = {name: _variant(model, name) for name in variants}
    forces = {name: energy_and_forces(m, batch)[1] for name, m in models.items()}  # compiles, warms up
    seconds = median_seconds(
        {name: (lambda m=m: energy_and_forces(m, batch)) for name, m in models.items()}, repeats
    )
    scale = forces["unpatched"].abs().max()
    return {
        name: (seconds[name], ((forces[name] - forces["unpatched"]).abs().max() / scale).item())
        for name in models
    }


def _compiled_in_child(config: str, n_molecules: int, spacing: float, repeats: int) -> dict:
    """unpatched vs torch.compile timed in a child process: compiling MACE with forces crashes the process on some
    torch builds (torch 2.13 CPU: glibc "double free or corruption"), which is then reported, not fatal."""
    code = (
        "import json; from fastflow.benchmarks.e3nn_models import time_variants; "
        f"print(json.dumps(time_variants({config!r}, {n_molecules}, {spacing}, {repeats}, "
        "('unpatched', 'compiled'))))"
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
    timed = json.loads(done.stdout.strip().splitlines()[-1])
    return {
        "unpatched_ms": 1e3 * timed["unpatched"][0],
        "compiled_ms": 1e3 * timed["compiled"][0],
        "speedup": timed["unpatched"][0] / timed["compiled"][0],
        "force_max_rel_error": timed["compiled"][1],
    }


def bench_mace(config: str, n_molecules: int, spacing: float, repeats: int, compile_model: bool) -> dict:
    hidden, max_ell, correlation = MACE_CONFIGS[config]
    batch = mace_batch(*ethanol_positions(n_molecules, spacing=spacing))
    timed = time_variants(config, n_molecules, spacing, repeats, ("unpatched", "patched_tp_only", "patched"))
    seconds = {name: value[0] for name, value in timed.items()}
    errors = {name: value[1] for name, value in timed.items()}
    row = {
        "config": config,
        "hidden_irreps": hidden,
        "max_ell": max_ell,
        "correlation": correlation,
        "atoms": int(batch["positions"].shape[0]),
        "edges": int(batch["edge_index"].shape[1]),
        "force_max_rel_error": errors,
    }
    for name, s in seconds.items():
        row[f"{name}_ms"] = 1e3 * s
        row[f"speedup_{name}"] = seconds["unpatched"] / s
    if compile_model:
        row["compiled_child_process"] = _compiled_in_child(config, n_molecules, spacing, repeats)
    return row


def format_row(row: dict) -> str:
    times = "  ".join(
        f"{name} {row[f'{name}_ms']:8.1f} ms (x{row[f'speedup_{name}']:.2f})"
        for name in VARIANTS
        if f"{name}_ms" in row
    )
    compiled = row.get("compiled_child_process", {})
    if "speedup" in compiled:
        times += f"  compiled x{compiled['speedup']:.2f} (child process, vs its own unpatched)"
    elif compiled:
        times += f"  compiled skipped: {compiled['skipped']}"
    return f"{row['config']:16} N={row['atoms']} E={row['edges']}  {times}"


def run(
    configs=("mace-issue15",),
    n_molecules: int = 32,
    spacing: float = 5.0,
    repeats: int = 5,
    compile_model: bool = True,
    out: Path | None = None,
) -> dict:
    reason = mace_unavailable_reason()
    if reason is not None:
        raise RuntimeError(f"fastflow bench e3nn-models needs mace-torch: {reason}")
    machine = machine_metadata()
    print(machine_header(machine))
    print(f"fastflow bench e3nn-models: energy + forces, {torch.get_num_threads()} threads")
    rows = []
    for config in configs:
        rows.append(bench_mace(config, n_molecules, spacing, repeats, compile_model))
        print(format_row(rows[-1]))
    results = {"benchmark": "e3nn-models", "machine": machine, "repeats": repeats, "rows": rows}
    if out is not None:
        out = Path(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(results, indent=1) + "\n")
        print(f"wrote {out}")
    return results


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--configs", nargs="+", choices=MACE_CONFIGS, default=["mace-issue15"])
    parser.add_argument(
        "--molecules", type=int, default=32, help="ethanol molecules (9 atoms each; default 32)"
    )
    parser.add_argument(
        "--spacing", type=float, default=5.0, help="grid spacing of the molecules, Å (default 5)"
    )
    parser.add_argument("--repeats", type=int, default=5, help="timed repeats per variant (default 5)")
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True)
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
    )


if __name__ == "__main__":  # until the CLI registers `fastflow bench e3nn-models`
    parser = argparse.ArgumentParser(description=__doc__)
    add_arguments(parser)
    run_from_args(parser.parse_args())
