"""`fastflow bench roofline`: FLOPs and bytes per kernel and shape, and the predicted (not measured) GPU times."""

import json

import pytest

from fastflow.benchmarks import roofline
from fastflow.cli import main


def row(rows, kernel, case):
    return next(r for r in rows if r["kernel"] == kernel and r["case"] == case)


def test_predicted_time_is_the_larger_of_compute_and_memory():
    a100 = roofline.GPUS["A100-SXM4-80GB"]
    compute_bound = {"matmul_flops": 312e12, "vector_flops": 19.5e12, "bytes": 1}
    # bf16 matmuls at 312 TFLOP/s (1 s) plus the vector FLOPs at the fp32 rate (1 s)
    assert roofline.predicted_seconds(compute_bound, a100, "bf16") == pytest.approx(2.0)
    assert roofline.predicted_seconds(compute_bound, a100, "fp32") == pytest.approx(312 / 19.5 + 1)
    memory_bound = {"matmul_flops": 0, "vector_flops": 1, "bytes": 2.039e12}
    assert roofline.predicted_seconds(memory_bound, a100, "fp32") == pytest.approx(1.0)


def test_semla_attention_counts_by_hand():
    # semlaflow core layer, 32 molecules x 18 atoms: F = 128, S = P = 64, H = 32, d_head = 12, no edge channels
    r = row(roofline.semla_attention_rows(), "semla_attention", "semlaflow core B=32 N=18")
    B, N, F, S, H, d = 32, 18, 128, 64, 32, 12
    pairs = B * N * N
    assert r["matmul_flops"] == 2 * pairs * (S * F + F * (H + S))
    assert r["vector_flops"] == 2 * pairs * (3 * S + H * d + 3 * S)
    inputs = (
        4 * (2 * B * N * F + 2 * B * S * N * 3 + F * S + (H + S) * F + (H + S) + B * N * H * d) + B * N * N
    )
    outputs = 4 * (B * N * H * d + B * N * S * 3)
    assert r["bytes"] == inputs + outputs
    assert set(r["predicted_us"]["H100-SXM5-80GB"]) == {"fp32", "tf32", "bf16"}


def test_tensor_product_flops_from_e3nn_clebsch_gordan():
    """Independently of fastflow's descriptor: every uvu instruction of the l1 convolution costs one multiply-add
    per nonzero of e3nn's Wigner 3j symbol per (u, v), v over the single copy of each harmonic."""
    o3 = pytest.importorskip("e3nn.o3")
    from fastflow.benchmarks.tp import nequip_tensor_product

    tp = nequip_tensor_product("32x0e+32x1o", 2)
    per_edge = 0
    for ins in tp.instructions:
        (mul1, ir1), (mul2, ir2), (_, ir_out) = (
            tp.irreps_in1[ins.i_in1],
            tp.irreps_in2[ins.i_in2],
            tp.irreps_out[ins.i_out],
        )
        nonzeros = int((o3.wigner_3j(ir1.l, ir2.l, ir_out.l).abs() > 1e-10).sum())
        per_edge += 2 * nonzeros * mul1 * mul2
    r = row(roofline.tensor_product_rows(), "tp_conv", "l1 E=20000 N=1000")
    assert r["flops"] == 20000 * per_edge and r["matmul_flops"] == 0
    assert set(r["predicted_us"]["A100-SXM4-80GB"]) == {"fp32"}


def test_cli_writes_json(tmp_path, capsys):
    out = tmp_path / "roofline.json"
    assert main(["bench", "roofline", "--json", str(out)]) == 0
    assert "Predicted, not measured" in capsys.readouterr().out
    results = json.loads(out.read_text())
    assert results["predicted_not_measured"] is True
    kernels = {r["kernel"] for r in results["rows"]}
    assert {"semla_attention", "cache_forecast", "discrete_flow_step"} <= kernels
    for r in results["rows"]:
        for gpu, times in r["predicted_us"].items():
            rates = results["gpus"][gpu]
            assert times["fp32"] >= 1e6 * r["bytes"] / rates["bandwidth"] * (1 - 1e-9)


def test_self_interaction_counts_by_hand():
    # 64x0e+64x1o+64x2e x 4x0e: three uvw paths (l x 0e -> l), d = 1, 3, 5 CG nonzeros and output components each
    r = row(roofline.self_interaction_rows(), "tensor_product", "self-interaction Z=20000")
    Z, u, v, w, d = 20_000, 64, 4, 64, 1 + 3 + 5
    assert r["matmul_flops"] == Z * 2 * d * u * v * w  # the weight step: tensor cores in tf32 / bf16
    assert r["vector_flops"] == Z * 2 * d * u * v  # the CG contraction
    assert r["bytes"] == 4 * (Z * (d * 64 + 4 + d * 64) + 3 * u * v * w)
    times = r["predicted_us"]["A100-SXM4-80GB"]
    assert times["tf32"] < times["fp32"] / 5
