"""Timing helpers shared by the benchmarks: interleaved medians, the machine's matmul rate, machine metadata."""

from __future__ import annotations

import platform
import statistics
import time
from datetime import datetime, timezone
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


def matmul_gflops(n: int = 1024, repeats: int = 10, device: str = "cpu") -> float:
    """The machine's fp32 matmul rate (GFLOP/s, 2n³ per n×n product) at the current thread count."""
    a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
    seconds = median_seconds({"mm": lambda: a @ b}, repeats)["mm"]
    return 2 * n**3 / seconds / 1e9


def cpu_model() -> str:
    cpuinfo = Path("/proc/cpuinfo")
    for line in cpuinfo.read_text().splitlines() if cpuinfo.exists() else []:
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor()


def machine_metadata(device: str = "cpu") -> dict:
    return {
        "cpu": cpu_model(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
        "python": platform.python_version(),
        "host": platform.node(),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
