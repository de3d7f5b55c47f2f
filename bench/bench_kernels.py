"""Fused Semla kernels vs the reference: op, whole forward, peak memory, end-to-end sampling.

    python bench/bench_kernels.py [fastflow bench kernels options]    (same as `fastflow bench kernels`)

Writes bench/results/kernels-<host>-<date>.json unless --out is given. See fastflow/benchmarks/kernels.py.
"""

import platform
import sys
from datetime import date
from pathlib import Path

from fastflow.cli import main

if __name__ == "__main__":
    argv = ["bench", "kernels", *sys.argv[1:]]
    if "--out" not in argv:
        argv += [
            "--out",
            str(Path(__file__).parent / "results" / f"kernels-{platform.node()}-{date.today()}.json"),
        ]
    sys.exit(main(argv))
