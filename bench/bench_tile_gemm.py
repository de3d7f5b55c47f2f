"""Which bf16 GEMM suits semla_attention's pair tiles: oneDNN brgemm (VNNI-packed B, as the kernel uses; or
unpacked), ATen's bf16 mm (bf16 output, cast back), and fp32 addmm, at the tile shapes of the op: M ~ 512 pairs,
K = F (the message MLP's hidden width), N = Z = H + P (+ E_out) logit columns. One thread, median of 5 runs of
``--repeats`` calls; builds a tiny C++ extension with torch.utils.cpp_extension (a minute, once).

    python bench/bench_tile_gemm.py --json bench/results/tile-gemm-xeon-2026-12-05.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path

import torch
from torch.utils.cpp_extension import load_inline

from fastflow.benchmarks.timing import machine_header, machine_metadata

SOURCE = r"""
#include <ATen/native/CPUBlas.h>
#include <chrono>
// times (ms per call) of z[M, Z] += A[M, F] · B[F, Z]: brgemm with VNNI-packed B in 64-column blocks, brgemm
// unpacked, ATen bf16 mm (bf16 output), fp32 addmm
std::vector<double> bench(int64_t M, int64_t F, int64_t Z, int64_t reps) {
  auto A = at::randn({M, F}).to(at::kBFloat16);
  auto B = at::randn({F, Z}).to(at::kBFloat16);
  auto packed = at::empty_like(B);
  for (int64_t c0 = 0; c0 < Z; c0 += 64) {
    int64_t w = std::min<int64_t>(64, Z - c0);
    at::native::cpublas::pack(F, w, Z, w, at::kBFloat16, at::kBFloat16, B.const_data_ptr<at::BFloat16>() + c0,
                              packed.mutable_data_ptr<at::BFloat16>() + F * c0);
  }
  auto C = at::zeros({M, Z});
  auto Af = A.to(at::kFloat), Bf = B.to(at::kFloat);
  auto time = [&](auto fn) {
    for (int i = 0; i < 5; ++i) fn();
    auto t0 = std::chrono::steady_clock::now();
    for (int64_t i = 0; i < reps; ++i) fn();
    return std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count() / reps;
  };
  double packed_ms = time([&] {
    for (int64_t c0 = 0; c0 < Z; c0 += 64) {
      int64_t w = std::min<int64_t>(64, Z - c0);
      at::native::cpublas::brgemm(M, w, F, F, w, Z, true, A.const_data_ptr<at::BFloat16>(),
                                  packed.const_data_ptr<at::BFloat16>() + F * c0, C.mutable_data_ptr<float>() + c0, true);
    }
  });
  at::native::cpublas::brgemm_release();
  double plain_ms = time([&] {
    at::native::cpublas::brgemm(M, Z, F, F, Z, Z, true, A.const_data_ptr<at::BFloat16>(),
                                B.const_data_ptr<at::BFloat16>(), C.mutable_data_ptr<float>(), false);
  });
  double mm_ms = time([&] { auto out = at::mm(A, B).to(at::kFloat); });
  double f32_ms = time([&] { at::addmm_out(C, C, Af, Bf); });
  return {packed_ms, plain_ms, mm_ms, f32_ms};
}
"""
SHAPES = [
    (512, 128, 96),
    (512, 128, 224),
    (512, 64, 32),
    (512, 64, 96),
]  # semlaflow core/last, small core/last
VARIANTS = ("brgemm_packed", "brgemm_unpacked", "aten_bf16_mm", "fp32_addmm")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=200)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)
    metadata = machine_metadata()
    print(machine_header(metadata))
    module = load_inline(
        "fastflow_tile_gemm",
        cpp_sources=SOURCE,
        functions=["bench"],
        extra_cflags=["-O3"],
        build_directory=tempfile.mkdtemp(),
    )
    rows = []
    print(f"{'M x K x N':>16} " + " ".join(f"{v + ' us':>20}" for v in VARIANTS))
    for M, F, Z in SHAPES:
        runs = [module.bench(M, F, Z, args.repeats) for _ in range(5)]
        micros = {v: 1e3 * statistics.median(run[k] for run in runs) for k, v in enumerate(VARIANTS)}
        rows.append({"M": M, "K": F, "N": Z, **{f"{v}_us": t for v, t in micros.items()}})
        print(f"{f'{M} x {F} x {Z}':>16} " + " ".join(f"{micros[v]:>20.1f}" for v in VARIANTS))
    if args.json is not None:
        args.json.write_text(json.dumps({"machine": metadata, "rows": rows}, indent=1))
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
