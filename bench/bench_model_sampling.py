"""End-to-end sampling of one model folder, reference path against fused kernels: seconds, molecules/s, speed-up.

    .venv/bin/python bench/bench_model_sampling.py DIR [--n 64] [--steps 10] [--repeats 2] [--json out.json]

DIR is a model folder as `fastflow train --export` writes it (or a packaged model's name, e.g. qm9-small). For
a model still in training, export its checkpoint first (`fastflow train --out RUN --export DIR`). Sizes come
from the model's training-set histogram; the reference (unpatched model, reference solver step) and the fused
(`patch_model`, C++ solver step) runs alternate, and each variant reports its median sampling time. One thread.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch

import fastflow
from fastflow.benchmarks.timing import machine_header, machine_metadata
from fastflow.pretrained import load_pretrained_dir
from fastflow.runtime import retain_freed_buffers

VARIANTS = ("reference", "cpp")


def load(model: str):
    return load_pretrained_dir(Path(model)) if Path(model).is_dir() else fastflow.load_pretrained(model)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", help="model folder (fastflow train --export) or packaged model name")
    parser.add_argument("--n", type=int, default=64, help="molecules per run")
    parser.add_argument("--steps", type=int, default=10, help="solver steps")
    parser.add_argument("--repeats", type=int, default=2, help="runs per variant, interleaved")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()
    torch.set_num_threads(1)
    retain_freed_buffers()
    metadata = machine_metadata()
    print(machine_header(metadata))

    seconds: dict[str, list[float]] = {variant: [] for variant in VARIANTS}
    sizes = None
    for _ in range(args.repeats):
        for variant in VARIANTS:
            model = load(args.model)
            if variant != "reference":
                fastflow.patch_model(model, kernels=variant)
            result = fastflow.sample(
                model,
                args.n,
                steps=args.steps,
                seed=args.seed,
                size_distribution=model.size_counts,
                kernels=variant,
                progress=False,
            )
            seconds[variant].append(result.stats["sampling_seconds"])
            if sizes is None:
                sizes = result.sizes
            elif sizes != result.sizes:
                raise RuntimeError("the variants sampled different molecule sizes")
    rows = []
    reference = statistics.median(seconds["reference"])
    print(f"\n{args.n} molecules x {args.steps} steps, {statistics.mean(sizes):.1f} atoms on average")
    print(f"{'kernels':>10} {'seconds':>9} {'molecules/s':>12} {'speed-up':>9}")
    for variant in VARIANTS:
        median = statistics.median(seconds[variant])
        rows.append(
            {
                "kernels": variant,
                "seconds": median,
                "all_seconds": seconds[variant],
                "molecules_per_second": args.n / median,
                "speedup": reference / median,
            }
        )
        print(f"{variant:>10} {median:9.2f} {args.n / median:12.2f} {reference / median:8.2f}x")
    if args.json:
        report = {
            "machine": metadata,
            "model": args.model,
            "n": args.n,
            "steps": args.steps,
            "mean_atoms": statistics.mean(sizes),
            "rows": rows,
        }
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
        print(f"\n-> {args.json}")


if __name__ == "__main__":
    main()
