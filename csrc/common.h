// Shared by the C++ kernels: the ISA-dispatch strategy and element functions that vectorise.
//
// ISA dispatch: the extension is built for the baseline x86-64 ISA (so one wheel runs everywhere), and the hot
// loops of a kernel are marked FASTFLOW_CLONES: GCC compiles them three times (x86-64-v4 = AVX-512, x86-64-v3 =
// AVX2 + FMA, baseline) and the loader picks the best for the CPU (target_clones + ifunc). GEMMs go to MKL
// through ATen, which dispatches by itself.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

// -DFASTFLOW_CLONES= (empty) or -DFASTFLOW_CLONES='__attribute__((target("arch=x86-64-v3")))' builds one variant
// only, to test it on a machine that would pick another.
#ifndef FASTFLOW_CLONES
#if defined(__GNUC__) && !defined(__clang__) && __GNUC__ >= 12 && defined(__x86_64__) && defined(__GLIBC__)
#define FASTFLOW_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define FASTFLOW_CLONES
#endif
#endif
#if defined(__GNUC__)
#define FASTFLOW_INLINE inline __attribute__((always_inline))
#else
#define FASTFLOW_INLINE inline
#endif

namespace fastflow {

// exp(x): Cephes' expf polynomial on [-ln2/2, ln2/2] times 2^n; relative error < 2e-7 on [-87, 88], x clamped to
// [lo, hi] = [-87, 88] first. The bounds are arguments read from Problem at run time on purpose: with literal
// bounds GCC splits the loop on the clamp (its outcome is a constant there) and no longer vectorises it
// (the AVX2 and baseline builds ran silu and the softmax scalar).
FASTFLOW_INLINE float exp_fast(float x, float lo, float hi) {
  x = std::min(std::max(x, lo), hi);
  const float n = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;  // round to nearest (1.5 * 2^23)
  const float r = (x - n * 0.693359375f) + n * 2.12194440e-4f;              // x - n ln2, ln2 in two parts
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  const float y = p * r * r + r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;  // 2^n, n in [-126, 127]
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return y * scale;
}
FASTFLOW_INLINE double exp_fast(double x, float /*lo*/, float /*hi*/) { return std::exp(x); }

// sqrt(q) for q >= 0 as q * rsqrt(q): bit-trick guess (3.5%) and three Newton steps (~1 ulp); sqrt(0) = 0.
// std::sqrt does not vectorise here: without -fno-math-errno it may set errno.
FASTFLOW_INLINE float sqrt_fast(float q) {
  int32_t bits;
  std::memcpy(&bits, &q, sizeof(bits));
  bits = 0x5f3759df - (bits >> 1);
  float r;
  std::memcpy(&r, &bits, sizeof(r));
  const float h = 0.5f * q;
  r = r * (1.5f - h * r * r);
  r = r * (1.5f - h * r * r);
  r = r * (1.5f - h * r * r);
  return q * r;
}
FASTFLOW_INLINE double sqrt_fast(double q) { return std::sqrt(q); }

// Σ x and Σ x² over a short row (an edge feature vector) with 128 bytes of independent partial sums and a tree
// at the end: an `omp simd` reduction keeps one vector and then adds its lanes one by one, a long dependency
// chain per pair.
template <typename T>
FASTFLOW_INLINE T sum_of(const T* x, int64_t n) {
  constexpr int L = 128 / sizeof(T);
  T acc[L] = {};
  int64_t q = 0;
  for (; q + L <= n; q += L) {
    for (int l = 0; l < L; ++l) acc[l] += x[q + l];
  }
  for (int l = 0; q + l < n; ++l) acc[l] += x[q + l];
  for (int w = L / 2; w > 0; w /= 2) {
    for (int l = 0; l < w; ++l) acc[l] += acc[l + w];
  }
  return acc[0];
}

template <typename T>
FASTFLOW_INLINE T sum_of_squares(const T* x, int64_t n) {
  constexpr int L = 128 / sizeof(T);
  T acc[L] = {};
  int64_t q = 0;
  for (; q + L <= n; q += L) {
    for (int l = 0; l < L; ++l) acc[l] += x[q + l] * x[q + l];
  }
  for (int l = 0; q + l < n; ++l) acc[l] += x[q + l] * x[q + l];
  for (int w = L / 2; w > 0; w /= 2) {
    for (int l = 0; l < w; ++l) acc[l] += acc[l + w];
  }
  return acc[0];
}

// float → bfloat16 bits, round to nearest even (finite inputs): plain integer arithmetic that vectorises, unlike
// c10::BFloat16's constructor with its NaN branch.
FASTFLOW_INLINE uint16_t bf16_bits(float x) {
  uint32_t bits;
  std::memcpy(&bits, &x, sizeof(bits));
  return static_cast<uint16_t>((bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16);
}

}  // namespace fastflow
