"""Speed–quality Pareto front of the predictive feature cache (issue 4, item 6).

    python bench/caching_pareto.py [--checkpoint PATH] [--n 1000] [--steps 100] [--quick]

On one model (``--checkpoint``: an upstream .ckpt or a fastflow model directory; default
``fastflow.load_pretrained()``), with fixed seeds and the log schedule, runs: the base sampler; fewer-steps
baselines at the cached runs' evaluation counts; reuse, Taylor (m = 1, 2) and Adams–Bashforth (j = 2, 3) at
D = 2…5; the adaptive policy at several tolerances. Every run uses the same noise, so each molecule has an
uncached twin in the base run: the table reports the coordinate RMSD between them. Prints a table, writes
bench/results/caching_pareto-<host>-<date>.json and a speed–quality plot (PNG, when matplotlib is installed).
``--quick``: fewer configurations, and by default 32 molecules at 20 steps (a smoke test; ``--config tiny``
works without a trained model); ``--quick --n 200 --steps 100`` is the reduced measurement.
"""

import argparse
import json
import platform
from datetime import datetime, timezone
from pathlib import Path

import torch

import fastflow
from fastflow import CacheConfig, compute_metrics, patch_model, sample
from fastflow.cache import FixedInterval

METRICS = ("atom_stability", "mol_stability", "validity", "uniqueness", "energy_per_atom", "strain_per_atom")


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
    tolerances = (0.05, 0.2) if quick else (0.01, 0.02, 0.05, 0.1, 0.2)
    table += [
        (f"adaptive tol={tol}", steps, CacheConfig(forecaster="taylor", order=2, interval=10, tolerance=tol))
        for tol in tolerances
    ]
    return table


def load_model(args) -> torch.nn.Module:
    if args.checkpoint is not None:
        path = Path(args.checkpoint)
        if path.is_dir():
            return fastflow.load_pretrained_dir(path)
        return fastflow.load_semlaflow_checkpoint(path)
    if args.config is not None:
        torch.manual_seed(0)
        return fastflow.Semla(fastflow.SemlaConfig.preset(args.config)).eval()
    if not hasattr(fastflow, "load_pretrained"):
        raise SystemExit(
            "no default model in this version: pass --checkpoint PATH (or --config tiny --quick)"
        )
    return fastflow.load_pretrained()


def rmsd(a: list[torch.Tensor], b: list[torch.Tensor]) -> torch.Tensor:
    """Per-molecule coordinate RMSD (Å) between twins (same noise, same frame: no alignment)."""
    return torch.stack([((x - y) ** 2).sum(-1).mean().sqrt() for x, y in zip(a, b)])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", default=None)
    parser.add_argument("--config", default=None, help="a randomly initialised preset (smoke tests only)")
    parser.add_argument("--n", type=int, default=None, help="molecules (default 1000; --quick: 32)")
    parser.add_argument("--steps", type=int, default=None, help="solver steps (default 100; --quick: 20)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    args.n = args.n or (32 if args.quick else 1000)
    args.steps = args.steps or (20 if args.quick else 100)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    model = load_model(args)
    request = dict(
        n_molecules=args.n, seed=args.seed, schedule="log", batch_size=args.batch_size, progress=False
    )

    sample(model, n_molecules=min(args.n, 8), steps=2, seed=args.seed, progress=False)  # warm-up
    rows, base = [], None
    for name, steps, cache in runs(args.quick, args.steps):
        handle = patch_model(model, cache=cache) if cache is not None else None
        try:
            result = sample(model, steps=steps, **request)
            stats = handle.stats() if handle is not None else {}
        finally:
            if handle is not None:
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
                "evaluations_per_molecule": result.stats["nfe"] / args.n,
                "seconds": result.stats["sampling_seconds"],
                "speedup": base.stats["sampling_seconds"] / result.stats["sampling_seconds"],
                **{key: metrics.get(key) for key in METRICS},
                "rmsd_to_base_median": distances.median().item(),
                "rmsd_to_base_mean": distances.mean().item(),
                "cache_hit_rate": stats.get("hit_rate", 0.0),
            }
        )
        print_row(rows[-1], header=len(rows) == 1)

    date = datetime.now(timezone.utc).isoformat(timespec="seconds")
    out = Path(__file__).parent / "results" / f"caching_pareto-{platform.node()}-{date[:10]}"
    out.parent.mkdir(exist_ok=True)
    metadata = {
        "date": date,
        "host": platform.node(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "model": args.checkpoint or args.config or "fastflow.load_pretrained()",
        **request,
        "steps": args.steps,
        "quick": args.quick,
    }
    out.with_suffix(".json").write_text(json.dumps({"metadata": metadata, "rows": rows}, indent=1))
    print(f"wrote {out.with_suffix('.json')}")
    plot(rows, out.with_suffix(".png"))


def print_row(row: dict, header: bool) -> None:
    columns = ("run", "evaluations_per_molecule", "seconds", "speedup", *METRICS, "rmsd_to_base_median")
    if header:
        print(f"{'run':>20} | " + " | ".join(f"{c[:14]:>14}" for c in columns[1:]))
    print(
        f"{row['run']:>20} | "
        + " | ".join(
            f"{row[c]:>14.4g}" if isinstance(row[c], float) else f"{row[c]!s:>14}" for c in columns[1:]
        )
    )


def plot(rows: list[dict], path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed (pip install fastflow[bench]): no plot")
        return
    figure, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    families = {}
    for row in rows:
        family = "fewer steps" if row["cache"] is None else row["run"].split(" D=")[0].split(" tol=")[0]
        families.setdefault(family, []).append(row)
    for ax, metric in zip(axes, ("mol_stability", "energy_per_atom", "rmsd_to_base_median")):
        for family, members in families.items():
            members = sorted(members, key=lambda r: r["speedup"])
            ax.plot([r["speedup"] for r in members], [r[metric] for r in members], "o-", label=family)
        ax.set_xlabel("wall-clock speedup over the base sampler")
        ax.set_ylabel(metric)
    axes[0].legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
