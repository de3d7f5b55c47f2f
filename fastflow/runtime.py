"""The process and the machine fastflow runs on: the CPU's vector and matrix instruction sets, and the C heap.

- :func:`cpu_isa`: which of AVX2, AVX-512, AVX512-BF16 and AMX the CPU has (read from /proc/cpuinfo), for
  benchmark headers and for choosing a precision.
- :func:`retain_freed_buffers`: sampling allocates and frees pair-sized tensors (``[B, N, N, ·]``, megabytes)
  several times per solver step. glibc serves blocks that large with fresh ``mmap`` pages and returns them on
  free, so every step pays a page fault per 4 KiB written (the profile shows it as ``aten::copy_`` inside
  ``addmm``). Raising the mmap and trim thresholds keeps freed blocks in the heap for reuse: 13% off a
  128-molecule QM9 sampling step on one thread. A process-wide setting, so fastflow's command line applies it
  and the library leaves it to the caller (``GLIBC_TUNABLES=glibc.malloc.mmap_threshold=33554432:
  glibc.malloc.trim_threshold=1073741824`` does the same from the environment).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import platform
from functools import cache
from pathlib import Path

# glibc mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
MMAP_THRESHOLD = 32 << 20  # glibc's largest allowed value: blocks up to 32 MiB come from the heap
TRIM_THRESHOLD = 1 << 30  # keep up to 1 GiB of freed heap instead of returning it to the OS
ISA_FLAGS = {"avx2": "avx2", "avx512f": "avx512", "avx512_bf16": "avx512_bf16", "amx_bf16": "amx_bf16"}


@cache
def cpu_isa() -> tuple[str, ...]:
    """The instruction sets among AVX2, AVX-512 (F), AVX512-BF16 and AMX-BF16 that this CPU reports."""
    cpuinfo = Path("/proc/cpuinfo")
    flags: set[str] = set()
    for line in cpuinfo.read_text().splitlines() if cpuinfo.exists() else []:
        if line.startswith("flags"):
            flags = set(line.split(":", 1)[1].split())
            break
    return tuple(name for flag, name in ISA_FLAGS.items() if flag in flags)


_retained: str | None = None


def retain_freed_buffers() -> str | None:
    """Keep freed blocks up to 32 MiB in glibc's heap (see the module docstring). Returns what was set, or None
    where the C library is not glibc (nothing is changed there). Idempotent."""
    global _retained
    if _retained is None and platform.system() == "Linux" and platform.libc_ver()[0] == "glibc":
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        if libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD) and libc.mallopt(
            _M_TRIM_THRESHOLD, TRIM_THRESHOLD
        ):
            _retained = (
                f"glibc mmap_threshold {MMAP_THRESHOLD >> 20} MiB, trim_threshold {TRIM_THRESHOLD >> 20} MiB"
            )
    return _retained


def heap_setting() -> str:
    """What :func:`retain_freed_buffers` set in this process, for benchmark headers."""
    return _retained or "C library default"
