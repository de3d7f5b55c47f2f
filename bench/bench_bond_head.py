"""fastflow::bond_head (C++) against its PyTorch reference: median ms, speed-up and peak memory, one thread.

    .venv/bin/python bench/bench_bond_head.py [--repeats 7] [--dtype float32] [--json out.json]

Times are medians of interleaved repeats after warm-up: wall time, and the calling thread's CPU time (robust on a
shared machine: with one intra-op thread the whole op runs on the calling thread). The C heap keeps freed buffers
as fastflow's command line sets it (fastflow.runtime.retain_freed_buffers; the reference's pair tensors would
otherwise page-fault on every call); --default-heap leaves glibc's default.

Widths from the presets: E = d_edge, F = BondRefine's hidden width (its d_ff = d_message), head hidden G = E,
K = n_edge_types. Peak memory: live bytes allocated by torch's allocator during the call (inputs and weights
excluded, the output included), fastflow.benchmarks.timing.peak_allocated_bytes; MKL's internal buffers and the
kernel's std::vector plans are not counted.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from functools import partial

import torch

from fastflow.benchmarks.timing import peak_allocated_bytes
from fastflow.models import SemlaConfig
from fastflow.ops.bond_head import bond_head, bond_head_reference
from fastflow.runtime import heap_setting, retain_freed_buffers

SHAPES = ((64, 24), (8, 44), (2, 100))


def random_args(config: SemlaConfig, B: int, N: int, dtype, seed: int = 0):
    E, F, G, K = config.d_edge, config.d_message, config.d_edge, config.n_edge_types
    generator = torch.Generator().manual_seed(seed)

    def randn(*shape, scale=1.0, shift=0.0):
        return (torch.randn(shape, generator=generator, dtype=torch.float64) * scale + shift).to(dtype)

    return dict(
        edge_feats=randn(B, N, N, E),
        bond_norm_weight=randn(E, scale=0.1, shift=1),
        bond_norm_bias=randn(E, scale=0.1),
        head_weight1=randn(G, E, scale=E**-0.5),
        head_bias1=randn(G, scale=0.1),
        head_weight2=randn(K, G, scale=G**-0.5),
        head_bias2=randn(K, scale=0.1),
        node_terms_i=randn(B, N, F),
        node_terms_j=randn(B, N, F),
        coords=randn(B, N, 3),
        edge_norm_weight=randn(E, scale=0.1, shift=1),
        edge_norm_bias=randn(E, scale=0.1),
        edge_weight=randn(F, E, scale=E**-0.5),
        dist_weight=randn(F, scale=0.1),
        dot_weight=randn(F, scale=0.1),
        refine_weight=randn(E, F, scale=F**-0.5),
        refine_bias=randn(E, scale=0.1),
    )


def median_times(fns: dict, repeats: int, warmup: int = 2) -> dict:
    """{name: (median wall seconds, median thread CPU seconds)}, repeats interleaved."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    wall, cpu = {name: [] for name in fns}, {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start, start_cpu = time.perf_counter(), time.thread_time()
            fn()
            cpu[name].append(time.thread_time() - start_cpu)
            wall[name].append(time.perf_counter() - start)
    return {name: (statistics.median(wall[name]), statistics.median(cpu[name])) for name in fns}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--dtype", default="float32", choices=("float32", "float64"))
    parser.add_argument("--presets", nargs="+", default=["small", "semlaflow"])
    parser.add_argument("--json", default=None)
    parser.add_argument(
        "--default-heap", action="store_true", help="leave glibc's heap thresholds as they are"
    )
    args = parser.parse_args()
    if not args.default_heap:
        retain_freed_buffers()
    torch.set_num_threads(1)
    dtype = getattr(torch, args.dtype)
    rows = []
    print(f"# bond_head, {args.dtype}, 1 thread, medians of {args.repeats}; heap: {heap_setting()}")
    print(
        f"{'preset':>10} {'B':>3} {'N':>4}  {'ref ms':>8} {'cpp ms':>8} {'speed-up':>8}  {'ref cpu ms':>10} "
        f"{'cpp cpu ms':>10} {'speed-up':>8}  {'ref peak MiB':>12} {'cpp peak MiB':>12}  {'max rel err':>11}"
    )
    for preset in args.presets:
        config = SemlaConfig.preset(preset)
        for B, N in SHAPES:
            kwargs = random_args(config, B, N, dtype)
            with torch.no_grad():
                fns = {
                    "reference": partial(bond_head_reference, **kwargs),
                    "cpp": partial(bond_head, **kwargs, backend="cpp"),
                }
                times = median_times(fns, args.repeats)
                peaks = {name: peak_allocated_bytes(fn) for name, fn in fns.items()}
                ref, out = fns["reference"](), fns["cpp"]()
            error = ((out - ref).abs().max() / ref.abs().max()).item()
            row = {
                "heap": heap_setting(),
                "preset": preset,
                "B": B,
                "N": N,
                "E": config.d_edge,
                "F": config.d_message,
                "dtype": args.dtype,
                "ms": {k: v[0] * 1e3 for k, v in times.items()},
                "cpu_ms": {k: v[1] * 1e3 for k, v in times.items()},
                "peak_bytes": peaks,
                "max_rel_error": error,
            }
            row["speedup"] = row["ms"]["reference"] / row["ms"]["cpp"]
            row["cpu_speedup"] = row["cpu_ms"]["reference"] / row["cpu_ms"]["cpp"]
            rows.append(row)
            print(
                f"{preset:>10} {B:>3} {N:>4}  {row['ms']['reference']:8.2f} {row['ms']['cpp']:8.2f} "
                f"{row['speedup']:7.2f}x  {row['cpu_ms']['reference']:10.2f} {row['cpu_ms']['cpp']:10.2f} "
                f"{row['cpu_speedup']:7.2f}x  {peaks['reference'] / 2**20:12.2f} {peaks['cpp'] / 2**20:12.2f}  "
                f"{error:11.2e}",
                flush=True,
            )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
