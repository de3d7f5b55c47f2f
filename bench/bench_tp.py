"""e3nn-compatible tensor products and the fused tp_conv vs e3nn, cuequivariance's fallback and torch.compile(e3nn).

    python bench/bench_tp.py [fastflow bench tp options]    (same as `fastflow bench tp`)

Writes bench/results/tp-<host>-<date>.json unless --out is given. See fastflow/benchmarks/tp.py.
"""

import platform
import sys
from datetime import date
from pathlib import Path

from fastflow.cli import main

if __name__ == "__main__":
    argv = ["bench", "tp", *sys.argv[1:]]
    if "--out" not in argv:
        argv += [
            "--out",
            str(Path(__file__).parent / "results" / f"tp-{platform.node()}-{date.today()}.json"),
        ]
    sys.exit(main(argv))
