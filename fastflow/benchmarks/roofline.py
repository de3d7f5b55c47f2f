"""``fastflow bench roofline``: the time each GPU kernel of fastflow would take on an A100 and an H100 if it ran at
the machine's datasheet rate — predicted from FLOPs and bytes, not measured.

Per kernel and benchmark shape:
    flops         minimal FLOPs (2 per multiply-add), split into matmul FLOPs (products with a reduction dimension
                  of at least 16, which tensor cores can take in the bf16 / TF32 variants) and vector FLOPs
                  (always fp32 CUDA cores);
    bytes         compulsory HBM traffic: every input read once, every output written once (weights included;
                  tensors a kernel re-reads, gathered node rows included, are assumed to hit in L2);
    predicted     max(compute, memory) with compute = matmul / rate(precision) + vector / rate(fp32) and
                  memory = bytes / bandwidth: the roofline's lower bound, reached only by a kernel that runs at
                  the peak rate and moves no more than the compulsory bytes. Launch latency (a few µs) is not
                  counted, so the smallest shapes are latency-bound in practice.

Kernels and shapes (those of the benchmarks: ``fastflow bench kernels`` / ``tp``, bench/bench_cache_forecast.py,
bench/bench_discrete_flow_step.py):
    semla_attention      one core layer and the last layer (which writes e' [B, N, N, d_edge]) of the
                         ``semlaflow`` and ``small`` presets at (B, N) = (32, 18), (8, 44), (2, 100);
                         FLOPs from fastflow.ops.semla_attention.semla_attention_flops
    tensor_product,      NequIP convolutions l1, l2, l3 (fastflow.benchmarks.tp) at 2k, 20k and 200k edges,
    tp_conv              N = E / 20 nodes, forward; one multiply-add per (Clebsch–Gordan nonzero, weight index
                         combination) per edge — the direct evaluation the kernels do
    tensor_product       NequIP's self-interaction (64x0e+64x1o+64x2e x 4x0e, uvw with shared weights) at 20k
    (self-interaction)   and 200k rows: the CG contraction t[z, (u, v)] as vector FLOPs, its weight step
                         Σ_(u,v) t W (2 · mul1 · mul2 · mul_out per output component) as matmul FLOPs, which the
                         tf32 / bf16 variants run on tensor cores
    cache_forecast       K = 3 history tensors of the predictive cache's outputs (32 molecules x 29 atoms)
    discrete_flow_step   64 molecules x 23 atoms: atom types (K = 18) and bonds (K = 5 on every ordered pair);
                         about 10 FLOPs per class element (softmax 5, jump weight 3, inverse-CDF draw 2): an
                         estimate, the kernel is memory-bound by far
"""

from __future__ import annotations

import argparse
import json
from datetime import UTC, datetime
from pathlib import Path

from fastflow.benchmarks.kernels import CASES, layer_op_inputs
from fastflow.models import SemlaConfig
from fastflow.ops.semla_attention import ARGUMENTS, semla_attention_flops

RESULTS_DIR = Path(__file__).resolve().parents[2] / "bench" / "results"

# Dense (no structured sparsity) peak rates in FLOP/s and HBM bandwidth in bytes/s, from NVIDIA's datasheets:
# - A100 SXM4 80GB: "NVIDIA A100 Tensor Core GPU" datasheet (nvidia-a100-datasheet-us-nvidia-1758950-r4-web,
#   2021): FP32 19.5 TFLOPS, TF32 Tensor Core 156 TFLOPS (312 with sparsity), BF16 Tensor Core 312 TFLOPS (624
#   with sparsity), GPU memory bandwidth 2,039 GB/s.
# - H100 SXM5 80GB: "NVIDIA H100 Tensor Core GPU" datasheet (nvidia-h100-datasheet, 2023): FP32 67 TFLOPS, TF32
#   Tensor Core 989 TFLOPS and BF16 Tensor Core 1,979 TFLOPS *with sparsity* (so 494.5 and 989.5 dense), GPU
#   memory bandwidth 3.35 TB/s.
GPUS = {
    "A100-SXM4-80GB": {"fp32": 19.5e12, "tf32": 156e12, "bf16": 312e12, "bandwidth": 2.039e12},
    "H100-SXM5-80GB": {"fp32": 67e12, "tf32": 494.5e12, "bf16": 989.5e12, "bandwidth": 3.35e12},
}
PRECISIONS = ("fp32", "tf32", "bf16")
FLOAT = 4  # bytes: every benchmark runs float32 tensors


def predicted_seconds(row: dict, gpu: dict, precision: str) -> float:
    """The roofline bound of one row (see the module docstring) on ``gpu`` with its matmuls in ``precision``."""
    compute = row["matmul_flops"] / gpu[precision] + row["vector_flops"] / gpu["fp32"]
    return max(compute, row["bytes"] / gpu["bandwidth"])


def _row(
    kernel: str, case: str, matmul_flops: int, vector_flops: int, nbytes: int, tensor_cores: bool
) -> dict:
    row = {
        "kernel": kernel,
        "case": case,
        "flops": matmul_flops + vector_flops,
        "matmul_flops": matmul_flops,
        "vector_flops": vector_flops,
        "bytes": nbytes,
        "intensity": (matmul_flops + vector_flops) / nbytes,
        "predicted_us": {},
    }
    # Only kernels with bf16 / TF32 variants get those predictions; the rest run fp32 on CUDA cores.
    for name, gpu in GPUS.items():
        row["predicted_us"][name] = {
            p: 1e6 * predicted_seconds(row, gpu, p) for p in (PRECISIONS if tensor_cores else ("fp32",))
        }
        compute = matmul_flops / gpu["fp32"] + vector_flops / gpu["fp32"]
        row.setdefault("bound", {})[name] = "memory" if nbytes / gpu["bandwidth"] >= compute else "compute"
    return row


def semla_attention_rows() -> list[dict]:
    rows = []
    for preset in ("semlaflow", "small"):
        config = SemlaConfig.preset(preset)
        for layer in ("core", "last"):
            for B, N in CASES:
                args = layer_op_inputs(config, B, N)
                H, d_head = args["values"].shape[2:]
                P, F = args["attn_coords"].size(1), args["node_terms_i"].size(2)
                E_out = config.d_edge if layer == "last" else 0
                if E_out:  # the last layer's z carries e' too: H + P + d_edge output rows
                    args["out_weight"] = args["out_weight"].new_empty(H + P + E_out, F)
                    args["out_bias"] = args["out_bias"].new_empty(H + P + E_out)
                flops = semla_attention_flops(
                    *(args[name].shape if name in args else None for name in ARGUMENTS)
                )
                S = args["gram_coords"].size(1)
                # The hidden layer's Gram term (K = S) and the output linear (K = F) are the matmuls.
                matmul = 2 * B * N * N * (S * F + F * (H + P + E_out))
                inputs = sum(t.numel() * t.element_size() for t in args.values())  # adjacency: 1 byte
                outputs = FLOAT * (B * N * H * d_head + B * N * P * 3 + B * N * N * E_out)
                case = f"{preset} {layer} B={B} N={N}"
                rows.append(_row("semla_attention", case, matmul, flops - matmul, inputs + outputs, True))
    return rows


def tensor_product_rows() -> list[dict]:
    """NequIP convolutions of ``fastflow bench tp``; none without e3nn (its modules define the products)."""
    try:
        from fastflow.benchmarks.tp import CONFIGS, EDGES, nequip_tensor_product
    except ImportError:
        return []
    from fastflow.tp.descriptor import MODES, TPDescriptor

    rows = []
    for config, (irreps, lmax) in CONFIGS.items():
        try:
            descriptor = TPDescriptor.from_module(nequip_tensor_product(irreps, lmax))
        except ImportError:
            return []
        paths, _, _, cg_offsets = descriptor.tensors()
        per_edge = 0
        for path, nnz in zip(paths.tolist(), cg_offsets.diff().tolist()):
            mul1, mul2, mul_out = path[2], path[5], path[8]
            combos = {
                "uvw": mul1 * mul2 * mul_out,
                "uvu": mul1 * mul2,
                "uvv": mul1 * mul2,
                "uuw": mul1 * mul_out,
                "uuu": mul1,
            }[MODES[path[0]]]
            per_edge += 2 * nnz * combos
        d1, d2, d_out, n_weights = (
            descriptor.dim_in1,
            descriptor.dim_in2,
            descriptor.dim_out,
            descriptor.weight_numel,
        )
        for E in EDGES:
            N = E // 20
            edge_rows = FLOAT * E * (d2 + n_weights)
            rows.append(
                _row(
                    "tensor_product",
                    f"{config} E={E}",
                    0,
                    E * per_edge,
                    edge_rows + FLOAT * E * (d1 + d_out),
                    False,
                )
            )
            conv_bytes = edge_rows + FLOAT * N * (d1 + d_out) + 2 * 8 * E  # + int64 source and destination
            rows.append(_row("tp_conv", f"{config} E={E} N={N}", 0, E * per_edge, conv_bytes, False))
    return rows


def cache_forecast_rows(K: int = 3) -> list[dict]:
    B, N = 32, 29
    rows = []
    for name, numel in (
        ("coords [B,N,3]", B * N * 3),
        ("bonds [B,N,N,5]", B * N * N * 5),
        ("block features [B,N,384]", B * N * 384),
    ):
        rows.append(_row("cache_forecast", f"{name} K={K}", 0, 2 * K * numel, FLOAT * (K + 1) * numel, False))
    return rows


def discrete_flow_step_rows() -> list[dict]:
    B, N = 64, 23
    rows = []
    for name, elements, K in (("atom types", B * N, 18), ("bonds", B * N * N, 5)):
        # logits and one-hot classes read, probabilities and next one-hot written; mask, t and keys per molecule
        nbytes = 4 * FLOAT * elements * K + B * N + B * (FLOAT + 8)
        rows.append(
            _row("discrete_flow_step", f"{name} B={B} N={N} K={K}", 0, 10 * elements * K, nbytes, False)
        )
    return rows


def self_interaction_rows(irreps: str = "64x0e+64x1o+64x2e", species: int = 4) -> list[dict]:
    from fastflow.benchmarks.gpu_static import fully_connected_descriptor

    descriptor = fully_connected_descriptor(irreps, f"{species}x0e")
    paths, _, _, cg_offsets = descriptor.tensors()
    contraction = weights = 0  # FLOPs per row
    for path, nnz in zip(paths.tolist(), cg_offsets.diff().tolist()):
        mul1, mul2, mul_out, d_out = path[2], path[5], path[8], path[9]
        contraction += 2 * nnz * mul1 * mul2
        weights += 2 * d_out * mul1 * mul2 * mul_out
    rows = []
    for Z in (20_000, 200_000):
        nbytes = FLOAT * (
            Z * (descriptor.dim_in1 + descriptor.dim_in2 + descriptor.dim_out) + descriptor.weight_numel
        )
        case = f"self-interaction Z={Z}"
        rows.append(_row("tensor_product", case, Z * weights, Z * contraction, nbytes, True))
    return rows


def roofline() -> list[dict]:
    return (
        semla_attention_rows()
        + tensor_product_rows()
        + self_interaction_rows()
        + cache_forecast_rows()
        + discrete_flow_step_rows()
    )


def print_table(rows: list[dict]) -> None:
    print("Predicted, not measured: roofline bound from datasheet peaks (bound: memory or compute at fp32)")
    header = f"{'kernel':<19} {'case':<30} {'MFLOP':>9} {'MB':>8} {'FLOP/B':>7}"
    for name in GPUS:
        short = name.split("-")[0]
        header += f" {short + ' fp32 us':>13} {'tf32':>7} {'bf16':>7} {'bound':>7}"
    print(header)
    for row in rows:
        line = f"{row['kernel']:<19} {row['case']:<30} {row['flops'] / 1e6:>9.1f} {row['bytes'] / 1e6:>8.2f}"
        line += f" {row['intensity']:>7.1f}"
        for name in GPUS:
            times = row["predicted_us"][name]
            line += f" {times['fp32']:>13.2f}"
            line += "".join(f" {times[p]:>7.2f}" if p in times else f" {'-':>7}" for p in ("tf32", "bf16"))
            line += f" {row['bound'][name]:>7}"
        print(line)


def default_out(results_dir: Path = RESULTS_DIR) -> Path:
    return Path(results_dir) / f"roofline-{datetime.now(UTC).date().isoformat()}.json"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--json",
        type=Path,
        default=None,
        help="write the rows here (default bench/results/roofline-<date>.json)",
    )


def run(args) -> int:
    rows = roofline()
    print_table(rows)
    out = args.json or default_out()
    out.parent.mkdir(parents=True, exist_ok=True)
    results = {
        "benchmark": "roofline",
        "predicted_not_measured": True,
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "gpus": GPUS,
        "rows": rows,
    }
    out.write_text(json.dumps(results, indent=1) + "\n")
    print(f"-> {out}")
    return 0
