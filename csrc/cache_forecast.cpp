// CPU kernel of fastflow::cache_forecast: out = sum_k coeffs[k] * history[k].
//
// Memory bound: K reads and one write per element. Each thread walks its range in L1-sized chunks and
// runs K axpy passes over the chunk, so every inner loop is a plain contiguous multiply-add the compiler
// vectorises (SSE2 baseline; AVX-512 with FASTFLOW_NATIVE=1), and the chunk of `out` never leaves L1.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <vector>

namespace fastflow {
namespace {

constexpr int64_t kChunk = 2048;        // elements per L1 pass (8 KiB of fp32 accumulator)
constexpr int64_t kGrain = 32 * 1024;   // below this many elements, stay on one thread

template <typename scalar_t>
void linear_combination(const std::vector<const scalar_t*>& history, const std::vector<scalar_t>& coeffs,
                        scalar_t* out, int64_t numel) {
  const int64_t K = static_cast<int64_t>(history.size());
  at::parallel_for(0, numel, kGrain, [&](int64_t begin, int64_t end) {
    for (int64_t start = begin; start < end; start += kChunk) {
      const int64_t stop = std::min(start + kChunk, end);
      const scalar_t* F0 = history[0];
      const scalar_t c0 = coeffs[0];
#pragma omp simd
      for (int64_t i = start; i < stop; ++i) out[i] = c0 * F0[i];
      for (int64_t k = 1; k < K; ++k) {
        const scalar_t* Fk = history[k];
        const scalar_t ck = coeffs[k];
#pragma omp simd
        for (int64_t i = start; i < stop; ++i) out[i] += ck * Fk[i];
      }
    }
  });
}

at::Tensor cache_forecast_cpu(at::TensorList history, at::ArrayRef<double> coeffs) {
  TORCH_CHECK(!history.empty(), "cache_forecast: history must hold at least one tensor, got 0");
  TORCH_CHECK(coeffs.size() == history.size(),
              "cache_forecast: coeffs must have one entry per history tensor (",
              history.size(), "), got ", coeffs.size());
  const at::Tensor& first = history[0];
  TORCH_CHECK(first.scalar_type() == at::kFloat || first.scalar_type() == at::kDouble,
              "cache_forecast: history must be float32 or float64, got ", first.scalar_type());
  for (size_t k = 0; k < history.size(); ++k) {
    const at::Tensor& Fk = history[k];
    TORCH_CHECK(Fk.device().is_cpu(), "cache_forecast (cpu kernel): history[", k, "] must be on cpu, got ",
                Fk.device());
    TORCH_CHECK(Fk.scalar_type() == first.scalar_type(), "cache_forecast: history[", k, "] must have dtype ",
                first.scalar_type(), " like history[0], got ", Fk.scalar_type());
    TORCH_CHECK(Fk.sizes() == first.sizes(), "cache_forecast: history[", k, "] must have shape ",
                first.sizes(), " like history[0], got ", Fk.sizes());
    TORCH_CHECK(std::isfinite(coeffs[k]), "cache_forecast: coeffs[", k, "] must be finite, got ", coeffs[k]);
  }

  // Strided inputs are copied once; the cached tensors of a sampler are contiguous, so this is rare.
  std::vector<at::Tensor> contiguous(history.begin(), history.end());
  for (auto& Fk : contiguous) Fk = Fk.contiguous();
  at::Tensor out = at::empty(first.sizes(), first.options());

  AT_DISPATCH_FLOATING_TYPES(first.scalar_type(), "cache_forecast_cpu", [&] {
    std::vector<const scalar_t*> pointers;
    for (const auto& Fk : contiguous) pointers.push_back(Fk.const_data_ptr<scalar_t>());
    std::vector<scalar_t> c(coeffs.begin(), coeffs.end());
    linear_combination<scalar_t>(pointers, c, out.mutable_data_ptr<scalar_t>(), out.numel());
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(fastflow, CPU, m) { m.impl("cache_forecast", &cache_forecast_cpu); }

}  // namespace fastflow
