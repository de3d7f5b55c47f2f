"""Helpers shared by the benchmarks: interleaved medians, the machine's matmul rate, machine metadata, and the
peak of live bytes allocated by torch's CPU allocator during a call."""

from __future__ import annotations

import platform
import statistics
import time
from datetime import UTC, datetime
from pathlib import Path

import torch


def median_seconds(fns: dict, repeats: int, warmup: int = 2) -> dict:
    """Median wall time of each fn; repeats are interleaved so a noisy machine slows every fn alike."""
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            sync()
            start = time.perf_counter()
            fn()
            sync()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def matmul_gflops(n: int = 1024, repeats: int = 10, device: str = "cpu", dtype=torch.float32) -> float:
    """The machine's matmul rate (GFLOP/s, 2n³ per n×n product) in ``dtype`` at the current thread count."""
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    seconds = median_seconds({"mm": lambda: a @ b}, repeats)["mm"]
    return 2 * n**3 / seconds / 1e9


def peak_allocated_bytes(fn, single_thread: bool = True) -> int:
    """Peak live bytes allocated by torch's CPU allocator while ``fn()`` runs, above the live bytes before it.

    Tensors that exist before the call (inputs, weights) do not count; everything allocated during it does —
    inside C++ ops too (a fused kernel's ``at::empty`` scratch), since the allocator itself reports to the
    profiler — and so does ``fn``'s result. The profiler's ``[memory]`` events (+bytes per allocation, -bytes
    per free) are replayed in time order; the peak is the maximum of the running sum.

    Caveats. Frees of blocks allocated before the call are not subtracted (the profiler does not know their
    sizes): for a call that frees its inputs the result is an upper bound. Memory outside torch's allocator
    (``std::vector``, MKL/oneDNN internal buffers, Python objects) is not counted. Allocations on OpenMP
    intra-op worker threads are not reported to the profiler, so by default ``fn`` runs on one intra-op thread
    (the previous thread count is restored afterwards).
    """
    from torch.profiler import ProfilerActivity, profile

    threads = torch.get_num_threads()
    if single_thread:
        torch.set_num_threads(1)
    try:
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            fn()
    finally:
        torch.set_num_threads(threads)
    events = [
        e
        for e in prof.profiler.kineto_results.events()
        if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU
    ]
    live = peak = 0
    for event in sorted(events, key=lambda e: e.start_ns()):  # stable: ties keep the recorded order
        live += event.nbytes()
        peak = max(peak, live)
    return peak


def cpu_model() -> str:
    cpuinfo = Path("/proc/cpuinfo")
    for line in cpuinfo.read_text().splitlines() if cpuinfo.exists() else []:
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor()


def machine_metadata(device: str = "cpu") -> dict:
    """What a benchmark ran on: CPU and its ISA, the measured fp32 and bf16 matmul rates at 1024³ (the matrix
    engines show in the bf16 one: AMX, AVX512-BF16), threads, the C-heap setting, versions and the date."""
    from fastflow.runtime import cpu_isa, heap_setting

    return {
        "cpu": cpu_model(),
        "isa": list(cpu_isa()),
        "gemm_gflops": {
            name: round(matmul_gflops(device=device, dtype=dtype), 1)
            for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16))
        },
        "heap": heap_setting(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
        "python": platform.python_version(),
        "host": platform.node(),
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
    }


def machine_header(metadata: dict) -> str:
    """One line for the top of a benchmark's table: the machine :func:`machine_metadata` describes."""
    rates = ", ".join(f"{name} {rate:.0f}" for name, rate in metadata["gemm_gflops"].items())
    return (
        f"# {metadata['cpu']}; ISA {' '.join(metadata['isa']) or 'baseline'}; matmul GFLOP/s at 1024^3: "
        f"{rates}; {metadata['threads']} threads; heap: {metadata['heap']}; torch {metadata['torch']}"
    )
