"""bench/gpu_check.py end to end on CPU under Triton's interpreter (tiny shapes), so that the first run on a GPU
does not die on a typo: every correctness check passes (or is skipped with the reason: an op without a GPU
kernel), and every benchmark section produces rows."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def test_gpu_check_runs_under_the_interpreter(tmp_path):
    pytest.importorskip("triton")
    pytest.importorskip("e3nn")
    out = tmp_path / "gpu_check.json"
    env = {**os.environ, "TRITON_INTERPRET": "1", "OMP_NUM_THREADS": "1"}
    command = [sys.executable, str(REPO / "bench" / "gpu_check.py"), "--device", "cpu", "--tiny"]
    # torch.compile's eager backend: the compiled rows are traced by dynamo without inductor's C++ builds
    command += ["--compile-backend", "eager", "--json", str(out)]
    run = subprocess.run(command, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert out.exists(), run.stderr[-3000:]
    results = json.loads(out.read_text())

    failed = {
        row["check"]: row.get("error", row.get("max_rel_error"))
        for row in results["correctness"]
        if row["ok"] is False
    }
    assert not failed, failed
    checks = {row["check"] for row in results["correctness"]}
    for variant in ("core", "edge_in", "embed", "edge_out"):
        assert {f"semla_attention {variant} {p}" for p in ("fp32", "bf16", "tf32")} <= checks
    assert {
        "cache_forecast K=3",
        "discrete_flow_step bonds",
        "tp_conv l3 gradients",
        "patched Semla 'tiny'",
    } <= checks
    skipped = {row["check"]: row["skipped"] for row in results["correctness"] if row["ok"] is None}
    assert {f"tensor_product self-interaction {p}" for p in ("fp32", "tf32", "bf16")} <= checks
    assert {"bond_head tf32", "bond_head bf16"} <= checks
    # Skipped may be: an op without a Triton kernel, and the bf16 dots, which Triton's interpreter gets wrong.
    bf16 = {f"semla_attention {variant} bf16" for variant in ("core", "edge_in", "embed", "edge_out")}
    bf16 |= {"tensor_product self-interaction bf16", "bond_head bf16"}
    assert set(skipped) <= {"bond_head"} | bf16, skipped
    assert all("TRITON_INTERPRET" in skipped[name] for name in bf16 & set(skipped))

    benchmarks = results["benchmarks"]
    errors = {section: rows[0]["error"] for section, rows in benchmarks.items() if "error" in rows[0]}
    assert not errors, errors
    assert benchmarks["semla_attention, one core layer"][0]["triton_ms"] > 0
    assert benchmarks["semla_attention, one core layer"][0]["compiled_ms"] > 0
    assert {row["op"] for row in benchmarks["tensor products (speedups vs e3nn)"]} == {
        "tensor_product",
        "tp_conv",
    }
    assert benchmarks["self-interaction tensor product by precision"][0]["triton_tf32_ms"] > 0
    sampling = benchmarks["sampling, packaged model"]
    assert [row["kernels"] for row in sampling] == ["reference", "triton"] * 2
    assert all(0 <= row["same_graphs"] <= 2 for row in sampling if row["kernels"] == "triton")
    assert results["ok"] is True and run.returncode == 0, run.stdout[-3000:]
