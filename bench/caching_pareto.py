"""Speed–quality Pareto front of the predictive feature cache (issue 4, item 6).

    python bench/caching_pareto.py [--checkpoint PATH] [--n 1000] [--steps 100] [--quick]
                                   [--kernels {auto,cpp,triton,reference}] [--out PATH] [--no-plot]

The same as ``fastflow bench caching``; the benchmark lives in :mod:`fastflow.benchmarks.caching`
(see its docstring). This script writes, by default, bench/results/caching_pareto-<host>-<date>.json
(next to this file, whatever the working directory) and the plot beside it. ``--quick --config tiny`` is a
smoke test without a trained model; ``--quick --n 200 --steps 100`` is the reduced measurement.
"""

import argparse
from pathlib import Path

from fastflow.benchmarks.caching import add_arguments, default_out, run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(parser)
    args = parser.parse_args()
    if args.out is None:
        args.out = default_out(Path(__file__).parent / "results")
    run(args)


if __name__ == "__main__":
    main()
