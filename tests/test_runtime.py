"""fastflow.runtime: the CPU's instruction sets, the C-heap setting, and the benchmark header that shows both."""

import platform
import subprocess
import sys

import pytest

from fastflow.benchmarks.timing import machine_header, machine_metadata
from fastflow.runtime import ISA_FLAGS, cpu_isa


def test_isa_names_come_from_the_cpu_flags():
    flags = (
        open("/proc/cpuinfo").read().split("flags", 1)[1].split("\n", 1)[0].split()
        if sys.platform == "linux"
        else []
    )
    assert set(cpu_isa()) == {name for flag, name in ISA_FLAGS.items() if flag in flags}


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc only")
def test_the_cli_process_keeps_freed_buffers_and_the_header_says_so():
    code = (
        "from fastflow.runtime import heap_setting, retain_freed_buffers; print(heap_setting()); "
        "first = retain_freed_buffers(); print(first == retain_freed_buffers()); print(heap_setting())"
    )
    lines = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout.split("\n")
    assert lines[0] == "C library default" and lines[1] == "True" and "mmap_threshold 32 MiB" in lines[2]


def test_machine_header_names_isa_and_both_gemm_rates():
    metadata = machine_metadata()
    assert metadata["gemm_gflops"]["fp32"] > 0 and metadata["gemm_gflops"]["bf16"] > 0
    header = machine_header(metadata)
    assert "fp32" in header and "bf16" in header and "ISA" in header
