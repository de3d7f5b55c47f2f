"""``fastflow bench precision``: bf16 on the matrix engines against fp32, measured side by side in one run.

- op: ``fastflow::semla_attention`` at the config's core-layer shapes, fp32 vs bf16 (C++), with the bf16 op's
  GFLOP/s on minimal FLOPs set against the machine's measured bf16 matmul rate;
- forward: the whole generator, fused fp32 vs fused bf16 vs ``torch.autocast(bfloat16)`` around the unpatched
  reference (vs ``torch.compile`` of the fused fp32 model with ``--compile``), and each output's max error
  against the fused fp32 model (max|out - fp32| / max|fp32|);
- sampling (the quality gate): the packaged model, fp32 vs bf16, without and with the cache (Taylor-2, D = 2):
  molecules/s, SemlaFlow's metrics with MMFF energy and strain, and how many molecules have exactly the graph
  their fp32 twin has (same seed, same noise: differences come from bf16 rounding).

Times are medians of interleaved repeats after warm-up; the machine header gives the ISA and the measured fp32 and
bf16 GEMM rates, so the ratios can be read on another CPU.
"""

from __future__ import annotations

import argparse
import copy
import json
from functools import partial
from pathlib import Path

import torch

from fastflow.benchmarks.kernels import OUTPUTS, _same_graph, layer_op_inputs, print_table, random_inputs
from fastflow.benchmarks.timing import machine_header, machine_metadata, median_seconds
from fastflow.models import Semla, SemlaConfig
from fastflow.ops.semla_attention import ARGUMENTS, semla_attention, semla_attention_flops
from fastflow.patch import patch_model

CASES = [(32, 18), (8, 44), (2, 100)]
GATE_METRICS = ("validity", "mol_stability", "atom_stability", "energy_per_atom", "strain_per_atom")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--presets", nargs="+", default=["semlaflow", "small"], help="model configs")
    parser.add_argument(
        "--parts",
        nargs="+",
        choices=("op", "forward", "sampling"),
        default=["op", "forward", "sampling"],
        help="what to measure (default all)",
    )
    parser.add_argument("--repeats", type=int, default=5, help="timed repeats per variant (default 5)")
    parser.add_argument(
        "--compile", action="store_true", help="also time torch.compile of the fused fp32 model"
    )
    parser.add_argument("--n", type=int, default=1000, help="molecules of the quality gate (default 1000)")
    parser.add_argument("--steps", type=int, default=100, help="solver steps of the gate (default 100)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the gate (default 0)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON here")


def bench_op(config: SemlaConfig, repeats: int, bf16_gflops: float) -> list[dict]:
    rows = []
    for B, N in CASES:
        args = layer_op_inputs(config, B, N)
        variants = {p: partial(semla_attention, **args, backend="cpp", precision=p) for p in ("fp32", "bf16")}
        with torch.inference_mode():
            times = median_seconds(variants, repeats)
            error = _max_errors(variants["bf16"](), variants["fp32"]())
        flops = semla_attention_flops(
            *(None if args.get(name) is None else args[name].shape for name in ARGUMENTS)
        )
        gflops = flops / times["bf16"] / 1e9
        rows.append(
            {
                "preset": config.name,
                "B": B,
                "N": N,
                "fp32_ms": times["fp32"] * 1e3,
                "bf16_ms": times["bf16"] * 1e3,
                "speedup": times["fp32"] / times["bf16"],
                "bf16_gflops": gflops,
                "of_bf16_gemm_rate": gflops / bf16_gflops,
                "max_rel_error": max(error.values()),
            }
        )
    return rows


def bench_forward(config: SemlaConfig, repeats: int, compile_fused: bool) -> list[dict]:
    reference = Semla(config).eval()
    fp32, bf16 = copy.deepcopy(reference), copy.deepcopy(reference)
    patch_model(fp32, kernels="cpp")
    patch_model(bf16, kernels="cpp", precision="bf16")
    rows = []
    for B, N in CASES:
        if N >= config.max_atoms:
            continue
        inputs = random_inputs(config, B, N)
        variants = {
            "fp32 fused": partial(fp32, **inputs),
            "bf16 fused": partial(bf16, **inputs),
            "autocast reference": partial(_autocast, reference, inputs),
        }
        if compile_fused:
            variants["compiled fp32 fused"] = partial(torch.compile(fp32), **inputs)
        with torch.inference_mode():
            times = median_seconds(variants, repeats)
            expected = variants["fp32 fused"]()
            errors = {
                name: _max_errors(variants[name](), expected) for name in ("bf16 fused", "autocast reference")
            }
        row = {"preset": config.name, "B": B, "N": N}
        row.update({f"{name} ms": t * 1e3 for name, t in times.items()})
        row["bf16 speedup"] = times["fp32 fused"] / times["bf16 fused"]
        row["autocast speedup"] = times["fp32 fused"] / times["autocast reference"]
        row["bf16 errors"] = errors["bf16 fused"]
        row["autocast errors"] = errors["autocast reference"]
        rows.append(row)
    return rows


def bench_sampling(n: int, steps: int, seed: int) -> list[dict]:
    from fastflow.cache import CacheConfig
    from fastflow.metrics import compute_metrics
    from fastflow.pretrained import load_pretrained
    from fastflow.sampling import sample

    rows, fp32_runs = [], {}
    for cache in (None, CacheConfig(interval=2)):
        for precision in ("fp32", "bf16"):
            model = load_pretrained()
            handle = patch_model(model, kernels="cpp", cache=cache, precision=precision)
            result = sample(
                model, n, steps=steps, seed=seed, size_distribution=model.size_counts, kernels="cpp"
            )
            metrics = compute_metrics(result.graphs, energy=True)
            row = {
                "precision": precision,
                "cache": "none" if cache is None else "taylor-2, D=2",
                "molecules": n,
                "steps": steps,
                "nfe": result.stats["nfe"],
                "cache_hit_rate": handle.stats().get("hit_rate", 0.0),
                "molecules_per_second": result.stats["molecules_per_second"],
                **{
                    key: metrics[key] for key in (*GATE_METRICS, "energy_per_atom_sem", "strain_per_atom_sem")
                },
            }
            if precision == "fp32":
                fp32_runs[row["cache"]] = (result, row)
            else:
                twin, twin_row = fp32_runs[row["cache"]]
                row["same_graph_as_fp32"] = (
                    sum(_same_graph(a, b) for a, b in zip(result.graphs, twin.graphs)) / n
                )
                row["speedup"] = row["molecules_per_second"] / twin_row["molecules_per_second"]
            rows.append(row)
    return rows


def _autocast(model, inputs):
    with torch.autocast("cpu", dtype=torch.bfloat16):
        return tuple(t.float() for t in model(**inputs))


def _max_errors(outputs, expected) -> dict:
    names = OUTPUTS if len(outputs) == len(OUTPUTS) else [f"out{i}" for i in range(len(outputs))]
    return {
        name: ((a.float() - b).abs().max() / b.abs().max()).item()
        for name, a, b in zip(names, outputs, expected)
        if b.numel()
    }


def run(args) -> int:
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    metadata = machine_metadata()
    print(machine_header(metadata))
    results = {"machine": metadata, "op": [], "forward": [], "sampling": []}
    for preset in args.presets:
        config = SemlaConfig.preset(preset)
        if "op" in args.parts:
            rows = bench_op(config, args.repeats, metadata["gemm_gflops"]["bf16"])
            results["op"] += rows
            print_table(
                f"fastflow::semla_attention, {preset}: fp32 vs bf16 (C++)",
                rows,
                [
                    "B",
                    "N",
                    "fp32_ms",
                    "bf16_ms",
                    "speedup",
                    "bf16_gflops",
                    "of_bf16_gemm_rate",
                    "max_rel_error",
                ],
            )
        if "forward" in args.parts:
            rows = bench_forward(config, args.repeats, args.compile)
            results["forward"] += rows
            timing = [key for key in rows[0] if key.endswith(" ms") or key.endswith("speedup")]
            print_table(f"forward, {preset}", rows, ["B", "N", *timing])
            for row in rows:
                for kind in ("bf16", "autocast"):
                    cells = ", ".join(f"{k} {v:.1e}" for k, v in row[f"{kind} errors"].items())
                    print(f"  {row['B']} x {row['N']} {kind} max error vs fp32 fused: {cells}")
    if "sampling" in args.parts:
        rows = bench_sampling(args.n, args.steps, args.seed)
        results["sampling"] = rows
        print_table(
            f"quality gate: packaged model, {args.n} molecules x {args.steps} steps, seed {args.seed}",
            rows,
            [
                "precision",
                "cache",
                "molecules_per_second",
                *GATE_METRICS,
                "same_graph_as_fp32",
                "speedup",
            ],
        )
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=1))
        print(f"\nwrote {args.out}")
    return 0
