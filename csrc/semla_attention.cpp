// CPU kernel of fastflow::semla_attention: one Semla layer's pair messages, node attention and coordinate
// attention (the math and the reference: fastflow/ops/semla_attention.py).
//
// Flash-attention style. The B*N rows (b, i) are cut into tiles of Ti consecutive rows, Ti*N ≈ kTilePairs
// pairs (a tile may span molecules: the GEMMs do not care), and each thread evaluates whole tiles in
// thread-local buffers that stay in L2:
//   1. K[(i,j), :] = [G_ij (S Gram entries) | LN(e_ij) (E_in)]            pairs × (S + E_in)
//   2. hidden = a_i + c_j + K · [Wg | We]^T, then silu                    one GEMM, pairs × F
//   3. z = b2 + hidden · W2^T; e'_ij = z_ij[H + P:]                      one GEMM, pairs × (H + P + E_out)
//   4. per row i: softmax over the edges j of the H + P logit columns (max, then exp in place, Σexp, Σexp²),
//      o_i = sqrt(Σα²) Σ α_j v_j and u_i = sqrt(Σβ²) Σ β_j d_ij / (|d_ij| + eps).
// With the edge-embedding block (first layer), e_ij itself is made per tile from the raw edge input x_ij
// (bond one-hots, self-conditioning bond probabilities: a few channels) by the generator's embedding MLP,
//   0. e = W_b · silu(W_a x + b_a) + b_b                                  two GEMMs, pairs × E_in
// so the [B, N, N, E_in] embedding is never materialised either.
// No [B, N, N, ·] tensor but e' is written. The GEMMs are ATen's CPU addmm kernel called directly
// (at::cpu::addmm_: MKL sgemm/dgemm, no dispatcher); inside at::parallel_for they run on the calling thread,
// which is what we want. The hand loops of steps 1, 2, 4 run over contiguous channels (Gram sets, features,
// logit columns, heads, coordinate sets); they are compiled three times (x86-64-v4 = AVX-512, x86-64-v3 =
// AVX2 + FMA, baseline) and picked at load time (GCC target_clones), because the extension itself is built
// for the baseline ISA. float32 uses a polynomial exp and a Newton rsqrt that vectorise (relative error
// ~1e-7); float64 uses std::exp and std::sqrt. At the SemlaFlow sizes the two GEMMs take ~70% of the time.
//
// precision "bf16" (float32 only): the GEMM of step 3 takes bfloat16 operands with float32 accumulation and
// output — silu(hidden) is rounded to bf16 as silu writes it, W2 is converted once per call — through oneDNN's
// brgemm micro-kernel (at::native::cpublas::brgemm: AMX tiles on CPUs that have them, W2 packed into the VNNI
// layout once per call; elsewhere the same call runs oneDNN's bf16 GEMM, AVX512-BF16 where the CPU has it).
// Everything else stays float32: the Gram and edge term of step 2, the logits z, the softmax and the
// coordinate sums. At F = 128, Z = 96 and 512-pair tiles brgemm with packed W2 takes 10.5 us, ATen's bf16 mm
// 37.8 us (and its bf16 output would round the logits), fp32 addmm 66.9 us (bench/bench_tile_gemm.py, Xeon AMX).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/native/CPUBlas.h>
#include <ATen/ops/addmm_cpu_dispatch.h>
#include <torch/library.h>

#include "common.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

namespace fastflow {
namespace {

constexpr int64_t kTilePairs = 512;  // pairs (i, j) per tile: the GEMMs' M; buffers ~ 0.5 MiB at F = 128

// ---- the problem ----

template <typename T>
struct Problem {
  int64_t B, N, F, S, H, D, P, E_in, E_out;
  int64_t Z;   // H + P + E_out: columns of z
  int64_t Kd;  // S + E_in: columns of K
  const T* a;      // [B, N, F]
  const T* c;      // [B, N, F]
  const T* Xt;     // gram_coords as [B, N, 3, S]
  const T* bias;   // [Z]
  const T* vt;     // values as [B, N, D, H]
  const T* Yt;     // attn_coords as [B, N, 3, P]
  const bool* adj; // [B, N, N]
  const T* edge;   // [B, N, N, E_in], or null (no edge input, or an embedded one)
  const T* edge_x; // [B, N, N, X]: the raw edge input of the embedding, or null
  int64_t X = 0;
  const T* ln_w;   // [E_in]
  const T* ln_b;   // [E_in]
  T ln_eps, coord_eps;
  float exp_lo = -87.0f, exp_hi = 88.0f;  // exp_fast's clamp (see there)
  T* node_out;   // [B, N, H * D]
  T* coord_out;  // [B, N, P, 3]
  T* edge_out;   // [B, N, N, E_out]
};

// Scratch of one row's softmax and aggregation.
template <typename T>
struct RowScratch {
  std::vector<T> max, sum, sum_sq, scale, node_acc, coord_acc;
  std::vector<int64_t> edges;
  explicit RowScratch(const Problem<T>& pr)
      : max(pr.H + pr.P), sum(pr.H + pr.P), sum_sq(pr.H + pr.P), scale(pr.H + pr.P),
        node_acc(pr.H * pr.D), coord_acc(3 * pr.P), edges(pr.N) {}
};

// Step 1 and the first half of step 2 for the rows [r0, r1): K = [G | LN(e)], hidden = a_i + c_j. `edge` holds e
// of the pairs (r0, 0), (r0, 1), ... in order (the input's rows, or the tile's embedding).
template <typename T>
FASTFLOW_INLINE void pair_inputs_impl(const Problem<T>& pr, int64_t r0, int64_t r1, const T* edge, T* K, T* hidden) {
  const int64_t N = pr.N, F = pr.F, S = pr.S, E = pr.E_in, Kd = pr.Kd;
  const T* __restrict ln_w = pr.ln_w;
  const T* __restrict ln_b = pr.ln_b;
  for (int64_t r = r0; r < r1; ++r) {
    const int64_t b = r / N;
    const T* a_i = pr.a + r * F;
    const T* xi = pr.Xt + r * 3 * S;
    for (int64_t j = 0; j < N; ++j) {
      const int64_t pair = (r - r0) * N + j;
      T* k = K + pair * Kd;
      const T* xj = pr.Xt + (b * N + j) * 3 * S;
#pragma omp simd
      for (int64_t s = 0; s < S; ++s) k[s] = xi[s] * xj[s] + xi[S + s] * xj[S + s] + xi[2 * S + s] * xj[2 * S + s];
      if (E > 0) {  // LayerNorm of e_ij (biased variance, as F.layer_norm), two passes
        const T* e = edge + ((r - r0) * N + j) * E;
        T* ln = k + S;
        const T mean = sum_of(e, E) / static_cast<T>(E);
#pragma omp simd
        for (int64_t q = 0; q < E; ++q) ln[q] = e[q] - mean;
        const T rstd = T(1) / std::sqrt(sum_of_squares(ln, E) / static_cast<T>(E) + pr.ln_eps);
#pragma omp simd
        for (int64_t q = 0; q < E; ++q) ln[q] = ln[q] * rstd * ln_w[q] + ln_b[q];
      }
      const T* c_j = pr.c + (b * N + j) * F;
      T* h = hidden + pair * F;
#pragma omp simd
      for (int64_t f = 0; f < F; ++f) h[f] = a_i[f] + c_j[f];
    }
  }
}

// Step 0's silu, in place.
template <typename T>
FASTFLOW_INLINE void silu_inplace_impl(const Problem<T>& pr, T* x, int64_t n) {
  const float lo = pr.exp_lo, hi = pr.exp_hi;
#pragma omp simd
  for (int64_t q = 0; q < n; ++q) x[q] = x[q] / (T(1) + exp_fast(-x[q], lo, hi));
}

// Step 3's bias: the z rows of `pairs` pairs start as b2.
template <typename T>
FASTFLOW_INLINE void bias_rows_impl(const Problem<T>& pr, int64_t pairs, T* z) {
  const int64_t Z = pr.Z;
  for (int64_t pair = 0; pair < pairs; ++pair) {
    T* zp = z + pair * Z;
#pragma omp simd
    for (int64_t q = 0; q < Z; ++q) zp[q] = pr.bias[q];
  }
}

// Second half of step 2 and the bias of step 3: hidden = silu(hidden) in place, z rows = b2.
template <typename T>
FASTFLOW_INLINE void silu_and_bias_impl(const Problem<T>& pr, int64_t pairs, T* hidden, T* z) {
  silu_inplace_impl(pr, hidden, pairs * pr.F);
  bias_rows_impl(pr, pairs, z);
}

// Step 2's silu and step 3's bias for the bf16 GEMM: A = bf16(silu(hidden)), z rows = b2.
FASTFLOW_INLINE void silu_to_bf16_and_bias_impl(const Problem<float>& pr, int64_t pairs, const float* hidden,
                                                uint16_t* A, float* z) {
  const int64_t n = pairs * pr.F;
  const float lo = pr.exp_lo, hi = pr.exp_hi;
#pragma omp simd
  for (int64_t q = 0; q < n; ++q) A[q] = bf16_bits(hidden[q] / (1.0f + exp_fast(-hidden[q], lo, hi)));
  bias_rows_impl(pr, pairs, z);
}

// Step 4 for the rows [r0, r1) of a tile whose z is in `z` (overwritten by the exponentials); e' copied out.
template <typename T>
FASTFLOW_INLINE void attend_impl(const Problem<T>& pr, int64_t r0, int64_t r1, T* z, RowScratch<T>& scratch) {
  const int64_t N = pr.N, H = pr.H, D = pr.D, P = pr.P, Z = pr.Z, C = H + P, HD = H * D;
  if (pr.E_out > 0) {
    const int64_t E = pr.E_out;
    T* out = pr.edge_out + r0 * N * E;  // the tile's rows of e' are one contiguous block
    for (int64_t pair = 0; pair < (r1 - r0) * N; ++pair) {
      const T* zp = z + pair * Z + C;
      T* o = out + pair * E;
#pragma omp simd
      for (int64_t q = 0; q < E; ++q) o[q] = zp[q];
    }
  }
  T* m = scratch.max.data();
  T* s1 = scratch.sum.data();
  T* s2 = scratch.sum_sq.data();
  T* scale = scratch.scale.data();
  T* node_acc = scratch.node_acc.data();
  T* ax = scratch.coord_acc.data();
  T* ay = ax + P;
  T* az = ay + P;
  int64_t* edges = scratch.edges.data();
  const float lo = pr.exp_lo, hi = pr.exp_hi;
  for (int64_t r = r0; r < r1; ++r) {
    const int64_t b = r / N;
    T* zr = z + (r - r0) * N * Z;  // z of the pairs (i, 0..N-1)

    // The edges of row i; a row without any takes its softmax over every j (the reference's additive mask).
    const bool* adj = pr.adj + r * N;
    int64_t n_edges = 0;
    for (int64_t j = 0; j < N; ++j) {
      edges[n_edges] = j;
      n_edges += adj[j] ? 1 : 0;
    }
    if (n_edges == 0) {
      for (int64_t j = 0; j < N; ++j) edges[j] = j;
      n_edges = N;
    }

    // Softmax statistics of the H + P logit columns: max, then exp in place, Σexp and Σexp².
    std::fill(m, m + C, -std::numeric_limits<T>::infinity());
    for (int64_t t = 0; t < n_edges; ++t) {
      const T* zj = zr + edges[t] * Z;
#pragma omp simd
      for (int64_t q = 0; q < C; ++q) m[q] = std::max(m[q], zj[q]);
    }
    std::fill(s1, s1 + C, T(0));
    std::fill(s2, s2 + C, T(0));
    for (int64_t t = 0; t < n_edges; ++t) {
      T* zj = zr + edges[t] * Z;
#pragma omp simd
      for (int64_t q = 0; q < C; ++q) {
        const T e = exp_fast(zj[q] - m[q], lo, hi);
        zj[q] = e;
        s1[q] += e;
        s2[q] += e * e;
      }
    }
    // α = e / Σe, so sqrt(Σα²) Σ α_j x_j = sqrt(Σe²) / (Σe)² · Σ e_j x_j.
#pragma omp simd
    for (int64_t q = 0; q < C; ++q) scale[q] = std::sqrt(s2[q]) / (s1[q] * s1[q]);

    // Node attention: o_i,h = scale_h Σ_j e_j,h v_j,h, accumulated as [D, H] from values laid out [B, N, D, H]
    // so that the inner loop runs over the heads (d_head is often too short to vectorise); four edges per pass
    // over the accumulator.
    std::fill(node_acc, node_acc + HD, T(0));
    int64_t t = 0;
    for (; t + 4 <= n_edges; t += 4) {
      const T* e0 = zr + edges[t] * Z;
      const T* e1 = zr + edges[t + 1] * Z;
      const T* e2 = zr + edges[t + 2] * Z;
      const T* e3 = zr + edges[t + 3] * Z;
      const T* v0 = pr.vt + (b * N + edges[t]) * HD;
      const T* v1 = pr.vt + (b * N + edges[t + 1]) * HD;
      const T* v2 = pr.vt + (b * N + edges[t + 2]) * HD;
      const T* v3 = pr.vt + (b * N + edges[t + 3]) * HD;
      for (int64_t d = 0; d < D; ++d) {
        T* acc = node_acc + d * H;
        const int64_t o = d * H;
#pragma omp simd
        for (int64_t h = 0; h < H; ++h)
          acc[h] += (e0[h] * v0[o + h] + e1[h] * v1[o + h]) + (e2[h] * v2[o + h] + e3[h] * v3[o + h]);
      }
    }
    for (; t < n_edges; ++t) {
      const T* e0 = zr + edges[t] * Z;
      const T* v0 = pr.vt + (b * N + edges[t]) * HD;
      for (int64_t d = 0; d < D; ++d) {
        T* acc = node_acc + d * H;
        const int64_t o = d * H;
#pragma omp simd
        for (int64_t h = 0; h < H; ++h) acc[h] += e0[h] * v0[o + h];
      }
    }
    T* node_out = pr.node_out + r * HD;
    for (int64_t d = 0; d < D; ++d) {
      for (int64_t h = 0; h < H; ++h) node_out[h * D + d] = node_acc[d * H + h] * scale[h];
    }

    // Coordinate attention: u_i,p = scale_p Σ_j e_j,p (Y_p,i - Y_p,j) / (|Y_p,i - Y_p,j| + eps); the j = i
    // term is 0 · (1 / eps) = 0 as in the reference.
    std::fill(ax, ax + 3 * P, T(0));
    const T* yi = pr.Yt + r * 3 * P;
    const T eps = pr.coord_eps;
    for (int64_t t = 0; t < n_edges; ++t) {
      const int64_t j = edges[t];
      const T* ej = zr + j * Z + H;
      const T* yj = pr.Yt + (b * N + j) * 3 * P;
#pragma omp simd
      for (int64_t p = 0; p < P; ++p) {
        const T dx = yi[p] - yj[p];
        const T dy = yi[P + p] - yj[P + p];
        const T dz = yi[2 * P + p] - yj[2 * P + p];
        const T w = ej[p] / (sqrt_fast(dx * dx + dy * dy + dz * dz) + eps);
        ax[p] += w * dx;
        ay[p] += w * dy;
        az[p] += w * dz;
      }
    }
    T* coord_out = pr.coord_out + r * P * 3;
    const T* scale_p = scale + H;
#pragma omp simd
    for (int64_t p = 0; p < P; ++p) {
      coord_out[3 * p] = ax[p] * scale_p[p];
      coord_out[3 * p + 1] = ay[p] * scale_p[p];
      coord_out[3 * p + 2] = az[p] * scale_p[p];
    }
  }
}

// The hand loops, compiled per ISA (templates are not cloned reliably by GCC: these plain overloads are, and
// the always_inline templates above are compiled into each clone).
FASTFLOW_CLONES void pair_inputs(const Problem<float>& pr, int64_t r0, int64_t r1, const float* edge, float* K,
                                  float* hidden) {
  pair_inputs_impl(pr, r0, r1, edge, K, hidden);
}
FASTFLOW_CLONES void pair_inputs(const Problem<double>& pr, int64_t r0, int64_t r1, const double* edge, double* K,
                                 double* hidden) {
  pair_inputs_impl(pr, r0, r1, edge, K, hidden);
}
FASTFLOW_CLONES void silu_inplace(const Problem<float>& pr, float* x, int64_t n) { silu_inplace_impl(pr, x, n); }
FASTFLOW_CLONES void silu_inplace(const Problem<double>& pr, double* x, int64_t n) { silu_inplace_impl(pr, x, n); }
FASTFLOW_CLONES void silu_and_bias(const Problem<float>& pr, int64_t pairs, float* hidden, float* z) {
  silu_and_bias_impl(pr, pairs, hidden, z);
}
FASTFLOW_CLONES void silu_and_bias(const Problem<double>& pr, int64_t pairs, double* hidden, double* z) {
  silu_and_bias_impl(pr, pairs, hidden, z);
}
FASTFLOW_CLONES void silu_to_bf16_and_bias(const Problem<float>& pr, int64_t pairs, const float* hidden,
                                           uint16_t* A, float* z) {
  silu_to_bf16_and_bias_impl(pr, pairs, hidden, A, z);
}
FASTFLOW_CLONES void attend(const Problem<float>& pr, int64_t r0, int64_t r1, float* z, RowScratch<float>& s) {
  attend_impl(pr, r0, r1, z, s);
}
FASTFLOW_CLONES void attend(const Problem<double>& pr, int64_t r0, int64_t r1, double* z, RowScratch<double>& s) {
  attend_impl(pr, r0, r1, z, s);
}

// W2^T, the B operand of step 3's bf16 GEMM: [F, Z] bfloat16. Where brgemm runs on AMX it is packed into the
// VNNI layout in column blocks of kVnniBlock (oneDNN's packed B takes a leading dimension of 16, 32, 48 or 64;
// needs an even F and Z % 16 == 0): block c0 holds columns [c0, c0 + w) at offset F * c0.
constexpr int64_t kVnniBlock = 64;

struct OutWeightBf16 {
  at::Tensor data;
  bool vnni;
};

OutWeightBf16 out_weight_bf16(const at::Tensor& out_weight) {
  const int64_t Z = out_weight.size(0), F = out_weight.size(1);
  at::Tensor plain = out_weight.t().to(at::kBFloat16).contiguous();
  if (!at::native::cpublas::could_pack(at::kBFloat16) || F % 2 != 0 || Z % 16 != 0) return {plain, false};
  at::Tensor packed = at::empty_like(plain);
  const auto* src = plain.const_data_ptr<at::BFloat16>();
  auto* dst = packed.mutable_data_ptr<at::BFloat16>();
  for (int64_t c0 = 0; c0 < Z; c0 += kVnniBlock) {
    const int64_t w = std::min(kVnniBlock, Z - c0);
    at::native::cpublas::pack(F, w, Z, w, at::kBFloat16, at::kBFloat16, src + c0, dst + F * c0);
  }
  return {packed, true};
}

// z[pairs, Z] += A[pairs, F] · W2^T in bf16 with float32 accumulation.
void out_gemm_bf16(int64_t pairs, int64_t F, int64_t Z, const at::BFloat16* A, const OutWeightBf16& w2, float* z) {
  const auto* b = w2.data.const_data_ptr<at::BFloat16>();
  if (!w2.vnni) {
    at::native::cpublas::brgemm(pairs, Z, F, F, Z, Z, /*add_C=*/true, A, b, z, /*is_vnni=*/false);
    return;
  }
  for (int64_t c0 = 0; c0 < Z; c0 += kVnniBlock) {
    const int64_t w = std::min(kVnniBlock, Z - c0);
    at::native::cpublas::brgemm(pairs, w, F, F, w, Z, /*add_C=*/true, A, b + F * c0, z + c0, /*is_vnni=*/true);
  }
}

// Step 0's operands: the raw edge input as [B * N * N, X] rows and the embedding MLP's linears.
struct EdgeEmbedding {
  at::Tensor x, w_a_t, b_a, w_b_t, b_b;  // w_a_t [X, E_h], w_b_t [E_h, E_in] (transposed views)
};

// w2_bf16: null, or (float32 only) step 3 in bf16. embedding: null, or step 0 (then pr.edge is null).
template <typename T>
void semla_attention_tiles(const Problem<T>& pr, const at::Tensor& w_in_t, const at::Tensor& w_out_t,
                           const OutWeightBf16* w2_bf16, const EdgeEmbedding* embedding) {
  const int64_t N = pr.N, rows = pr.B * pr.N;
  // Ti rows per tile, Ti * N ≈ kTilePairs, spread evenly over the rows.
  const int64_t target = std::max<int64_t>(1, std::min<int64_t>(rows, (kTilePairs + N / 2) / N));
  const int64_t n_tiles = (rows + target - 1) / target;
  const int64_t tile_rows = (rows + n_tiles - 1) / n_tiles;
  const auto options = at::TensorOptions().dtype(c10::CppTypeToScalarType<T>::value);

  at::parallel_for(0, n_tiles, 1, [&](int64_t begin, int64_t end) {
    const int64_t max_pairs = tile_rows * N;
    at::Tensor K = at::empty({max_pairs, pr.Kd}, options);
    at::Tensor hidden = at::empty({max_pairs, pr.F}, options);
    at::Tensor z = at::empty({max_pairs, pr.Z}, options);
    at::Tensor A = w2_bf16 ? at::empty({max_pairs, pr.F}, at::kBFloat16) : at::Tensor();
    at::Tensor embed_hidden, embedded;
    if (embedding) {
      embed_hidden = at::empty({max_pairs, embedding->w_a_t.size(1)}, options);
      embedded = at::empty({max_pairs, pr.E_in}, options);
    }
    RowScratch<T> scratch(pr);
    for (int64_t tile = begin; tile < end; ++tile) {
      const int64_t r0 = tile * tile_rows, r1 = std::min(rows, r0 + tile_rows);
      if (r0 >= r1) continue;
      const int64_t pairs = (r1 - r0) * N;
      at::Tensor K_t = pairs == max_pairs ? K : K.narrow(0, 0, pairs);
      at::Tensor hidden_t = pairs == max_pairs ? hidden : hidden.narrow(0, 0, pairs);
      at::Tensor z_t = pairs == max_pairs ? z : z.narrow(0, 0, pairs);
      const T* edge = pr.E_in > 0 ? pr.edge + r0 * N * pr.E_in : nullptr;
      if (embedding) {  // step 0: the tile's e from its rows of x, which are consecutive
        at::Tensor h_t = pairs == max_pairs ? embed_hidden : embed_hidden.narrow(0, 0, pairs);
        at::Tensor e_t = pairs == max_pairs ? embedded : embedded.narrow(0, 0, pairs);
        at::cpu::addmm_out(h_t, embedding->b_a, embedding->x.narrow(0, r0 * N, pairs), embedding->w_a_t);
        silu_inplace(pr, h_t.mutable_data_ptr<T>(), h_t.numel());
        at::cpu::addmm_out(e_t, embedding->b_b, h_t, embedding->w_b_t);
        edge = e_t.const_data_ptr<T>();
      }
      pair_inputs(pr, r0, r1, edge, K.mutable_data_ptr<T>(), hidden.mutable_data_ptr<T>());
      if (pr.Kd > 0) at::cpu::addmm_(hidden_t, K_t, w_in_t);
      if constexpr (std::is_same_v<T, float>) {
        if (w2_bf16) {
          auto* A_bf16 = A.mutable_data_ptr<at::BFloat16>();
          silu_to_bf16_and_bias(pr, pairs, hidden.const_data_ptr<float>(), reinterpret_cast<uint16_t*>(A_bf16),
                                z.mutable_data_ptr<float>());
          out_gemm_bf16(pairs, pr.F, pr.Z, A_bf16, *w2_bf16, z.mutable_data_ptr<float>());
          attend(pr, r0, r1, z.mutable_data_ptr<T>(), scratch);
          continue;
        }
      }
      silu_and_bias(pr, pairs, hidden.mutable_data_ptr<T>(), z.mutable_data_ptr<T>());
      at::cpu::addmm_(z_t, hidden_t, w_out_t);
      attend(pr, r0, r1, z.mutable_data_ptr<T>(), scratch);
    }
    if (w2_bf16 && w2_bf16->vnni) at::native::cpublas::brgemm_release();  // the thread's AMX tile state
  });
}

// ---- the op ----

// x viewed as [batch, rows, cols] (contiguous after .contiguous()) → [batch, cols, rows]. A plain loop: ATen's
// permuted copy of these small tensors cost ~2% of the op.
at::Tensor batched_transpose(const at::Tensor& x, int64_t batch, int64_t rows, int64_t cols) {
  const at::Tensor in = x.contiguous();
  at::Tensor out = at::empty({batch, cols, rows}, in.options());
  AT_DISPATCH_FLOATING_TYPES(in.scalar_type(), "semla_attention_transpose", [&] {
    const scalar_t* src = in.const_data_ptr<scalar_t>();
    scalar_t* dst = out.mutable_data_ptr<scalar_t>();
    for (int64_t n = 0; n < batch; ++n, src += rows * cols, dst += rows * cols) {
      for (int64_t r = 0; r < rows; ++r) {
        for (int64_t c = 0; c < cols; ++c) dst[c * rows + r] = src[r * cols + c];
      }
    }
  });
  return out;
}

void check_tensor(const char* name, const at::Tensor& t, at::ScalarType dtype, at::IntArrayRef shape) {
  TORCH_CHECK(t.device().is_cpu(), "semla_attention (cpu kernel): ", name, " must be on cpu, got ", t.device());
  TORCH_CHECK(t.scalar_type() == dtype, "semla_attention: ", name, " must have dtype ", dtype, ", got ",
              t.scalar_type());
  bool ok = t.dim() == static_cast<int64_t>(shape.size());
  for (size_t d = 0; ok && d < shape.size(); ++d) ok = shape[d] < 0 || t.size(d) == shape[d];
  if (!ok) {
    std::vector<std::string> want;
    for (int64_t s : shape) want.push_back(s < 0 ? "*" : std::to_string(s));
    std::string expected = "[";
    for (size_t d = 0; d < want.size(); ++d) expected += (d ? ", " : "") + want[d];
    TORCH_CHECK(false, "semla_attention: ", name, " must have shape ", expected, "], got ", t.sizes());
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> semla_attention_cpu(
    const at::Tensor& node_terms_i, const at::Tensor& node_terms_j, const at::Tensor& gram_coords,
    const at::Tensor& gram_weight, const at::Tensor& out_weight, const at::Tensor& out_bias,
    const at::Tensor& values, const at::Tensor& attn_coords, const at::Tensor& adjacency,
    const std::optional<at::Tensor>& edge_feats, const std::optional<at::Tensor>& edge_norm_weight,
    const std::optional<at::Tensor>& edge_norm_bias, const std::optional<at::Tensor>& edge_weight,
    const std::optional<at::Tensor>& embed_weight1, const std::optional<at::Tensor>& embed_bias1,
    const std::optional<at::Tensor>& embed_weight2, const std::optional<at::Tensor>& embed_bias2,
    double edge_norm_eps, double coord_eps, c10::string_view precision) {
  const auto dtype = node_terms_i.scalar_type();
  TORCH_CHECK(precision == "fp32" || precision == "bf16",
              "semla_attention (cpu kernel): precision must be 'fp32' or 'bf16', got '", precision, "'");
  const bool bf16 = precision == "bf16";
  TORCH_CHECK(!bf16 || dtype == at::kFloat, "semla_attention: precision 'bf16' needs float32 inputs, got ", dtype);
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kDouble,
              "semla_attention: node_terms_i must be float32 or float64, got ", dtype);
  TORCH_CHECK(node_terms_i.dim() == 3, "semla_attention: node_terms_i must have shape [B, N, F], got ",
              node_terms_i.sizes());
  const int64_t B = node_terms_i.size(0), N = node_terms_i.size(1), F = node_terms_i.size(2);
  TORCH_CHECK(B > 0 && N > 0, "semla_attention: empty batch (node_terms_i has shape ", node_terms_i.sizes(), ")");
  check_tensor("node_terms_i", node_terms_i, dtype, {B, N, F});
  check_tensor("node_terms_j", node_terms_j, dtype, {B, N, F});
  check_tensor("gram_coords", gram_coords, dtype, {B, -1, N, 3});
  const int64_t S = gram_coords.size(1);
  check_tensor("gram_weight", gram_weight, dtype, {F, S});
  check_tensor("values", values, dtype, {B, N, -1, -1});
  const int64_t H = values.size(2), D = values.size(3);
  check_tensor("attn_coords", attn_coords, dtype, {B, -1, N, 3});
  const int64_t P = attn_coords.size(1);
  check_tensor("out_weight", out_weight, dtype, {-1, F});
  const int64_t Z = out_weight.size(0);
  TORCH_CHECK(Z >= H + P, "semla_attention: out_weight must have at least H + P = ", H + P, " rows, got ", Z);
  check_tensor("out_bias", out_bias, dtype, {Z});
  check_tensor("adjacency", adjacency, at::kBool, {B, N, N});
  const int given = edge_feats.has_value() + edge_norm_weight.has_value() + edge_norm_bias.has_value() +
                    edge_weight.has_value();
  TORCH_CHECK(given == 0 || given == 4, "semla_attention: edge_feats, edge_norm_weight, edge_norm_bias and "
              "edge_weight are given together or not at all");
  const int embedded = embed_weight1.has_value() + embed_bias1.has_value() + embed_weight2.has_value() +
                       embed_bias2.has_value();
  TORCH_CHECK(embedded == 0 || embedded == 4, "semla_attention: the edge embedding's weights and biases are "
              "given together or not at all");
  TORCH_CHECK(embedded == 0 || given == 4, "semla_attention: an edge embedding needs the edge-input block");
  int64_t E_in = 0;
  if (given == 4) {
    check_tensor("edge_feats", *edge_feats, dtype, {B, N, N, -1});
    E_in = edge_feats->size(3);
    if (embedded) {  // edge_feats is the raw input x of e = W_b silu(W_a x + b_a) + b_b
      check_tensor("embed_weight1", *embed_weight1, dtype, {-1, E_in});
      const int64_t E_h = embed_weight1->size(0);
      check_tensor("embed_bias1", *embed_bias1, dtype, {E_h});
      check_tensor("embed_weight2", *embed_weight2, dtype, {-1, E_h});
      E_in = embed_weight2->size(0);
      check_tensor("embed_bias2", *embed_bias2, dtype, {E_in});
    }
    check_tensor("edge_norm_weight", *edge_norm_weight, dtype, {E_in});
    check_tensor("edge_norm_bias", *edge_norm_bias, dtype, {E_in});
    check_tensor("edge_weight", *edge_weight, dtype, {F, E_in});
  }
  TORCH_CHECK(std::isfinite(edge_norm_eps) && std::isfinite(coord_eps),
              "semla_attention: edge_norm_eps and coord_eps must be finite");

  // Per-call layouts: coordinate sets and heads last, so that the hand loops run over contiguous sets and heads.
  const at::Tensor a = node_terms_i.contiguous(), c = node_terms_j.contiguous();
  const at::Tensor Xt = batched_transpose(gram_coords, B, S, N * 3);  // [B, N, 3, S]
  const at::Tensor Yt = batched_transpose(attn_coords, B, P, N * 3);  // [B, N, 3, P]
  const at::Tensor vt = batched_transpose(values, B * N, H, D);       // [B, N, D, H]
  const at::Tensor bias = out_bias.contiguous(), adj = adjacency.contiguous();
  at::Tensor edge, ln_w, ln_b;
  at::Tensor w_in = gram_weight;  // [F, S + E_in]: K · w_in^T is the Gram and edge term of hidden
  EdgeEmbedding embedding;
  if (E_in > 0) {
    edge = edge_feats->contiguous();
    if (embedded) {
      embedding = {edge.view({B * N * N, edge.size(3)}), embed_weight1->t(), embed_bias1->contiguous(),
                   embed_weight2->t(), embed_bias2->contiguous()};
    }
    ln_w = edge_norm_weight->contiguous();
    ln_b = edge_norm_bias->contiguous();
    w_in = at::cat({gram_weight, *edge_weight}, 1);
  }
  const at::Tensor w_in_t = w_in.t(), w_out_t = out_weight.t();  // transposed views; the GEMM reads either
  const OutWeightBf16 w2_bf16 = bf16 ? out_weight_bf16(out_weight) : OutWeightBf16{};

  at::Tensor node_agg = at::empty({B, N, H * D}, a.options());
  at::Tensor coord_agg = at::empty({B, N, P, 3}, a.options());
  at::Tensor edge_out = at::empty({B, N, N, Z - H - P}, a.options());

  AT_DISPATCH_FLOATING_TYPES(dtype, "semla_attention_cpu", [&] {
    Problem<scalar_t> pr;
    pr.B = B, pr.N = N, pr.F = F, pr.S = S, pr.H = H, pr.D = D, pr.P = P, pr.E_in = E_in, pr.E_out = Z - H - P;
    pr.Z = Z, pr.Kd = S + E_in;
    pr.a = a.const_data_ptr<scalar_t>();
    pr.c = c.const_data_ptr<scalar_t>();
    pr.Xt = Xt.const_data_ptr<scalar_t>();
    pr.bias = bias.const_data_ptr<scalar_t>();
    pr.vt = vt.const_data_ptr<scalar_t>();
    pr.Yt = Yt.const_data_ptr<scalar_t>();
    pr.adj = adj.const_data_ptr<bool>();
    pr.edge = E_in > 0 && !embedded ? edge.const_data_ptr<scalar_t>() : nullptr;
    pr.ln_w = E_in > 0 ? ln_w.const_data_ptr<scalar_t>() : nullptr;
    pr.ln_b = E_in > 0 ? ln_b.const_data_ptr<scalar_t>() : nullptr;
    pr.ln_eps = static_cast<scalar_t>(edge_norm_eps);
    pr.coord_eps = static_cast<scalar_t>(coord_eps);
    pr.node_out = node_agg.mutable_data_ptr<scalar_t>();
    pr.coord_out = coord_agg.mutable_data_ptr<scalar_t>();
    pr.edge_out = edge_out.mutable_data_ptr<scalar_t>();
    semla_attention_tiles<scalar_t>(pr, w_in_t, w_out_t, bf16 ? &w2_bf16 : nullptr, embedded ? &embedding : nullptr);
  });
  return {node_agg, coord_agg, edge_out};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastflow, CPU, m) { m.impl("semla_attention", &semla_attention_cpu); }

}  // namespace fastflow
