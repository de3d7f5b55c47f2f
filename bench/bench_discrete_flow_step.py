"""fastflow::discrete_flow_step (C++) against its PyTorch reference: median ms per call, one thread.

    .venv/bin/python bench/bench_discrete_flow_step.py [--repeats 20] [--json out.json]

One solver step's discrete update of a QM9-sized batch (64 molecules × 23 atoms: 18 atom classes, 5 bond classes
on every ordered pair), as the sampler calls it twice per step. The draws are compared too (they must agree).
"""

from __future__ import annotations

import argparse
import importlib
import json
import statistics
import time
from functools import partial

import torch

from fastflow import rng
from fastflow.benchmarks.timing import machine_header, machine_metadata
from fastflow.runtime import retain_freed_buffers

op = importlib.import_module("fastflow.ops.discrete_flow_step")


def case(B: int, N: int, K: int, pairs: bool, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    shape = (B, N, N, K) if pairs else (B, N, K)
    logits = torch.randn(shape, generator=g) * 3
    current = torch.nn.functional.one_hot(torch.randint(0, K, shape[:-1], generator=g), K).float()
    mask = torch.arange(N)[None] < torch.randint(1, N + 1, (B,), generator=g)[:, None]
    keys = rng.molecule_keys(seed, torch.arange(B))
    stream = rng.STEP_BONDS if pairs else rng.STEP_ATOMS
    return logits, current, mask, torch.rand(B, generator=g), keys, 5, stream, 0.01, 1.0


def median_ms(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)
    retain_freed_buffers()
    machine = machine_metadata()
    print(machine_header(machine))
    rows = []
    for name, K, pairs in (("atom types", 18, False), ("bonds", 5, True)):
        inputs = case(64, 23, K, pairs)
        reference = median_ms(partial(op.discrete_flow_step, *inputs, backend="reference"), args.repeats)
        fused = median_ms(partial(op.discrete_flow_step, *inputs, backend="cpp"), args.repeats)
        same = torch.equal(
            op.discrete_flow_step(*inputs, backend="reference")[1],
            op.discrete_flow_step(*inputs, backend="cpp")[1],
        )
        rows.append(
            {
                "what": name,
                "shape": list(inputs[0].shape),
                "reference_ms": reference,
                "cpp_ms": fused,
                "speedup": reference / fused,
                "same_draws": same,
            }
        )
        print(
            f"{name:>10} {str(list(inputs[0].shape)):>18}  reference {reference:7.2f} ms  cpp {fused:6.2f} ms  "
            f"{reference / fused:5.1f}x  same draws: {same}"
        )
    if args.json:
        with open(args.json, "w") as file:
            json.dump({"machine": machine, "rows": rows}, file, indent=1)


if __name__ == "__main__":
    main()
