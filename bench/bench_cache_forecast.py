"""Microbenchmark of fastflow::cache_forecast: reference vs cpp (and triton on CUDA), cached-output sizes.

    python bench/bench_cache_forecast.py [--repeats 50]

Prints a table (median time per call, effective memory bandwidth, speedup over the reference) and writes
bench/results/cache_forecast-<host>-<date>.json with machine metadata.
"""

import argparse
import json
import platform
from pathlib import Path

import torch

from fastflow.benchmarks.timing import machine_metadata, median_seconds
from fastflow.ops import available_backends, cache_forecast

B, N = 32, 29  # a batch of QM9-sized molecules
CASES = {  # what the predictive cache stores per step
    "coords [B,N,3]": (B, N, 3),
    "atom types [B,N,18]": (B, N, 18),
    "charges [B,N,7]": (B, N, 7),
    "bonds [B,N,N,5]": (B, N, N, 5),
    "block features [B,N,384]": (B, N, 384),
}
ORDERS = (2, 3, 4)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=50)
    args = parser.parse_args()

    device = "cuda" if torch.cuda.is_available() else "cpu"
    backends = available_backends(device)
    rows = []
    header = f"{'case':<26} {'K':>2} " + " ".join(f"{b + ' us':>13}" for b in backends)
    header += " " + " ".join(f"{b + ' GB/s':>13}" for b in backends if b != "reference") + "  speedup"
    print(header)
    for name, shape in CASES.items():
        for K in ORDERS:
            history = [torch.randn(shape, device=device) for _ in range(K)]
            coeffs = torch.linspace(-1.5, 2.5, K).tolist()
            moved_bytes = (K + 1) * history[0].numel() * history[0].element_size()
            seconds = median_seconds(
                {b: lambda b=b, h=history, c=coeffs: cache_forecast(h, c, backend=b) for b in backends},
                args.repeats,
                warmup=5,
            )
            fast = [b for b in backends if b != "reference"]
            row = {
                "case": name,
                "shape": list(shape),
                "K": K,
                "bytes": moved_bytes,
                **{f"{b}_us": seconds[b] * 1e6 for b in backends},
            }
            rows.append(row)
            line = f"{name:<26} {K:>2} " + " ".join(f"{seconds[b] * 1e6:>13.1f}" for b in backends)
            line += " " + " ".join(f"{moved_bytes / seconds[b] / 1e9:>13.2f}" for b in fast)
            line += "  " + " ".join(f"{b} {seconds['reference'] / seconds[b]:.1f}x" for b in fast)
            print(line)

    metadata = {**machine_metadata(device), "repeats": args.repeats}
    out = Path(__file__).parent / "results" / f"cache_forecast-{platform.node()}-{metadata['date'][:10]}.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps({"benchmark": "cache_forecast", "metadata": metadata, "rows": rows}, indent=1))
    print(f"\n{metadata['cpu']}, {metadata['threads']} threads, torch {metadata['torch']} -> {out}")


if __name__ == "__main__":
    main()
