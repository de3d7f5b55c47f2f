"""Sharded sampling on this machine: 1 process × 2 threads vs torchrun 2 processes × 1 thread, and the
per-molecule overhead of sharding.

    python bench/bench_sharded.py [--n 64] [--steps 20] [--shard-size 32] [--repeats 3] [--config tiny]

Every variant is a fresh `fastflow sample` command (clean thread settings, nothing cached between runs), with
the packaged model unless --config names a random preset, --no-energy, seed 0:

    single-2t     fastflow sample --threads 2 --out X.sdf                          1 process × 2 threads
    torchrun-2x1  torchrun --nproc-per-node=2 -m fastflow -- sample --threads 1 --out DIR   2 × 1 (gloo)
    single-1t     fastflow sample --threads 1 --out X.sdf                          plain, 1 thread
    sharded-1t    fastflow sample --threads 1 --out DIR                            world size 1, sharded

Per variant (median over repeats), each also as molecules/s: command seconds (the whole command: start-up,
model load, sampling, metrics, files) and sampling seconds (the sampler's own timer, prior to last
prediction; sharded: summed over a rank's shards, slowest rank); sharded runs also record the run's wall time
from the manifest (first shard to merge, all ranks, per-shard metrics and files included). Derived: the
speed-up of 2×1 over 1×2, and the sharding overhead per molecule, sharded-1t − single-1t: on the command
(everything sharding adds: smaller batches, per-shard records and files, manifest, merge) and on sampling
alone (the batching effect). Writes bench/results/sharded-<host>-<date>.json (or --out).
Measure on an otherwise idle machine: the script records the load average before it starts.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import torch

VARIANTS = ("single-2t", "torchrun-2x1", "single-1t", "sharded-1t")


def command(variant: str, args, work: Path) -> tuple[list[str], Path]:
    out = work / (f"{variant}.sdf" if variant.startswith("single") else variant)
    sample = [
        "sample",
        "--n",
        str(args.n),
        "--steps",
        str(args.steps),
        "--seed",
        "0",
        "--no-energy",
        "--json",
        "--batch-size",
        str(args.batch_size),
        "--out",
        str(out),
        "--no-progress",
    ]
    sample += ["--config", args.config] if args.config else []
    if variant.startswith(("sharded", "torchrun")):
        sample += ["--shard-size", str(args.shard_size)]
    threads = "2" if variant == "single-2t" else "1"
    sample += ["--threads", threads]
    if variant.startswith("torchrun"):
        launcher = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc-per-node=2",
            "--standalone",
            "-m",
            "fastflow",
            "--",
        ]
    else:
        launcher = [sys.executable, "-m", "fastflow"]
    return launcher + sample, out


def run_once(variant: str, args, work: Path) -> dict:
    cmd, out = command(variant, args, work)
    if out.is_dir():
        shutil.rmtree(out)
    threads = "2" if variant == "single-2t" else "1"
    env = {**os.environ, "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads}
    env.pop("WORLD_SIZE", None)
    started = time.perf_counter()
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    wall = time.perf_counter() - started
    if result.returncode != 0:
        raise RuntimeError(
            f"{variant} failed ({result.returncode}):\n{' '.join(cmd)}\n{result.stderr[-3000:]}"
        )
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    row = {
        "command_seconds": wall,
        "sampling_seconds": summary["seconds"],
        "nfe": summary["nfe"],
        "validity": summary["validity"],
        "kernels": summary["kernels"],
    }
    if out.is_dir():  # sharded: the slowest rank's summed sampler time; the run's wall time from the manifest
        per_rank = {}
        for shard in out.glob("shard-*.json"):
            info = json.loads(shard.read_text())
            per_rank[info["rank"]] = per_rank.get(info["rank"], 0.0) + info["sampling_seconds"]
        row["sampling_seconds"] = max(per_rank.values())
        row["run_wall_seconds"] = json.loads((out / "manifest.json").read_text())["runs"][-1]["wall_seconds"]
    return row


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=64, help="molecules (default 64)")
    parser.add_argument("--steps", type=int, default=20, help="solver steps (default 20)")
    parser.add_argument("--shard-size", type=int, default=32, help="molecules per shard (default 32)")
    parser.add_argument("--batch-size", type=int, default=128, help="molecules per batch (default 128)")
    parser.add_argument(
        "--repeats", type=int, default=3, help="runs per variant, median reported (default 3)"
    )
    parser.add_argument("--config", default=None, help="a random preset instead of the packaged model")
    parser.add_argument("--out", type=Path, default=None, help="results JSON (default bench/results/…)")
    args = parser.parse_args()

    load_before = os.getloadavg()
    rows = {}
    with tempfile.TemporaryDirectory(prefix="bench_sharded_") as tmp:
        for repeat in range(args.repeats):
            for variant in VARIANTS:  # interleaved, so drift in machine load hits every variant alike
                rows.setdefault(variant, []).append(run_once(variant, args, Path(tmp)))
                last = rows[variant][-1]
                print(
                    f"[{repeat + 1}/{args.repeats}] {variant:<13} command {last['command_seconds']:7.2f} s  "
                    f"sampling {last['sampling_seconds']:7.2f} s",
                    file=sys.stderr,
                )
    results = {}
    for variant, runs in rows.items():
        command_s = statistics.median(r["command_seconds"] for r in runs)
        sampling_s = statistics.median(r["sampling_seconds"] for r in runs)
        results[variant] = {
            "command_seconds": command_s,
            "sampling_seconds": sampling_s,
            "command_molecules_per_second": args.n / command_s,
            "sampling_molecules_per_second": args.n / sampling_s,
            "runs": runs,
        }
    derived = {
        "speedup_2x1_over_1x2_command": results["single-2t"]["command_seconds"]
        / results["torchrun-2x1"]["command_seconds"],
        "speedup_2x1_over_1x2_sampling": results["single-2t"]["sampling_seconds"]
        / results["torchrun-2x1"]["sampling_seconds"],
        "sharding_overhead_ms_per_molecule_command": 1e3
        * (results["sharded-1t"]["command_seconds"] - results["single-1t"]["command_seconds"])
        / args.n,
        "sharding_overhead_ms_per_molecule_sampling": 1e3
        * (results["sharded-1t"]["sampling_seconds"] - results["single-1t"]["sampling_seconds"])
        / args.n,
    }
    date = datetime.now(UTC).isoformat(timespec="seconds")
    metadata = {
        "host": platform.node(),
        "date": date,
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "load_average_before": load_before,
        "load_average_after": os.getloadavg(),
        "processor": platform.processor(),
    }
    request = {
        "n": args.n,
        "steps": args.steps,
        "shard_size": args.shard_size,
        "batch_size": args.batch_size,
        "repeats": args.repeats,
        "model": args.config or "packaged",
        "energy": False,
    }
    out = args.out or Path(__file__).parent / "results" / f"sharded-{platform.node()}-{date[:10]}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps(
            {
                "benchmark": "sharded",
                "metadata": metadata,
                "request": request,
                "variants": results,
                "derived": derived,
            },
            indent=1,
        )
    )

    print(f"{'variant':<13} {'command s':>10} {'mol/s':>8} {'sampling s':>11} {'mol/s':>8}")
    for variant, r in results.items():
        print(
            f"{variant:<13} {r['command_seconds']:>10.2f} {r['command_molecules_per_second']:>8.2f} "
            f"{r['sampling_seconds']:>11.2f} {r['sampling_molecules_per_second']:>8.2f}"
        )
    print(
        f"2 processes × 1 thread vs 1 × 2: {derived['speedup_2x1_over_1x2_command']:.2f}x (command), "
        f"{derived['speedup_2x1_over_1x2_sampling']:.2f}x (sampling)"
    )
    print(
        f"sharding overhead: {derived['sharding_overhead_ms_per_molecule_command']:.2f} ms/molecule (command), "
        f"{derived['sharding_overhead_ms_per_molecule_sampling']:.2f} ms/molecule (sampling)"
    )
    print(f"load average before {load_before[0]:.2f}; -> {out}")


if __name__ == "__main__":
    main()
