// CPU kernel of fastflow::discrete_flow_step: softmax, CTMC transition weights, keyed uniform and inverse-CDF
// draw for every atom or ordered pair, one pass per element (the math and the reference:
// fastflow/ops/discrete_flow_step.py; the random streams: fastflow/rng.py).
//
// The reference runs ~20 tensor passes over [B, N, N, K] (softmax, gathers, scatters, cumsum, a dozen int64
// hash passes). Here each element's K logits are read once and its key is hashed in registers. The float
// arithmetic follows the reference's operation order, so the draws agree except where a uniform falls within
// rounding of a CDF boundary (exp and the K-term sums may differ from ATen's by an ulp).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <tuple>
#include <vector>

namespace fastflow {
namespace {

constexpr int64_t kGrain = 1024;  // elements per parallel chunk
constexpr double kTEps = 1e-5;   // fastflow.ops.discrete_flow_step.T_EPS

// ---- fastflow/rng.py: SplitMix64 finaliser, keys and uniforms (unsigned wrap-around = the int64 tensors') ----

constexpr uint64_t kGolden = 0x9E3779B97F4A7C15ull;
constexpr uint64_t kMix1 = 0xBF58476D1CE4E5B9ull;
constexpr uint64_t kMix2 = 0x94D049BB133111EBull;

inline uint64_t mix(uint64_t x) {
  x = (x ^ (x >> 30)) * kMix1;
  x = (x ^ (x >> 27)) * kMix2;
  return x ^ (x >> 31);
}

inline uint64_t combine(uint64_t key, uint64_t value) { return mix(key ^ mix((value + 1) * kGolden)); }

inline float uniform(uint64_t key) { return static_cast<float>(mix(key) >> 40) * 0x1.0p-24f; }

template <typename scalar_t>
void step_rows(const scalar_t* logits, const scalar_t* current, const bool* mask, const scalar_t* t,
               const int64_t* keys, scalar_t* probs, scalar_t* next, int64_t B, int64_t N, int64_t K, bool pairs,
               int64_t step, int64_t stream, double dt, double noise_level) {
  const int64_t per_molecule = pairs ? N * N : N;
  const scalar_t dt_s = static_cast<scalar_t>(dt);
  at::parallel_for(0, B * per_molecule, kGrain, [&](int64_t begin, int64_t end) {
    std::vector<scalar_t> p(K), w(K);
    for (int64_t e = begin; e < end; ++e) {
      const int64_t b = e / per_molecule, local = e % per_molecule;
      const int64_t i = pairs ? local / N : local, j = pairs ? local % N : 0;
      const scalar_t* z = logits + e * K;
      scalar_t* p_out = probs + e * K;
      scalar_t* onehot = next + e * K;
      const bool valid = mask[b * N + i] && (!pairs || mask[b * N + j]);
      if (!valid) {
        std::fill(p_out, p_out + K, scalar_t(0));
        std::fill(onehot, onehot + K, scalar_t(0));
        continue;
      }
      // p̂ = softmax(z): exp(z − max), scaled by 1 / Σ (as ATen's last-dim softmax)
      scalar_t top = z[0];
      for (int64_t k = 1; k < K; ++k) top = std::max(top, z[k]);
      scalar_t total = 0;
      for (int64_t k = 0; k < K; ++k) {
        p[k] = std::exp(z[k] - top);
        total += p[k];
      }
      const scalar_t scale = scalar_t(1) / total;
      for (int64_t k = 0; k < K; ++k) p_out[k] = p[k] = p[k] * scale;

      // current class: the first maximum of the one-hot (an all-zero row gives 0, as argmax does)
      const scalar_t* c_row = current + e * K;
      int64_t c = 0;
      for (int64_t k = 1; k < K; ++k) if (c_row[k] > c_row[c]) c = k;

      // transition weights, in the reference's operation order
      const scalar_t tc = std::min(std::max(t[b], static_cast<scalar_t>(kTEps)), static_cast<scalar_t>(1 - kTEps));
      const scalar_t eta = (tc + dt_s < scalar_t(1)) ? static_cast<scalar_t>(noise_level) : scalar_t(0);
      const scalar_t rate = dt_s * (scalar_t(1) + scalar_t(2) * eta * static_cast<scalar_t>(K - 1) * tc) /
                            (scalar_t(1) - tc);
      const scalar_t leak = dt_s * eta * p[c];
      scalar_t jumps = 0;
      for (int64_t k = 0; k < K; ++k) {
        w[k] = k == c ? scalar_t(0) : std::min(rate * p[k] + leak, scalar_t(1));
        jumps += w[k];
      }
      w[c] = std::max(scalar_t(1) - jumps, scalar_t(0));

      // inverse-CDF draw with the element's keyed uniform
      const uint64_t element = pairs ? (static_cast<uint64_t>(i) << 32) + static_cast<uint64_t>(j)
                                     : static_cast<uint64_t>(i);
      const uint64_t key = combine(combine(combine(static_cast<uint64_t>(keys[b]), static_cast<uint64_t>(step)),
                                           element),
                                   static_cast<uint64_t>(stream));
      for (int64_t k = 1; k < K; ++k) w[k] += w[k - 1];  // cdf
      const scalar_t threshold = static_cast<scalar_t>(uniform(key)) * w[K - 1];
      int64_t drawn = 0;
      for (int64_t k = 0; k < K; ++k) drawn += w[k] <= threshold;
      drawn = std::min(drawn, K - 1);
      std::fill(onehot, onehot + K, scalar_t(0));
      onehot[drawn] = scalar_t(1);
    }
  });
}

std::tuple<at::Tensor, at::Tensor> discrete_flow_step_cpu(const at::Tensor& logits, const at::Tensor& current,
                                                          const at::Tensor& mask, const at::Tensor& t,
                                                          const at::Tensor& keys, int64_t step, int64_t stream,
                                                          double dt, double noise_level) {
  const char* op = "discrete_flow_step";
  TORCH_CHECK(logits.dim() == 3 || (logits.dim() == 4 && logits.size(1) == logits.size(2)), op,
              ": logits must be [B, N, K] or [B, N, N, K], got ", logits.sizes());
  TORCH_CHECK(logits.scalar_type() == at::kFloat || logits.scalar_type() == at::kDouble, op,
              ": logits must be float32 or float64, got ", logits.scalar_type());
  const int64_t B = logits.size(0), N = logits.size(1), K = logits.size(-1);
  TORCH_CHECK(B > 0 && N > 0 && K > 0, op, ": empty logits of shape ", logits.sizes());
  for (const at::Tensor* x : {&logits, &current, &mask, &t, &keys})
    TORCH_CHECK(x->device().is_cpu() && x->is_contiguous(), op, " (cpu kernel): inputs must be contiguous cpu "
                "tensors");
  TORCH_CHECK(current.sizes() == logits.sizes() && current.scalar_type() == logits.scalar_type(), op,
              ": current must match logits (", logits.sizes(), ", ", logits.scalar_type(), "), got ",
              current.sizes(), ", ", current.scalar_type());
  TORCH_CHECK(mask.dim() == 2 && mask.size(0) == B && mask.size(1) == N && mask.scalar_type() == at::kBool, op,
              ": mask must be a [", B, ", ", N, "] bool tensor, got ", mask.sizes(), " ", mask.scalar_type());
  TORCH_CHECK(t.dim() == 1 && t.size(0) == B && t.scalar_type() == logits.scalar_type(), op, ": t must be [", B,
              "] of the logits' dtype, got ", t.sizes(), " ", t.scalar_type());
  TORCH_CHECK(keys.dim() == 1 && keys.size(0) == B && keys.scalar_type() == at::kLong, op, ": keys must be [", B,
              "] int64, got ", keys.sizes(), " ", keys.scalar_type());
  TORCH_CHECK(step >= 0 && stream >= 0, op, ": step and stream must be >= 0, got ", step, " and ", stream);
  TORCH_CHECK(std::isfinite(dt) && dt > 0 && std::isfinite(noise_level) && noise_level >= 0, op,
              ": dt must be > 0 and noise_level >= 0 (finite), got ", dt, " and ", noise_level);

  at::Tensor probs = at::empty_like(logits), next = at::empty_like(logits);
  AT_DISPATCH_FLOATING_TYPES(logits.scalar_type(), "discrete_flow_step_cpu", [&] {
    step_rows<scalar_t>(logits.const_data_ptr<scalar_t>(), current.const_data_ptr<scalar_t>(),
                        mask.const_data_ptr<bool>(), t.const_data_ptr<scalar_t>(), keys.const_data_ptr<int64_t>(),
                        probs.mutable_data_ptr<scalar_t>(), next.mutable_data_ptr<scalar_t>(), B, N, K,
                        logits.dim() == 4, step, stream, dt, noise_level);
  });
  return {probs, next};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastflow, CPU, m) { m.impl("discrete_flow_step", &discrete_flow_step_cpu); }

}  // namespace fastflow
