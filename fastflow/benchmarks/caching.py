"""``fastflow bench caching``: the speed–quality Pareto front of the predictive feature cache (issue 4,
item 6).

On one model (``--checkpoint``: an upstream .ckpt or a fastflow model directory; default
``fastflow.load_pretrained()``), with fixed seeds and the log schedule, runs: the base sampler; fewer-steps
baselines at the cached runs' evaluation counts; reuse, Taylor (m = 1, 2) and Adams–Bashforth (j = 2, 3) at
D = 2…5; the same forecasters at D = 2 on the step-index clock of the paper's code (``clock="steps"``, rows
``… clock=steps``); the adaptive policy at several tolerances, with its error measure (``CacheConfig.error``)
"sample" (rows ``adaptive tol=…``) and the former "relative" (rows ``adaptive relative tol=…``;
``--only "adaptive tol"`` or ``--only "adaptive relative"`` picks one). Every run uses the same noise, so each
molecule has an uncached twin in the base run: the table reports the coordinate RMSD between them. Prints a
table, writes ``--out`` (default bench/results/caching_pareto-<host>-<date>.json) and a speed–quality plot next to it
(PNG, when matplotlib is installed and ``--plot``). ``--quick``: fewer configurations, and by default
32 molecules at 20 steps (a smoke test; ``--config tiny`` works without a trained model);
``--quick --n 200 --steps 100`` is the reduced measurement. ``--kernels`` (default "reference": every run
unfused, so the table isolates the cache) is passed to ``patch_model`` for every run, the base run included.
"""

from __future__ import annotations

import argparse
import json
import platform
from datetime import UTC, datetime
from pathlib import Path

import torch

from fastflow.benchmarks.timing import machine_header, machine_metadata
from fastflow.cache import CacheConfig, FixedInterval
from fastflow.metrics import compute_metrics
from fastflow.models import Semla, SemlaConfig
from fastflow.models.checkpoint import load_pretrained_dir, load_semlaflow_checkpoint
from fastflow.ops.backends import BACKENDS
from fastflow.patch import patch_model
from fastflow.pretrained import load_pretrained
from fastflow.sampling import sample

METRICS = ("atom_stability", "mol_stability", "validity", "uniqueness", "energy_per_atom", "strain_per_atom")
RESULTS_DIR = Path("bench") / "results"  # relative to the working directory
SAMPLE_TOLERANCES, SAMPLE_TOLERANCES_QUICK = (0.3, 1.0, 3.0), (0.5, 2.0)
RELATIVE_TOLERANCES, RELATIVE_TOLERANCES_QUICK = (0.01, 0.02, 0.05, 0.1, 0.2), (0.1,)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The benchmark's options, for the ``bench/caching_pareto.py`` script and ``fastflow bench caching``."""
    parser.add_argument(
        "--checkpoint",
        default=None,
        help="an upstream .ckpt or a fastflow model directory (default: the packaged model)",
    )
    parser.add_argument("--config", default=None, help="a randomly initialised preset (smoke tests only)")
    parser.add_argument("--n", type=int, default=None, help="molecules (default 1000; --quick: 32)")
    parser.add_argument("--steps", type=int, default=None, help="solver steps (default 100; --quick: 20)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument(
        "--quick", action="store_true", help="fewer configurations, fewer molecules and steps"
    )
    parser.add_argument(
        "--kernels",
        choices=BACKENDS,
        default="reference",
        help="patch_model kernels for every run (default reference: unfused, isolating the cache)",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help="JSON path; the plot goes next to it as .png "
        "(default bench/results/caching_pareto-<host>-<date>.json)",
    )
    parser.add_argument(
        "--only",
        nargs="+",
        default=None,
        metavar="PREFIX",
        help="run only the rows whose name starts with one of these (e.g. base adaptive); "
        "the first row run is the speed-up's and RMSD's base",
    )
    parser.add_argument(
        "--plot",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="write the speed–quality plot next to the JSON (needs matplotlib) (default on)",
    )


def default_out(results_dir: Path = RESULTS_DIR) -> Path:
    """``results_dir/caching_pareto-<host>-<date>.json`` (UTC date)."""
    date = datetime.now(UTC).date().isoformat()
    return Path(results_dir) / f"caching_pareto-{platform.node()}-{date}.json"


def runs(quick: bool, steps: int) -> list[tuple[str, int, CacheConfig | None]]:
    """(name, steps, cache) for every row of the table."""
    intervals = (2, 3) if quick else (2, 3, 4, 5)
    forecasters = [("reuse", 0), ("taylor", 1), ("taylor", 2), ("ab", 2), ("ab", 3)]
    if quick:
        forecasters = [("taylor", 2), ("ab", 3)]
    table = [("base", steps, None)]
    for D in intervals:
        evaluations = sum(FixedInterval(D).evaluate(k, steps) for k in range(steps))
        table.append((f"{evaluations} steps", evaluations, None))
        table += [
            (f"{kind} {order} D={D}", steps, CacheConfig(forecaster=kind, order=order, interval=D))
            for kind, order in forecasters
        ]
    table += [  # the paper's code's forecasts (mol-cache: step-index clock) at its headline interval
        (
            f"{kind} {order} D=2 clock=steps",
            steps,
            CacheConfig(forecaster=kind, order=order, interval=2, clock="steps"),
        )
        for kind, order in forecasters
        if order > 0
    ]
    if not quick:  # does evaluating the last steps (where the sample's geometry settles) buy back strain?
        table.append(
            ("taylor 2 D=2 cool=4", steps, CacheConfig(forecaster="taylor", order=2, interval=2, cooldown=4))
        )
    # The two measures' tolerances are on different scales (see CacheConfig.error).
    tolerances = {
        "sample": SAMPLE_TOLERANCES_QUICK if quick else SAMPLE_TOLERANCES,
        "relative": RELATIVE_TOLERANCES_QUICK if quick else RELATIVE_TOLERANCES,
    }
    for error, label in (("sample", "adaptive"), ("relative", "adaptive relative")):
        table += [
            (
                f"{label} tol={tol}",
                steps,
                CacheConfig(forecaster="taylor", order=2, interval=10, tolerance=tol, error=error),
            )
            for tol in tolerances[error]
        ]
    return table


def matched_quality(row: dict, base: dict) -> bool:
    """The issue's bar: validity and molecule stability at most 1.5 points below the base run, energy and
    strain per atom at most 5% above it."""
    return (
        row["validity"] >= base["validity"] - 0.015
        and row["mol_stability"] >= base["mol_stability"] - 0.015
        and row["energy_per_atom"] <= 1.05 * base["energy_per_atom"]
        and row["strain_per_atom"] <= 1.05 * base["strain_per_atom"]
    )


def load_model(args) -> torch.nn.Module:
    """``--checkpoint`` (directory or .ckpt), else a random ``--config`` preset, else the packaged model."""
    if args.checkpoint is not None:
        path = Path(args.checkpoint)
        if path.is_dir():
            return load_pretrained_dir(path)
        return load_semlaflow_checkpoint(path)
    if args.config is not None:
        torch.manual_seed(0)
        return Semla(SemlaConfig.preset(args.config)).eval()
    return load_pretrained()


def rmsd(a: list[torch.Tensor], b: list[torch.Tensor]) -> torch.Tensor:
    """Per-molecule coordinate RMSD (Å) between twins (same noise, same frame: no alignment)."""
    return torch.stack([((x - y) ** 2).sum(-1).mean().sqrt() for x, y in zip(a, b)])


def run(args) -> dict:
    """Run every configuration, print the table, write the JSON (and the plot); return
    ``{"metadata": ..., "rows": [...]}``.

    ``args``: a namespace with the options of :func:`add_arguments` (missing ``kernels``/``out``/``plot`` take
    their defaults).
    """
    n = args.n or (32 if args.quick else 1000)
    steps_base = args.steps or (20 if args.quick else 100)
    kernels = getattr(args, "kernels", "reference")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    model = load_model(args)
    request = {
        "n_molecules": n,
        "seed": args.seed,
        "schedule": "log",
        "batch_size": args.batch_size,
        "progress": False,
    }

    warmup = patch_model(model, kernels=kernels)
    try:
        sample(model, n_molecules=min(n, 8), steps=2, seed=args.seed, progress=False)
        backend = warmup.backend
    finally:
        warmup.unpatch()

    parameter = next(model.parameters(), None)
    device = parameter.device.type if parameter is not None else "cpu"
    machine = machine_metadata(device)
    print(machine_header(machine))
    rows, base = [], None
    only = getattr(args, "only", None)
    table = runs(args.quick, steps_base)
    if only is not None:
        names = [name for name, _, _ in table]
        table = [row for row in table if row[0].startswith(tuple(only))]
        if not table:
            raise ValueError(f"--only {' '.join(only)} matches no row; rows: {names}")
    for name, steps, cache in table:
        handle = patch_model(model, kernels=kernels, cache=cache)
        try:
            result = sample(model, steps=steps, **request)
            stats = handle.stats()
        finally:
            handle.unpatch()
        if base is None:
            base = result
        metrics = compute_metrics(result.graphs, result.molecules)
        distances = rmsd(result.coords, base.coords)
        rows.append(
            {
                "run": name,
                "steps": steps,
                "cache": None if cache is None else repr(cache),
                "evaluations_per_molecule": result.stats["nfe"] / n,
                "seconds": result.stats["sampling_seconds"],
                "speedup": base.stats["sampling_seconds"] / result.stats["sampling_seconds"],
                **{key: metrics.get(key) for key in METRICS},
                "energy_per_atom_sem": metrics.get("energy_per_atom_sem"),
                "strain_per_atom_sem": metrics.get("strain_per_atom_sem"),
                "rmsd_to_base_median": distances.median().item(),
                "rmsd_to_base_mean": distances.mean().item(),
                "cache_hit_rate": stats.get("hit_rate", 0.0),
            }
        )
        rows[-1]["matched_quality"] = matched_quality(rows[-1], rows[0])
        print_row(rows[-1], header=len(rows) == 1)

    metadata = {
        **machine,
        "model": args.checkpoint or args.config or "fastflow.load_pretrained()",
        **request,
        "steps": steps_base,
        "quick": args.quick,
        "only": only,
        "kernels": kernels,
        "kernel_backend": backend,
    }
    results = {"metadata": metadata, "rows": rows}
    out = getattr(args, "out", None)
    out = Path(out) if out is not None else default_out()
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1))
    print(f"wrote {out}")
    if getattr(args, "plot", True):
        plot(rows, out.with_suffix(".png"))
    return results


def print_row(row: dict, header: bool) -> None:
    """One line of the table; energy and strain with their standard errors, ``*``: matched quality."""
    cells = {
        "evals": f"{row['evaluations_per_molecule']:.1f}",
        "seconds": f"{row['seconds']:.1f}",
        "speedup": f"{row['speedup']:.2f}",
        "atom stab": f"{row['atom_stability']:.4f}",
        "mol stab": f"{row['mol_stability']:.3f}",
        "validity": f"{row['validity']:.3f}",
        "unique": f"{row['uniqueness']:.3f}",
        "energy/atom": f"{row['energy_per_atom']:.2f}±{row['energy_per_atom_sem']:.2f}",
        "strain/atom": f"{row['strain_per_atom']:.2f}±{row['strain_per_atom_sem']:.2f}",
        "RMSD p50": f"{row['rmsd_to_base_median']:.3f}",
        "matched": "*" if row["matched_quality"] else "",
    }
    if header:
        print(f"{'run':>26} | " + " | ".join(f"{name:>11}" for name in cells))
    print(f"{row['run']:>26} | " + " | ".join(f"{value:>11}" for value in cells.values()))


def plot(rows: list[dict], path: Path) -> None:
    """Speed-up against validity, mol. stability, strain per atom and RMSD to base, one line per family."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed (pip install fastflow[bench]): no plot")
        return
    figure, axes = plt.subplots(2, 2, figsize=(12, 9))
    families = {}
    for row in rows:
        family = "fewer steps" if row["cache"] is None else row["run"].split(" D=")[0].split(" tol=")[0]
        families.setdefault(family, []).append(row)
    panels = ("validity", "mol_stability", "strain_per_atom", "rmsd_to_base_median")
    for ax, metric in zip(axes.flat, panels):
        for family, members in families.items():
            members = sorted(members, key=lambda r: r["speedup"])
            errors = [r.get(f"{metric}_sem") for r in members]
            ax.errorbar(
                [r["speedup"] for r in members],
                [r[metric] for r in members],
                yerr=None if None in errors else errors,
                fmt="o-",
                capsize=3,
                label=family,
            )
        ax.set_xlabel("wall-clock speedup over the base sampler")
        ax.set_ylabel(metric + (" (± standard error)" if metric == "strain_per_atom" else ""))
    axes.flat[0].legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    print(f"wrote {path}")
