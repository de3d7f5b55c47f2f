// CPU kernel of fastflow::bond_head: BondRefine, the bond LayerNorm, the (i, j) + (j, i) symmetrisation and the
// edge output MLP of a Semla generator in one pass over the pairs (the math and the reference:
// fastflow/ops/bond_head.py).
//
// Each molecule's atoms are cut into blocks of ~kBlockAtoms; a block pair (I, J) with J >= I holds the ordered
// pairs I×J and J×I (I×I once on the diagonal). Consecutive block pairs, across molecules, are packed into tiles of
// at most kTilePairs ordered pairs (one block pair may exceed it), and each thread evaluates whole tiles in
// thread-local buffers:
//   1. per ordered pair (p, q) of the tile: K row = LN_edge(e'_pq), hidden row = a_p + c_q + w_d |x_p - x_q|²
//      + w_o x_p·x_q                                                         (BondRefine only)
//   2. hidden += K · W_e^T; silu; r = silu(hidden) · W2^T                    two GEMMs, pairs × F and pairs × E
//   3. per unordered pair {i, j} (i = j included): s = LN_bond(r_ij + b2) + LN_bond(r_ji + b2), into K's buffer
//      (without BondRefine r_ij + b2 is e'_ij, read straight from the input)
//   4. h = silu(s · Wh1^T + bh1); logits = h · Wh2^T + bh2                   two GEMMs, pairs/2 × G and × K
//   5. logits written at (i, j) and (j, i): the output is exactly symmetric.
// No [B, N, N, ·] tensor but the logits is written. The GEMMs are ATen's CPU addmm kernel called directly
// (at::cpu::addmm_: MKL sgemm/dgemm, no dispatcher; beta = 0 where the bias is added by the next pass), on the
// calling thread inside at::parallel_for. The hand loops run over contiguous channels and are compiled per ISA
// (GCC target_clones; csrc/common.h holds the dispatch macros and the element functions both kernels use).
// float32 uses a polynomial exp in SiLU (relative error ~2e-7); float64 uses std::exp.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/ops/addmm_cpu_dispatch.h>
#include <torch/library.h>

#include "common.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

namespace fastflow {
namespace {

constexpr int64_t kTilePairs = 512;  // ordered pairs per tile: the refinement GEMMs' M
constexpr int64_t kBlockAtoms = 16;  // atoms per block; a 16 × 16 off-diagonal block pair is 512 ordered pairs
constexpr int64_t kPrefetchRows = 4;  // e' rows prefetched ahead of the LayerNorm (~4% at the SemlaFlow widths)

// out = LN(in (+ shift)) · w + b over n channels (biased variance, as F.layer_norm), two passes; out may be in.
template <typename T>
FASTFLOW_INLINE void layer_norm_row(const T* in, const T* shift, T* out, int64_t n, const T* __restrict w,
                                    const T* __restrict b, T eps) {
  if (shift != nullptr) {
#pragma omp simd
    for (int64_t q = 0; q < n; ++q) out[q] = in[q] + shift[q];
    in = out;
  }
  const T mean = sum_of(in, n) / static_cast<T>(n);
#pragma omp simd
  for (int64_t q = 0; q < n; ++q) out[q] = in[q] - mean;
  const T rstd = T(1) / std::sqrt(sum_of_squares(out, n) / static_cast<T>(n) + eps);
#pragma omp simd
  for (int64_t q = 0; q < n; ++q) out[q] = out[q] * rstd * w[q] + b[q];
}

// ---- the problem ----

template <typename T>
struct Problem {
  int64_t B, N, E, F, G, K;
  bool refine;           // BondRefine arguments given
  const T* edge;         // e' [B, N, N, E]
  const T* bn_w;         // LN_bond [E]
  const T* bn_b;
  const T* bh1;          // [G]
  const T* bh2;          // [K]
  const T* a;            // [B, N, F] (refine only, as everything below)
  const T* c;            // [B, N, F]
  const T* x;            // [B, N, 3]
  const T* en_w;         // LN_edge [E]
  const T* en_b;
  const T* w_d;          // [F]
  const T* w_o;          // [F]
  const T* b2;           // [E]
  T edge_eps, bond_eps;
  float exp_lo = -87.0f, exp_hi = 88.0f;  // exp_fast's clamp
  T* out;                // [B, N, N, K]
};

// One tile's pairs, as global indices (atom b*N + p, pair (b*N + p)*N + q) and local rows of the ordered buffers.
struct TilePlan {
  std::vector<int64_t> atom_p, atom_q, pair;  // ordered pairs (p, q): rows of K, hidden, r
  std::vector<int64_t> pair_ij, pair_ji;      // unordered pairs {i, j}: the two ordered pairs' global indices
  std::vector<int64_t> row_ij, row_ji;        // ... and their local rows (refine)
};

// Block pair (b, I, J): atoms [i0, i0 + ni) × [j0, j0 + nj) of molecule b, j0 >= i0; diagonal when j0 == i0.
struct BlockPair {
  int64_t b, i0, ni, j0, nj;
  int64_t ordered() const { return i0 == j0 ? ni * ni : 2 * ni * nj; }
};

void plan_tile(const BlockPair* blocks, int64_t n_blocks, int64_t N, TilePlan& plan) {
  plan.atom_p.clear(), plan.atom_q.clear(), plan.pair.clear();
  plan.pair_ij.clear(), plan.pair_ji.clear(), plan.row_ij.clear(), plan.row_ji.clear();
  auto ordered = [&](int64_t bp, int64_t bq) {
    plan.atom_p.push_back(bp);
    plan.atom_q.push_back(bq);
    plan.pair.push_back(bp * N + bq % N);
  };
  for (int64_t k = 0; k < n_blocks; ++k) {
    const BlockPair& blk = blocks[k];
    const int64_t row0 = static_cast<int64_t>(plan.pair.size()), base = blk.b * N;
    if (blk.i0 == blk.j0) {
      for (int64_t ii = 0; ii < blk.ni; ++ii)
        for (int64_t jj = 0; jj < blk.ni; ++jj) ordered(base + blk.i0 + ii, base + blk.i0 + jj);
      for (int64_t ii = 0; ii < blk.ni; ++ii) {
        for (int64_t jj = ii; jj < blk.ni; ++jj) {
          plan.row_ij.push_back(row0 + ii * blk.ni + jj);
          plan.row_ji.push_back(row0 + jj * blk.ni + ii);
        }
      }
    } else {
      for (int64_t ii = 0; ii < blk.ni; ++ii)
        for (int64_t jj = 0; jj < blk.nj; ++jj) ordered(base + blk.i0 + ii, base + blk.j0 + jj);
      for (int64_t jj = 0; jj < blk.nj; ++jj)
        for (int64_t ii = 0; ii < blk.ni; ++ii) ordered(base + blk.j0 + jj, base + blk.i0 + ii);
      for (int64_t ii = 0; ii < blk.ni; ++ii) {
        for (int64_t jj = 0; jj < blk.nj; ++jj) {
          plan.row_ij.push_back(row0 + ii * blk.nj + jj);
          plan.row_ji.push_back(row0 + blk.ni * blk.nj + jj * blk.ni + ii);
        }
      }
    }
  }
  for (size_t u = 0; u < plan.row_ij.size(); ++u) {
    plan.pair_ij.push_back(plan.pair[plan.row_ij[u]]);
    plan.pair_ji.push_back(plan.pair[plan.row_ji[u]]);
  }
}

// Step 1: K rows = LN_edge(e'_pq), hidden rows = a_p + c_q + w_d |x_p - x_q|² + w_o x_p·x_q.
template <typename T>
FASTFLOW_INLINE void refine_inputs_impl(const Problem<T>& pr, const TilePlan& plan, T* K, T* hidden) {
  const int64_t E = pr.E, F = pr.F, rows = static_cast<int64_t>(plan.pair.size());
  const T* __restrict w_d = pr.w_d;
  const T* __restrict w_o = pr.w_o;
  for (int64_t row = 0; row < rows; ++row) {
    const int64_t p = plan.atom_p[row], q = plan.atom_q[row];
    if (row + kPrefetchRows < rows) {  // e' rows are read once, in short runs: fetch them ahead
      const char* next = reinterpret_cast<const char*>(pr.edge + plan.pair[row + kPrefetchRows] * E);
      for (int64_t byte = 0; byte < E * static_cast<int64_t>(sizeof(T)); byte += 64) __builtin_prefetch(next + byte);
    }
    layer_norm_row(pr.edge + plan.pair[row] * E, static_cast<const T*>(nullptr), K + row * E, E, pr.en_w, pr.en_b,
                   pr.edge_eps);
    const T* xp = pr.x + p * 3;
    const T* xq = pr.x + q * 3;
    const T dx = xp[0] - xq[0], dy = xp[1] - xq[1], dz = xp[2] - xq[2];
    const T sq_dist = dx * dx + dy * dy + dz * dz;
    const T dot = xp[0] * xq[0] + xp[1] * xq[1] + xp[2] * xq[2];
    const T* __restrict a_p = pr.a + p * F;
    const T* __restrict c_q = pr.c + q * F;
    T* __restrict h = hidden + row * F;
#pragma omp simd
    for (int64_t f = 0; f < F; ++f) h[f] = a_p[f] + c_q[f] + sq_dist * w_d[f] + dot * w_o[f];
  }
}

// x = silu(x + bias) in place over rows × n (bias [n] or null).
template <typename T>
FASTFLOW_INLINE void silu_rows_impl(const Problem<T>& pr, int64_t rows, int64_t n, const T* bias, T* x) {
  const float lo = pr.exp_lo, hi = pr.exp_hi;
  if (bias == nullptr) {
    const int64_t total = rows * n;
#pragma omp simd
    for (int64_t q = 0; q < total; ++q) x[q] = x[q] / (T(1) + exp_fast(-x[q], lo, hi));
    return;
  }
  for (int64_t row = 0; row < rows; ++row) {
    T* __restrict xr = x + row * n;
#pragma omp simd
    for (int64_t q = 0; q < n; ++q) {
      const T v = xr[q] + bias[q];
      xr[q] = v / (T(1) + exp_fast(-v, lo, hi));
    }
  }
}

// Step 3: s_u = LN_bond(r_ij + b2) + LN_bond(r_ji + b2) for the tile's unordered pairs; r rows from the tile's
// buffer (refine) or e' rows of the input (no refine, no b2). `tmp`: 2E scratch.
template <typename T>
FASTFLOW_INLINE void symmetrise_impl(const Problem<T>& pr, const TilePlan& plan, const T* r, T* s, T* tmp) {
  const int64_t E = pr.E, pairs = static_cast<int64_t>(plan.pair_ij.size());
  T* t1 = tmp;
  T* t2 = tmp + E;
  for (int64_t u = 0; u < pairs; ++u) {
    const T* r_ij = pr.refine ? r + plan.row_ij[u] * E : pr.edge + plan.pair_ij[u] * E;
    const T* r_ji = pr.refine ? r + plan.row_ji[u] * E : pr.edge + plan.pair_ji[u] * E;
    const T* shift = pr.refine ? pr.b2 : nullptr;
    layer_norm_row(r_ij, shift, t1, E, pr.bn_w, pr.bn_b, pr.bond_eps);
    layer_norm_row(r_ji, shift, t2, E, pr.bn_w, pr.bn_b, pr.bond_eps);
    T* __restrict su = s + u * E;
#pragma omp simd
    for (int64_t q = 0; q < E; ++q) su[q] = t1[q] + t2[q];
  }
}

// Step 5: out[ij] = out[ji] = logits_u + bh2.
template <typename T>
FASTFLOW_INLINE void write_logits_impl(const Problem<T>& pr, const TilePlan& plan, const T* logits) {
  const int64_t K = pr.K, pairs = static_cast<int64_t>(plan.pair_ij.size());
  for (int64_t u = 0; u < pairs; ++u) {
    T* __restrict o_ij = pr.out + plan.pair_ij[u] * K;
    T* __restrict o_ji = pr.out + plan.pair_ji[u] * K;
    for (int64_t k = 0; k < K; ++k) {
      const T v = logits[u * K + k] + pr.bh2[k];
      o_ij[k] = v;
      o_ji[k] = v;
    }
  }
}

// The hand loops, compiled per ISA (plain overloads: GCC clones these reliably, and compiles the always_inline
// templates above into each clone).
#define FASTFLOW_PER_TYPE(T)                                                                                   \
  FASTFLOW_CLONES void refine_inputs(const Problem<T>& pr, const TilePlan& plan, T* K, T* hidden) {            \
    refine_inputs_impl(pr, plan, K, hidden);                                                                  \
  }                                                                                                            \
  FASTFLOW_CLONES void silu_rows(const Problem<T>& pr, int64_t rows, int64_t n, const T* bias, T* x) {         \
    silu_rows_impl(pr, rows, n, bias, x);                                                                     \
  }                                                                                                            \
  FASTFLOW_CLONES void symmetrise(const Problem<T>& pr, const TilePlan& plan, const T* r, T* s, T* tmp) {      \
    symmetrise_impl(pr, plan, r, s, tmp);                                                                     \
  }                                                                                                            \
  FASTFLOW_CLONES void write_logits(const Problem<T>& pr, const TilePlan& plan, const T* logits) {             \
    write_logits_impl(pr, plan, logits);                                                                      \
  }
FASTFLOW_PER_TYPE(float)
FASTFLOW_PER_TYPE(double)
#undef FASTFLOW_PER_TYPE

// Block pairs of every molecule, and tiles as ranges of them: [tile_start[t], tile_start[t + 1]).
void plan_blocks(int64_t B, int64_t N, std::vector<BlockPair>& blocks, std::vector<int64_t>& tile_start) {
  const int64_t n_atom_blocks = (N + kBlockAtoms - 1) / kBlockAtoms;
  const int64_t block = (N + n_atom_blocks - 1) / n_atom_blocks;  // spread evenly: 17 atoms -> 9 + 8
  for (int64_t b = 0; b < B; ++b) {
    for (int64_t i0 = 0; i0 < N; i0 += block) {
      for (int64_t j0 = i0; j0 < N; j0 += block) {
        blocks.push_back({b, i0, std::min(block, N - i0), j0, std::min(block, N - j0)});
      }
    }
  }
  int64_t rows = 0;
  for (size_t k = 0; k < blocks.size(); ++k) {
    const int64_t n = blocks[k].ordered();
    if (k == 0 || rows + n > kTilePairs) {
      tile_start.push_back(static_cast<int64_t>(k));
      rows = 0;
    }
    rows += n;
  }
  tile_start.push_back(static_cast<int64_t>(blocks.size()));
}

template <typename T>
void bond_head_tiles(const Problem<T>& pr, const at::Tensor& w_e_t, const at::Tensor& w2_t, const at::Tensor& wh1_t,
                     const at::Tensor& wh2_t) {
  std::vector<BlockPair> blocks;
  std::vector<int64_t> tile_start;
  plan_blocks(pr.B, pr.N, blocks, tile_start);
  const int64_t n_tiles = static_cast<int64_t>(tile_start.size()) - 1;
  int64_t max_rows = 0;
  for (int64_t t = 0; t < n_tiles; ++t) {
    int64_t rows = 0;
    for (int64_t k = tile_start[t]; k < tile_start[t + 1]; ++k) rows += blocks[k].ordered();
    max_rows = std::max(max_rows, rows);
  }
  const int64_t max_pairs = max_rows;  // unordered pairs <= ordered pairs
  const auto options = at::TensorOptions().dtype(c10::CppTypeToScalarType<T>::value);

  at::parallel_for(0, n_tiles, 1, [&](int64_t begin, int64_t end) {
    // K holds LN_edge(e') (refine), then s; hidden and r only with BondRefine.
    at::Tensor K = at::empty({max_rows, pr.E}, options);
    at::Tensor hidden = pr.refine ? at::empty({max_rows, pr.F}, options) : at::Tensor();
    at::Tensor r = pr.refine ? at::empty({max_rows, pr.E}, options) : at::Tensor();
    at::Tensor h = at::empty({max_pairs, pr.G}, options);
    at::Tensor logits = at::empty({max_pairs, pr.K}, options);
    std::vector<T> tmp(2 * pr.E);
    TilePlan plan;
    for (int64_t t = begin; t < end; ++t) {
      plan_tile(blocks.data() + tile_start[t], tile_start[t + 1] - tile_start[t], pr.N, plan);
      const int64_t rows = static_cast<int64_t>(plan.pair.size());
      const int64_t pairs = static_cast<int64_t>(plan.pair_ij.size());
      if (pr.refine) {
        at::Tensor K_t = K.narrow(0, 0, rows), hidden_t = hidden.narrow(0, 0, rows), r_t = r.narrow(0, 0, rows);
        refine_inputs(pr, plan, K.mutable_data_ptr<T>(), hidden.mutable_data_ptr<T>());
        at::cpu::addmm_(hidden_t, K_t, w_e_t);
        silu_rows(pr, rows, pr.F, static_cast<const T*>(nullptr), hidden.mutable_data_ptr<T>());
        at::cpu::addmm_(r_t, hidden_t, w2_t, /*beta=*/0);
      }
      symmetrise(pr, plan, pr.refine ? r.const_data_ptr<T>() : nullptr, K.mutable_data_ptr<T>(), tmp.data());
      at::Tensor s_t = K.narrow(0, 0, pairs), h_t = h.narrow(0, 0, pairs), logits_t = logits.narrow(0, 0, pairs);
      at::cpu::addmm_(h_t, s_t, wh1_t, /*beta=*/0);
      silu_rows(pr, pairs, pr.G, pr.bh1, h.mutable_data_ptr<T>());
      at::cpu::addmm_(logits_t, h_t, wh2_t, /*beta=*/0);
      write_logits(pr, plan, logits.const_data_ptr<T>());
    }
  });
}

// ---- the op ----

void check_tensor(const char* name, const at::Tensor& t, at::ScalarType dtype, at::IntArrayRef shape) {
  TORCH_CHECK(t.device().is_cpu(), "bond_head (cpu kernel): ", name, " must be on cpu, got ", t.device());
  TORCH_CHECK(t.scalar_type() == dtype, "bond_head: ", name, " must have dtype ", dtype, ", got ", t.scalar_type());
  bool ok = t.dim() == static_cast<int64_t>(shape.size());
  for (size_t d = 0; ok && d < shape.size(); ++d) ok = shape[d] < 0 || t.size(d) == shape[d];
  if (!ok) {
    std::string expected = "[";
    for (size_t d = 0; d < shape.size(); ++d) {
      expected += (d ? ", " : "") + (shape[d] < 0 ? std::string("*") : std::to_string(shape[d]));
    }
    TORCH_CHECK(false, "bond_head: ", name, " must have shape ", expected, "], got ", t.sizes());
  }
}

at::Tensor bond_head_cpu(const at::Tensor& edge_feats, const at::Tensor& bond_norm_weight,
                         const at::Tensor& bond_norm_bias, const at::Tensor& head_weight1, const at::Tensor& head_bias1,
                         const at::Tensor& head_weight2, const at::Tensor& head_bias2,
                         const std::optional<at::Tensor>& node_terms_i, const std::optional<at::Tensor>& node_terms_j,
                         const std::optional<at::Tensor>& coords, const std::optional<at::Tensor>& edge_norm_weight,
                         const std::optional<at::Tensor>& edge_norm_bias, const std::optional<at::Tensor>& edge_weight,
                         const std::optional<at::Tensor>& dist_weight, const std::optional<at::Tensor>& dot_weight,
                         const std::optional<at::Tensor>& refine_weight, const std::optional<at::Tensor>& refine_bias,
                         double edge_norm_eps, double bond_norm_eps) {
  const auto dtype = edge_feats.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kDouble, "bond_head: edge_feats must be float32 or float64, got ",
              dtype);
  TORCH_CHECK(edge_feats.dim() == 4, "bond_head: edge_feats must have shape [B, N, N, E], got ", edge_feats.sizes());
  const int64_t B = edge_feats.size(0), N = edge_feats.size(1), E = edge_feats.size(3);
  TORCH_CHECK(B > 0 && N > 0, "bond_head: empty batch (edge_feats has shape ", edge_feats.sizes(), ")");
  TORCH_CHECK(E > 0, "bond_head: edge_feats has no channels (E = 0)");
  check_tensor("edge_feats", edge_feats, dtype, {B, N, N, E});
  check_tensor("bond_norm_weight", bond_norm_weight, dtype, {E});
  check_tensor("bond_norm_bias", bond_norm_bias, dtype, {E});
  check_tensor("head_weight1", head_weight1, dtype, {-1, E});
  const int64_t G = head_weight1.size(0);
  check_tensor("head_bias1", head_bias1, dtype, {G});
  check_tensor("head_weight2", head_weight2, dtype, {-1, G});
  const int64_t K = head_weight2.size(0);
  check_tensor("head_bias2", head_bias2, dtype, {K});
  const std::optional<at::Tensor>* refine_args[] = {&node_terms_i, &node_terms_j, &coords, &edge_norm_weight,
                                                    &edge_norm_bias, &edge_weight, &dist_weight, &dot_weight,
                                                    &refine_weight, &refine_bias};
  int given = 0;
  for (const auto* t : refine_args) given += t->has_value();
  TORCH_CHECK(given == 0 || given == 10, "bond_head: the BondRefine arguments (node_terms_i ... refine_bias) are "
              "given together or not at all");
  const bool refine = given == 10;
  int64_t F = 0;
  if (refine) {
    check_tensor("node_terms_i", *node_terms_i, dtype, {B, N, -1});
    F = node_terms_i->size(2);
    check_tensor("node_terms_j", *node_terms_j, dtype, {B, N, F});
    check_tensor("coords", *coords, dtype, {B, N, 3});
    check_tensor("edge_norm_weight", *edge_norm_weight, dtype, {E});
    check_tensor("edge_norm_bias", *edge_norm_bias, dtype, {E});
    check_tensor("edge_weight", *edge_weight, dtype, {F, E});
    check_tensor("dist_weight", *dist_weight, dtype, {F});
    check_tensor("dot_weight", *dot_weight, dtype, {F});
    check_tensor("refine_weight", *refine_weight, dtype, {E, F});
    check_tensor("refine_bias", *refine_bias, dtype, {E});
  }
  TORCH_CHECK(std::isfinite(edge_norm_eps) && std::isfinite(bond_norm_eps),
              "bond_head: edge_norm_eps and bond_norm_eps must be finite");

  const at::Tensor edge = edge_feats.contiguous(), bn_w = bond_norm_weight.contiguous(),
                   bn_b = bond_norm_bias.contiguous(), bh1 = head_bias1.contiguous(), bh2 = head_bias2.contiguous();
  // Transposed views of contiguous weights: the GEMMs read them as column-major operands, no copy per tile.
  const at::Tensor wh1_t = head_weight1.contiguous().t(), wh2_t = head_weight2.contiguous().t();
  at::Tensor a, c, x, en_w, en_b, w_d, w_o, b2, w_e_t, w2_t;
  if (refine) {
    a = node_terms_i->contiguous(), c = node_terms_j->contiguous(), x = coords->contiguous();
    en_w = edge_norm_weight->contiguous(), en_b = edge_norm_bias->contiguous();
    w_d = dist_weight->contiguous(), w_o = dot_weight->contiguous(), b2 = refine_bias->contiguous();
    w_e_t = edge_weight->contiguous().t(), w2_t = refine_weight->contiguous().t();
  }
  at::Tensor out = at::empty({B, N, N, K}, edge.options());
  if (K == 0) return out;

  AT_DISPATCH_FLOATING_TYPES(dtype, "bond_head_cpu", [&] {
    Problem<scalar_t> pr;
    pr.B = B, pr.N = N, pr.E = E, pr.F = F, pr.G = G, pr.K = K, pr.refine = refine;
    pr.edge = edge.const_data_ptr<scalar_t>();
    pr.bn_w = bn_w.const_data_ptr<scalar_t>();
    pr.bn_b = bn_b.const_data_ptr<scalar_t>();
    pr.bh1 = bh1.const_data_ptr<scalar_t>();
    pr.bh2 = bh2.const_data_ptr<scalar_t>();
    pr.a = refine ? a.const_data_ptr<scalar_t>() : nullptr;
    pr.c = refine ? c.const_data_ptr<scalar_t>() : nullptr;
    pr.x = refine ? x.const_data_ptr<scalar_t>() : nullptr;
    pr.en_w = refine ? en_w.const_data_ptr<scalar_t>() : nullptr;
    pr.en_b = refine ? en_b.const_data_ptr<scalar_t>() : nullptr;
    pr.w_d = refine ? w_d.const_data_ptr<scalar_t>() : nullptr;
    pr.w_o = refine ? w_o.const_data_ptr<scalar_t>() : nullptr;
    pr.b2 = refine ? b2.const_data_ptr<scalar_t>() : nullptr;
    pr.edge_eps = static_cast<scalar_t>(edge_norm_eps);
    pr.bond_eps = static_cast<scalar_t>(bond_norm_eps);
    pr.out = out.mutable_data_ptr<scalar_t>();
    bond_head_tiles<scalar_t>(pr, w_e_t, w2_t, wh1_t, wh2_t);
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(fastflow, CPU, m) { m.impl("bond_head", &bond_head_cpu); }

}  // namespace fastflow
