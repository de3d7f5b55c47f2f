"""peak_allocated_bytes (the peak of live bytes from torch's CPU allocator during a call, C++ ops included) and
`fastflow bench kernels` end to end."""

import json

import pytest
import torch

import fastflow  # noqa: F401 — loads fastflow._C, the C++ ops
from fastflow.benchmarks.kernels import layer_op_inputs, peak_memory_mib
from fastflow.benchmarks.timing import peak_allocated_bytes
from fastflow.models import SemlaConfig
from fastflow.ops.cache_forecast import cache_forecast
from fastflow.ops.semla_attention import semla_attention

pytestmark = pytest.mark.usefixtures("single_thread")

MiB = 2**20


def nbytes(*tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def test_peak_is_the_maximum_of_live_bytes():
    def fn():
        a = torch.empty(4 * MiB, dtype=torch.uint8)
        b = torch.empty(1 * MiB, dtype=torch.uint8)  # live: 5 MiB, the peak
        del a
        c = torch.empty(3 * MiB, dtype=torch.uint8)  # live: 4 MiB; 8 MiB allocated in all
        return b, c

    # Not the sum of allocations (8 MiB), not what is live at the end (4 MiB).
    assert 5 * MiB <= peak_allocated_bytes(fn) < 5 * MiB + 64 * 1024


def test_tensors_alive_before_the_call_do_not_count():
    x = torch.ones(2 * MiB)  # 8 MiB, allocated before the measurement
    assert 8 * MiB <= peak_allocated_bytes(lambda: x + 1) < 8 * MiB + 1024  # the result only, not x
    assert peak_allocated_bytes(lambda: None) == 0


def test_frees_of_older_tensors_are_not_subtracted():
    # The profiler does not know the size of a block allocated before it started, so freeing one inside the
    # call does not lower the count: the measure is an upper bound for calls that free their inputs.
    held = [torch.empty(6 * MiB, dtype=torch.uint8)]

    def fn():
        held.pop()
        return torch.empty(2 * MiB, dtype=torch.uint8)

    assert peak_allocated_bytes(fn) == 2 * MiB


def test_allocations_inside_a_cpp_op_are_counted():
    a, b = torch.randn(256, 1024), torch.randn(256, 1024)  # 1 MiB each
    out = cache_forecast([a, b], [0.5, 0.5], backend="cpp")  # its output: at::empty in C++
    assert torch.allclose(out, 0.5 * (a + b))
    peak = peak_allocated_bytes(lambda: cache_forecast([a, b], [0.5, 0.5], backend="cpp"))
    assert nbytes(out) <= peak < nbytes(out) + 64 * 1024


def test_scratch_freed_inside_a_cpp_op_is_counted():
    # The fused semla_attention allocates per-thread tile scratch (at::empty) and frees it before returning:
    # the peak exceeds the outputs it returns.
    args = layer_op_inputs(SemlaConfig.preset("tiny"), 2, 12)
    with torch.no_grad():
        outputs = semla_attention(**args, backend="cpp")
        peak = peak_allocated_bytes(lambda: semla_attention(**args, backend="cpp"))
    assert peak > nbytes(*outputs) + 1024


def test_fn_runs_on_one_thread_and_the_count_is_restored():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        seen = []
        peak_allocated_bytes(lambda: seen.append(torch.get_num_threads()))
        assert seen == [1] and torch.get_num_threads() == 2
        with pytest.raises(RuntimeError, match="boom"):
            peak_allocated_bytes(lambda: (_ for _ in ()).throw(RuntimeError("boom")))
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_peak_memory_mib_of_a_forward():
    config = SemlaConfig.preset("tiny")
    for kernels in ("reference", "cpp"):
        mib = peak_memory_mib(config, 2, 8, kernels)
        assert isinstance(mib, float) and 0 < mib < 64


def test_bench_kernels_smoke(tmp_path):
    """`fastflow bench kernels` end to end on the tiny preset (op, forward, memory; no compile, no sampling)."""
    from fastflow.cli import main

    out = tmp_path / "kernels.json"
    assert (
        main(
            [
                "bench",
                "kernels",
                "--presets",
                "tiny",
                "--parts",
                "op",
                "forward",
                "memory",
                "--repeats",
                "1",
                "--no-compile",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    results = json.loads(out.read_text())
    backend = results["metadata"]["backend"]
    sizes = [(row["molecules"], row["atoms"]) for row in results["forward"]["tiny"]]
    assert sizes == [(32, 18), (8, 44)]  # 2 x 100 exceeds the tiny preset's max_atoms
    for row in results["op"]["tiny"] + results["forward"]["tiny"]:
        assert row["max_rel_error"] < 1e-5 and row[f"{backend}_ms"] > 0 and row["gflops"] > 0
    for row in results["memory"]["tiny"]:
        assert 0 < row[f"{backend}_peak_mib"] < row["reference_peak_mib"]
        assert row["ratio"] == row[f"{backend}_peak_mib"] / row["reference_peak_mib"]


def test_bench_model_sampling_script(tmp_path):
    """bench/bench_model_sampling.py end to end on the packaged model: both variants, the same sizes, JSON out."""
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "bench" / "bench_model_sampling.py"
    out = tmp_path / "sampling.json"
    command = [sys.executable, str(script), "qm9-small", "--n", "3", "--steps", "2", "--repeats", "1"]
    result = subprocess.run([*command, "--json", str(out)], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads(out.read_text())
    assert [row["kernels"] for row in report["rows"]] == ["reference", "cpp"]
    assert report["rows"][0]["speedup"] == 1.0 and report["rows"][1]["seconds"] > 0
    assert report["n"] == 3 and report["mean_atoms"] >= 1 and report["machine"]["isa"] is not None
