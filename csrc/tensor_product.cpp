// CPU kernels of fastflow::tensor_product, tensor_product_backward, tp_conv and tp_conv_backward (the math, the
// descriptor tensors and the reference: fastflow/ops/tensor_product.py).
//
// Layout. Every loop runs over a multiplicity index (u, v or w) innermost, so the rows of x1, x2 and the output
// are used in e3nn's "ir_mul" order within each irrep block (element [i][u] at pos + i·mul + u) rather than the
// "mul_ir" order of the tensors (off + u·d + i). A Layout lists the distinct blocks the paths read or write and
// where each sits in a transposed row. If every block has mul = 1 or d = 1 the two orders agree, and rows are
// used as they are (the edge attributes of a message-passing layer, 1x0e+1x1o+1x2e, are such a row).
//
// tp_conv sorts the edges by destination (a counting sort, stable, so the sum over a node's edges runs in edge
// order: deterministic) and runs over destination nodes in parallel, each node's messages summed in a
// thread-local accumulator and written once: no atomics and no [E, dim_out] intermediate. The node features are
// transposed to ir_mul once. The backward sorts by source: a source node's edges give its grad_node_feats row,
// each edge its own grad_edge_attrs and grad_weights rows. Shared weights get their gradient as one partial sum
// per chunk of rows, the chunks fixed by the problem size alone and summed in order, so the result does not
// depend on the thread count. tensor_product is the same code with edge z = row z.
//
// Edges are visited in destination (source) order, so their weight rows — most of the bytes read — come from
// memory at random: the rows of the edge two slots ahead are prefetched while the current one is computed.
//
// Per path and row (a = x1 block [d1][mul1], b = x2 block [d2][mul2], o = output block [d_out][mul_out], entries
// (i, j, k, c) the path's nonzero CG coefficients):
//   uvu: y[j][u] = Σ_v W[u,v] b[j][v], then o[k][u] += Σ c a[i][u] y[j][u]
//   uvv: z[i][v] = Σ_u W[u,v] a[i][u], then o[k][v] += Σ c z[i][v] b[j][v]
//   uuu: o[k][u] += Σ c (W[u] a[i][u]) b[j][u]
//   uuw: t[k][u] = Σ c a[i][u] b[j][u], then o[k][w] += Σ_u W[u,w] t[k][u]
//   uvw: per v, t[k][u] = Σ c a[i][u] b[j][v], then o[k][w] += Σ_u W[u,v,w] t[k][u]
// and uvu with mul2 = 1 (the common message-passing case) first folds b into M[i][k] = Σ_j c b[j] over the
// distinct (i, k) pairs of the path, then o[k][u] += W[u] Σ_i M[i][k] a[i][u] keeps each output vector in
// registers.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <string>
#include <utility>
#include <vector>

// The row loops are compiled once per x86 instruction set, each with vectors of its native width (x86-64-v4:
// 64 bytes, x86-64-v3: 32, baseline: 16), and picked at run time (the extension itself is built for the
// baseline). Not target_clones: the clones of one body would share one vector width, and vectors wider than the
// instruction set lower to memory round trips (4-6x slower). FASTFLOW_TP_ISA=avx2 or =sse2 in the environment
// caps the choice (to test those variants on a machine with AVX-512). Other compilers and CPUs get the one
// variant with 16-byte vectors.
#if defined(__GNUC__) && !defined(__clang__) && __GNUC__ >= 12 && defined(__x86_64__) && defined(__GLIBC__)
#define FASTFLOW_TP_X86_DISPATCH 1
#define FASTFLOW_TP_TARGET_V4 __attribute__((target("arch=x86-64-v4")))
#define FASTFLOW_TP_TARGET_V3 __attribute__((target("arch=x86-64-v3")))
#endif
#if defined(__GNUC__)
#define FASTFLOW_TP_INLINE inline __attribute__((always_inline))
#else
#define FASTFLOW_TP_INLINE inline
#endif

namespace fastflow {
namespace {

enum Mode : int64_t { kUVW = 0, kUVU = 1, kUVV = 2, kUUW = 3, kUUU = 4 };
constexpr const char* kModeNames[] = {"uvw", "uvu", "uvv", "uuw", "uuu"};
constexpr int I = 0, J = 1, K = 2;  // which index of a CG entry a contraction operand uses

// ---- the descriptor ----

struct Block {
  int64_t off, mul, dim, pos;  // mul_ir offset in the tensor row; pos: offset in the ir_mul row
};

struct Layout {
  std::vector<Block> blocks;
  int64_t width = 0;    // elements of a row in this layout
  bool trivial = true;  // ir_mul = mul_ir for every block: rows are used as they are (pos = off)

  int64_t add(int64_t off, int64_t mul, int64_t dim) {
    for (size_t b = 0; b < blocks.size(); ++b) {
      if (blocks[b].off == off && blocks[b].mul == mul && blocks[b].dim == dim) return static_cast<int64_t>(b);
    }
    blocks.push_back({off, mul, dim, 0});
    return static_cast<int64_t>(blocks.size()) - 1;
  }

  void finish(int64_t row_dim) {
    trivial = std::all_of(blocks.begin(), blocks.end(), [](const Block& b) { return b.mul == 1 || b.dim == 1; });
    width = trivial ? row_dim : 0;
    for (Block& b : blocks) {
      b.pos = trivial ? b.off : width;
      if (!trivial) width += b.mul * b.dim;
    }
  }
};

struct Path {
  int64_t mode, mul1, d1, mul2, d2, mul_out, d_out;
  int64_t block1, block2, block_out;  // into the layouts, then
  int64_t pos1, pos2, pos_out;        // the blocks' positions in the ir_mul rows
  int64_t w_off, w_size;
  bool has_weight;
  int64_t begin, end;            // its CG entries
  int64_t pair_begin, pair_end;      // its distinct (i, k) pairs, grouped by k (uvu with mul2 = 1 only)
  int64_t jgroup_begin, jgroup_end;  // and its terms again, grouped by j (for the backward)
};

template <typename T>
struct Entry {
  int32_t idx[3];  // i, j, k
  T c;
};

// uvu with mul2 = 1: M[i][k] = Σ_t c_t b[j_t] over the terms t_begin : t_end of the pair (i, k)
struct Pair {
  int32_t i, k;
  int32_t t_begin, t_end;
};

template <typename T>
struct Term {
  int32_t j;
  T c;
};

// The same terms by j: gb[j] = Σ_t c_t D[q_t] over the terms begin : end of group j (q: the pair, from the
// path's first)
struct JGroup {
  int32_t j, begin, end;
};

template <typename T>
struct JTerm {
  int32_t q;
  T c;
};

template <typename T>
struct Descriptor {
  std::vector<Path> paths;
  std::vector<Entry<T>> entries;
  std::vector<Pair> pairs;
  std::vector<Term<T>> terms;
  std::vector<JGroup> jgroups;
  std::vector<JTerm<T>> jterms;
  Layout in1, in2, out;
  std::vector<T> ones;  // W of the paths without weights
  int64_t scratch = 0;  // per-row scratch elements of the widest path
  int64_t max_pairs = 0;
  int64_t fold_lo = 0, fold_hi = 0;  // the x2 ir_mul columns of the uvu paths with mul2 = 1
};

// Checks the descriptor tensors against the rows they describe and converts them; every message names the op
// and the argument.
template <typename T>
Descriptor<T> parse_descriptor(const char* op, const at::Tensor& paths_t, const at::Tensor& cg_index_t,
                               const at::Tensor& cg_value_t, const at::Tensor& cg_offsets_t, int64_t dim1,
                               int64_t dim2, int64_t dim_out, int64_t n_weights) {
  const at::Tensor paths = paths_t.contiguous(), cg_index = cg_index_t.contiguous();
  const at::Tensor cg_value = cg_value_t.contiguous(), cg_offsets = cg_offsets_t.contiguous();
  const int64_t P = paths.size(0), C = cg_index.size(0);
  const int64_t* pa = paths.const_data_ptr<int64_t>();
  const int64_t* ci = cg_index.const_data_ptr<int64_t>();
  const T* cv = cg_value.const_data_ptr<T>();
  const int64_t* co = cg_offsets.const_data_ptr<int64_t>();
  TORCH_CHECK(co[0] == 0 && co[P] == C, op, ": cg_offsets must start at 0 and end at the number of cg_index rows (",
              C, "), got ", co[0], " and ", co[P]);

  Descriptor<T> D;
  int64_t max_ones = 0;
  for (int64_t p = 0; p < P; ++p) {
    const int64_t* r = pa + 12 * p;
    Path q{};
    q.mode = r[0];
    TORCH_CHECK(q.mode >= 0 && q.mode <= 4, op, ": paths[", p, "] has mode ", q.mode,
                "; modes are 0..4 (uvw, uvu, uvv, uuw, uuu)");
    const int64_t off1 = r[1], off2 = r[4], off_out = r[7];
    q.mul1 = r[2], q.d1 = r[3], q.mul2 = r[5], q.d2 = r[6], q.mul_out = r[8], q.d_out = r[9];
    q.w_off = r[10];
    TORCH_CHECK(r[11] == 0 || r[11] == 1, op, ": paths[", p, "] has has_weight ", r[11], ", expected 0 or 1");
    q.has_weight = r[11] == 1;
    const char* mode = kModeNames[q.mode];
    TORCH_CHECK(q.mul1 >= 0 && q.mul2 >= 0 && q.mul_out >= 0 && q.d1 >= 1 && q.d2 >= 1 && q.d_out >= 1 &&
                    q.d1 < (1 << 30) && q.d2 < (1 << 30) && q.d_out < (1 << 30),
                op, ": paths[", p, "] needs multiplicities >= 0 and irrep dimensions >= 1, got mul1 ", q.mul1,
                ", d1 ", q.d1, ", mul2 ", q.mul2, ", d2 ", q.d2, ", mul_out ", q.mul_out, ", d_out ", q.d_out);
    // (written so that nothing overflows: mul <= dim / d before mul·d is formed)
    auto fits = [](int64_t off, int64_t mul, int64_t d, int64_t dim) {
      return off >= 0 && mul <= dim / d && off <= dim - mul * d;
    };
    TORCH_CHECK(fits(off1, q.mul1, q.d1, dim1), op, ": paths[", p, "] reads x1 columns ", off1, " + ", q.mul1,
                "x", q.d1, ", outside the ", dim1, " columns of x1");
    TORCH_CHECK(fits(off2, q.mul2, q.d2, dim2), op, ": paths[", p, "] reads x2 columns ", off2, " + ", q.mul2,
                "x", q.d2, ", outside the ", dim2, " columns of x2");
    TORCH_CHECK(fits(off_out, q.mul_out, q.d_out, dim_out), op, ": paths[", p, "] writes output columns ", off_out,
                " + ", q.mul_out, "x", q.d_out, ", outside dim_out = ", dim_out);
    // weights of the path: the product of the multiplicities named by the mode (as a double first: the
    // multiplicities are bounded by the row widths only, and a width-only bound does not keep it in int64)
    double size = 0;
    switch (q.mode) {
      case kUVW: size = static_cast<double>(q.mul1) * static_cast<double>(q.mul2) * q.mul_out; break;
      case kUVU:
        TORCH_CHECK(q.mul_out == q.mul1, op, ": paths[", p, "] (uvu) needs mul_out == mul1, got ", q.mul_out,
                    " and ", q.mul1);
        size = static_cast<double>(q.mul1) * q.mul2;
        break;
      case kUVV:
        TORCH_CHECK(q.mul_out == q.mul2, op, ": paths[", p, "] (uvv) needs mul_out == mul2, got ", q.mul_out,
                    " and ", q.mul2);
        size = static_cast<double>(q.mul1) * q.mul2;
        break;
      case kUUW:
        TORCH_CHECK(q.mul2 == q.mul1, op, ": paths[", p, "] (uuw) needs mul2 == mul1, got ", q.mul2, " and ",
                    q.mul1);
        size = static_cast<double>(q.mul1) * q.mul_out;
        break;
      default:
        TORCH_CHECK(q.mul2 == q.mul1 && q.mul_out == q.mul1, op, ": paths[", p,
                    "] (uuu) needs mul1 == mul2 == mul_out, got ", q.mul1, ", ", q.mul2, ", ", q.mul_out);
        size = static_cast<double>(q.mul1);
    }
    if (q.has_weight) {
      TORCH_CHECK(q.w_off >= 0 && q.w_off <= n_weights && size <= static_cast<double>(n_weights - q.w_off), op,
                  ": paths[", p, "] (", mode, ") uses weights ", q.w_off, " : ", q.w_off, " + ", size,
                  ", outside the ", n_weights, " weights per row of weights");
      q.w_size = static_cast<int64_t>(size);
    } else if (q.mode != kUVW && q.mode != kUUW) {  // W = 1 is read from a buffer of ones; uvw, uuw have code
      TORCH_CHECK(size <= static_cast<double>(int64_t(1) << 31), op, ": paths[", p, "] (", mode,
                  ") has no weights and ", size, " implicit unit weights, too many");
      q.w_size = static_cast<int64_t>(size);
      max_ones = std::max(max_ones, q.w_size);
    }
    q.begin = co[p], q.end = co[p + 1];
    TORCH_CHECK(q.begin <= q.end, op, ": cg_offsets must be non-decreasing, got cg_offsets[", p, "] = ", q.begin,
                " > cg_offsets[", p + 1, "] = ", q.end);
    q.block1 = D.in1.add(off1, q.mul1, q.d1);
    q.block2 = D.in2.add(off2, q.mul2, q.d2);
    q.block_out = D.out.add(off_out, q.mul_out, q.d_out);
    const int64_t max_d = std::max({q.d1, q.d2, q.d_out}), max_mul = std::max({q.mul1, q.mul2, q.mul_out});
    D.scratch = std::max(D.scratch, max_d * max_mul);
    D.paths.push_back(q);
  }

  D.entries.resize(C);
  for (Path& q : D.paths) {
    const bool folded = q.mode == kUVU && q.mul2 == 1;
    q.pair_begin = q.pair_end = static_cast<int64_t>(D.pairs.size());
    for (int64_t e = q.begin; e < q.end; ++e) {
      const int64_t i = ci[3 * e], j = ci[3 * e + 1], k = ci[3 * e + 2];
      TORCH_CHECK(i >= 0 && i < q.d1 && j >= 0 && j < q.d2 && k >= 0 && k < q.d_out, op, ": cg_index[", e,
                  "] = (", i, ", ", j, ", ", k, ") is outside the (d1, d2, d_out) = (", q.d1, ", ", q.d2, ", ",
                  q.d_out, ") of its path");
      D.entries[e] = {{static_cast<int32_t>(i), static_cast<int32_t>(j), static_cast<int32_t>(k)}, cv[e]};
    }
    if (folded) {  // the distinct (i, k), grouped by k, each with its terms (j, c); then the terms by j
      std::vector<int64_t> order(q.end - q.begin);
      for (size_t n = 0; n < order.size(); ++n) order[n] = q.begin + static_cast<int64_t>(n);
      auto ki = [&](int64_t e) { return std::make_pair(D.entries[e].idx[K], D.entries[e].idx[I]); };
      std::stable_sort(order.begin(), order.end(), [&](int64_t x, int64_t y) { return ki(x) < ki(y); });
      std::vector<std::pair<int32_t, int32_t>> term_pairs;  // (j, pair from the path's first) of each term
      for (size_t n = 0; n < order.size(); ++n) {
        const Entry<T>& x = D.entries[order[n]];
        if (n == 0 || ki(order[n - 1]) != ki(order[n])) {
          const auto t = static_cast<int32_t>(D.terms.size());
          D.pairs.push_back({x.idx[I], x.idx[K], t, t});
          ++q.pair_end;
        }
        D.terms.push_back({x.idx[J], x.c});
        D.pairs.back().t_end = static_cast<int32_t>(D.terms.size());
        term_pairs.emplace_back(x.idx[J], static_cast<int32_t>(q.pair_end - 1 - q.pair_begin));
      }
      D.max_pairs = std::max(D.max_pairs, q.pair_end - q.pair_begin);
      const int64_t first_term = static_cast<int64_t>(D.terms.size()) - static_cast<int64_t>(order.size());
      std::vector<int64_t> by_j(order.size());
      for (size_t n = 0; n < by_j.size(); ++n) by_j[n] = static_cast<int64_t>(n);
      std::stable_sort(by_j.begin(), by_j.end(),
                       [&](int64_t x, int64_t y) { return term_pairs[x].first < term_pairs[y].first; });
      q.jgroup_begin = q.jgroup_end = static_cast<int64_t>(D.jgroups.size());
      for (size_t n = 0; n < by_j.size(); ++n) {
        const int32_t j = term_pairs[by_j[n]].first;
        if (n == 0 || term_pairs[by_j[n - 1]].first != j) {
          const auto t = static_cast<int32_t>(D.jterms.size());
          D.jgroups.push_back({j, t, t});
          ++q.jgroup_end;
        }
        D.jterms.push_back({term_pairs[by_j[n]].second, D.terms[first_term + by_j[n]].c});
        D.jgroups.back().end = static_cast<int32_t>(D.jterms.size());
      }
    }
  }
  D.in1.finish(dim1);
  D.in2.finish(dim2);
  D.out.finish(dim_out);
  D.fold_lo = D.in2.width;
  for (Path& q : D.paths) {
    q.pos1 = D.in1.blocks[q.block1].pos;
    q.pos2 = D.in2.blocks[q.block2].pos;
    q.pos_out = D.out.blocks[q.block_out].pos;
    if (q.mode == kUVU && q.mul2 == 1) {
      D.fold_lo = std::min(D.fold_lo, q.pos2);
      D.fold_hi = std::max(D.fold_hi, q.pos2 + q.d2);
    }
  }
  D.fold_lo = std::min(D.fold_lo, D.fold_hi);
  D.ones.assign(max_ones, T(1));
  D.scratch *= 2;
  return D;
}

// ---- row layouts ----

template <typename T>
FASTFLOW_TP_INLINE void to_ir_mul(const Layout& L, const T* __restrict row, T* __restrict t) {
  for (const Block& b : L.blocks) {
    const T* src = row + b.off;
    T* dst = t + b.pos;
    for (int64_t u = 0; u < b.mul; ++u) {
      for (int64_t i = 0; i < b.dim; ++i) dst[i * b.mul + u] = src[u * b.dim + i];
    }
  }
}

// row = the ir_mul row t in mul_ir order; columns outside every block are 0, overlapping blocks add up.
template <typename T>
FASTFLOW_TP_INLINE void from_ir_mul(const Layout& L, const T* __restrict t, T* __restrict row, int64_t dim) {
  if (L.trivial) {
    std::memcpy(row, t, dim * sizeof(T));
    return;
  }
  std::memset(row, 0, dim * sizeof(T));
  for (const Block& b : L.blocks) {
    const T* src = t + b.pos;
    T* dst = row + b.off;
    for (int64_t u = 0; u < b.mul; ++u) {
      for (int64_t i = 0; i < b.dim; ++i) dst[u * b.dim + i] += src[i * b.mul + u];
    }
  }
}

// ---- contractions over CG entries, vectorised over the multiplicity ----

// out[O][u] += c · A[Ai][u] · B[Bi][u]   (rows of out, A, B at strides so, sa, sb)
template <int O, int Ai, int Bi, typename T>
FASTFLOW_TP_INLINE void contract(T* out, int64_t so, const T* A, int64_t sa, const T* B, int64_t sb, int64_t n,
                                 const Entry<T>* e, const Entry<T>* e_end) {
  for (; e != e_end; ++e) {
    T* __restrict o = out + e->idx[O] * so;
    const T* __restrict x = A + e->idx[Ai] * sa;
    const T* __restrict y = B + e->idx[Bi] * sb;
    const T c = e->c;
#pragma omp simd
    for (int64_t u = 0; u < n; ++u) o[u] += c * x[u] * y[u];
  }
}

// out[O][u] += c · s[Bi·ss] · A[Ai][u]   (s: one scalar per B index)
template <int O, int Ai, int Bi, typename T>
FASTFLOW_TP_INLINE void contract_scalar(T* out, int64_t so, const T* A, int64_t sa, const T* s, int64_t ss,
                                        int64_t n, const Entry<T>* e, const Entry<T>* e_end) {
  for (; e != e_end; ++e) {
    T* __restrict o = out + e->idx[O] * so;
    const T* __restrict x = A + e->idx[Ai] * sa;
    const T c = e->c * s[e->idx[Bi] * ss];
#pragma omp simd
    for (int64_t u = 0; u < n; ++u) o[u] += c * x[u];
  }
}

// out[O·so] += c · Σ_u A[Ai][u] · B[Bi][u]
template <int O, int Ai, int Bi, typename T>
FASTFLOW_TP_INLINE void contract_dot(T* out, int64_t so, const T* A, int64_t sa, const T* B, int64_t sb, int64_t n,
                                     const Entry<T>* e, const Entry<T>* e_end) {
  for (; e != e_end; ++e) {
    const T* __restrict x = A + e->idx[Ai] * sa;
    const T* __restrict y = B + e->idx[Bi] * sb;
    T acc = 0;
#pragma omp simd reduction(+ : acc)
    for (int64_t u = 0; u < n; ++u) acc += x[u] * y[u];
    out[e->idx[O] * so] += e->c * acc;
  }
}

template <typename T>
FASTFLOW_TP_INLINE void fill_zero(T* x, int64_t n) {
  std::memset(x, 0, n * sizeof(T));
}

// uvv: z[i][v] = Σ_u W[u][v] a[i][u], the first input mixed into the output multiplicity (forward and backward)
template <typename T>
FASTFLOW_TP_INLINE void mix_first_input(T* z, const T* a, const T* W, int64_t d1, int64_t m1, int64_t m2) {
  fill_zero(z, d1 * m2);
  for (int64_t u = 0; u < m1; ++u) {
    const T* __restrict Wu = W + u * m2;
    for (int64_t i = 0; i < d1; ++i) {
      T* __restrict zi = z + i * m2;
      const T av = a[i * m1 + u];
#pragma omp simd
      for (int64_t v = 0; v < m2; ++v) zi[v] += Wu[v] * av;
    }
  }
}

// ---- one path on one row ----

// Paths without weights, uuw and uvw: o[k][w] += Σ_u t[k][u] for every w (W = 1)
template <typename T>
FASTFLOW_TP_INLINE void add_row_sums(const T* t, int64_t m1, int64_t d_out, T* o, int64_t mo) {
  for (int64_t k = 0; k < d_out; ++k) {
    T sum = 0;
    for (int64_t u = 0; u < m1; ++u) sum += t[k * m1 + u];
    for (int64_t w = 0; w < mo; ++w) o[k * mo + w] += sum;
  }
}

// ... and the backward: gt[k][u] = Σ_w g[k][w] for every u
template <typename T>
FASTFLOW_TP_INLINE void broadcast_row_sums(const T* g, int64_t mo, int64_t d_out, T* gt, int64_t m1) {
  for (int64_t k = 0; k < d_out; ++k) {
    T sum = 0;
    for (int64_t w = 0; w < mo; ++w) sum += g[k * mo + w];
    for (int64_t u = 0; u < m1; ++u) gt[k * m1 + u] = sum;
  }
}

// ---- uvu with mul2 = 1 ----
//
// M[i][k] = Σ_j c b[j] is computed once per pair (i, k); then, per output row k and block of multiplicities,
// the sum over the row's pairs stays in registers: blocks of Simd::kBlock vectors, then single vectors, then a
// scalar remainder.

// Vectors of VB bytes (GCC vector extensions; one scalar per "vector" for other compilers) and how many of them
// a block keeps in registers.
#if defined(__GNUC__)
// The helpers are always inlined, so the ABI of passing wide vectors (which GCC warns about for instantiations
// wider than the baseline) never comes into play.
#pragma GCC diagnostic ignored "-Wpsabi"
#endif
template <typename T, int VB>
struct Simd {
#if defined(__GNUC__)
  typedef T V __attribute__((vector_size(VB)));
#else
  using V = T;
#endif
  static constexpr int64_t kLanes = sizeof(V) / sizeof(T);
  static constexpr int kBlock = VB >= 64 ? 2 : 4;  // vectors per register block: 2 zmm, 4 ymm, 4 xmm

  static FASTFLOW_TP_INLINE V zero() { return V{}; }
  static FASTFLOW_TP_INLINE V load(const T* p) {
    V v;
    std::memcpy(&v, p, sizeof(v));
    return v;
  }
  static FASTFLOW_TP_INLINE void store(T* p, const V& v) { std::memcpy(p, &v, sizeof(v)); }
  // Σ of the lanes, pairwise (a sequential sum is a chain of dependent scalar adds)
  static FASTFLOW_TP_INLINE T sum(const V& v) {
    T lanes[kLanes];
    std::memcpy(lanes, &v, sizeof(v));
#pragma GCC unroll 8
    for (int64_t w = kLanes / 2; w > 0; w /= 2) {
#pragma GCC unroll 16
      for (int64_t l = 0; l < w; ++l) lanes[l] += lanes[l + w];
    }
    return lanes[0];
  }
};
constexpr int kMaxVectorBytes = 64;

template <typename T>
FASTFLOW_TP_INLINE void fold_b(const Path& p, const Pair* pairs, const Term<T>* terms, const T* b, T* M) {
  for (int64_t q = p.pair_begin; q < p.pair_end; ++q) {
    T m = 0;
    for (const Term<T>* t = terms + pairs[q].t_begin; t != terms + pairs[q].t_end; ++t) m += t->c * b[t->j];
    M[q - p.pair_begin] = m;
  }
}

// o[k][u0 : u0 + NV·lanes] += W[u] Σ_{q in q0:q1} M[q] a[i_q][u]
template <typename T, int VB, int NV>
FASTFLOW_TP_INLINE void folded_forward_block(const Pair* pr, int64_t q0, int64_t q1, const T* M, const T* a,
                                             int64_t m1, const T* W, T* ok, int64_t u0) {
  using S = Simd<T, VB>;
  constexpr int64_t VL = S::kLanes;
  typename S::V acc[NV];
  for (int v = 0; v < NV; ++v) acc[v] = S::zero();
  for (int64_t q = q0; q < q1; ++q) {
    const T* x = a + pr[q].i * m1 + u0;
    const T c = M[q];
    for (int v = 0; v < NV; ++v) acc[v] += c * S::load(x + v * VL);
  }
  for (int v = 0; v < NV; ++v) {
    T* o = ok + u0 + v * VL;
    S::store(o, S::load(o) + S::load(W + u0 + v * VL) * acc[v]);
  }
}

template <typename T>
FASTFLOW_TP_INLINE void folded_forward_rest(const Pair* pr, int64_t q0, int64_t q1, const T* M, const T* a,
                                            int64_t m1, const T* W, T* ok, int64_t u0, T* t) {
  const int64_t n = m1 - u0;
  fill_zero(t, n);
  for (int64_t q = q0; q < q1; ++q) {
    const T* __restrict x = a + pr[q].i * m1 + u0;
    const T c = M[q];
#pragma omp simd
    for (int64_t l = 0; l < n; ++l) t[l] += c * x[l];
  }
#pragma omp simd
  for (int64_t l = 0; l < n; ++l) ok[u0 + l] += W[u0 + l] * t[l];
}

// s: n_pairs + mul1 elements
template <typename T, int VB>
FASTFLOW_TP_INLINE void folded_forward(const Path& p, const Pair* pairs, const Term<T>* terms, const T* a,
                                       const T* b, const T* W, T* o, T* s) {
  constexpr int64_t VL = Simd<T, VB>::kLanes, NB = Simd<T, VB>::kBlock;
  const int64_t m1 = p.mul1, n_pairs = p.pair_end - p.pair_begin;
  const Pair* pr = pairs + p.pair_begin;
  T* M = s;
  fold_b(p, pairs, terms, b, M);
  for (int64_t q0 = 0, q1; q0 < n_pairs; q0 = q1) {
    const int64_t k = pr[q0].k;
    for (q1 = q0 + 1; q1 < n_pairs && pr[q1].k == k; ++q1) {
    }
    T* ok = o + k * m1;
    int64_t u0 = 0;
    for (; u0 + NB * VL <= m1; u0 += NB * VL) folded_forward_block<T, VB, NB>(pr, q0, q1, M, a, m1, W, ok, u0);
    for (; u0 + VL <= m1; u0 += VL) folded_forward_block<T, VB, 1>(pr, q0, q1, M, a, m1, W, ok, u0);
    if (u0 < m1) folded_forward_rest(pr, q0, q1, M, a, m1, W, ok, u0, s + n_pairs);
  }
}

// One block of the backward of one output row k, u in u0 : u0 + NV·lanes:
//   ga[i][u] += M[i][k] W[u] g[k][u];  gW[u] += g[k][u] Σ_i M[i][k] a[i][u];
//   D[q] += Σ_u a[i][u] W[u] g[k][u], kept as one vector per pair (dv[q], lanes summed later)
template <typename T, int VB, int NV>
FASTFLOW_TP_INLINE void folded_backward_block(const Pair* pr, int64_t q0, int64_t q1, const T* M, const T* gk,
                                              const T* a, int64_t m1, const T* W, T* ga, T* gW, T* dv,
                                              int64_t u0) {
  using S = Simd<T, VB>;
  using V = typename S::V;
  constexpr int64_t VL = S::kLanes;
  V wg[NV], t[NV];
  for (int v = 0; v < NV; ++v) {
    wg[v] = S::load(W + u0 + v * VL) * S::load(gk + u0 + v * VL);
    t[v] = S::zero();
  }
  for (int64_t q = q0; q < q1; ++q) {
    const T* x = a + pr[q].i * m1 + u0;
    T* gx = ga + pr[q].i * m1 + u0;
    const T c = M[q];
    V d = S::zero();
    for (int v = 0; v < NV; ++v) {
      const V xv = S::load(x + v * VL);
      S::store(gx + v * VL, S::load(gx + v * VL) + c * wg[v]);
      d += xv * wg[v];
      t[v] += c * xv;
    }
    S::store(dv + q * VL, S::load(dv + q * VL) + d);
  }
  if (gW != nullptr) {
    for (int v = 0; v < NV; ++v) {
      T* gw = gW + u0 + v * VL;
      S::store(gw, S::load(gw) + S::load(gk + u0 + v * VL) * t[v]);
    }
  }
}

template <typename T>
FASTFLOW_TP_INLINE void folded_backward_rest(const Pair* pr, int64_t q0, int64_t q1, const T* M, const T* gk,
                                             const T* a, int64_t m1, const T* W, T* ga, T* gW, T* dv, int64_t VL,
                                             int64_t u0, T* s) {
  const int64_t n = m1 - u0;
  T* __restrict wg = s;
  T* __restrict t = s + n;
#pragma omp simd
  for (int64_t l = 0; l < n; ++l) {
    wg[l] = W[u0 + l] * gk[u0 + l];
    t[l] = 0;
  }
  for (int64_t q = q0; q < q1; ++q) {
    const T* __restrict x = a + pr[q].i * m1 + u0;
    T* __restrict gx = ga + pr[q].i * m1 + u0;
    const T c = M[q];
    T d = 0;
#pragma omp simd reduction(+ : d)
    for (int64_t l = 0; l < n; ++l) {
      gx[l] += c * wg[l];
      d += x[l] * wg[l];
      t[l] += c * x[l];
    }
    dv[q * VL] += d;
  }
  if (gW != nullptr) {
#pragma omp simd
    for (int64_t l = 0; l < n; ++l) gW[u0 + l] += gk[u0 + l] * t[l];
  }
}

// gbv: [d2][lanes] vector accumulators of gb (summed by the caller); s: n_pairs (1 + lanes) + 2 mul1 elements
template <typename T, int VB>
FASTFLOW_TP_INLINE void folded_backward(const Path& p, const Pair* pairs, const Term<T>* terms,
                                        const JGroup* jgroups, const JTerm<T>* jterms, const T* g, const T* a,
                                        const T* b, const T* W, T* ga, T* gbv, T* gW, T* s) {
  using S = Simd<T, VB>;
  constexpr int64_t VL = S::kLanes, NB = S::kBlock;
  const int64_t m1 = p.mul1, n_pairs = p.pair_end - p.pair_begin;
  const Pair* pr = pairs + p.pair_begin;
  T* M = s;
  T* dv = s + n_pairs;  // [n_pairs][VL]: D[q] = Σ_u a[i][u] W[u] g[k][u], lanes not yet summed
  fold_b(p, pairs, terms, b, M);
  fill_zero(dv, n_pairs * VL);
  for (int64_t q0 = 0, q1; q0 < n_pairs; q0 = q1) {
    const int64_t k = pr[q0].k;
    for (q1 = q0 + 1; q1 < n_pairs && pr[q1].k == k; ++q1) {
    }
    const T* gk = g + k * m1;
    int64_t u0 = 0;
    for (; u0 + NB * VL <= m1; u0 += NB * VL) {
      folded_backward_block<T, VB, NB>(pr, q0, q1, M, gk, a, m1, W, ga, gW, dv, u0);
    }
    for (; u0 + VL <= m1; u0 += VL) folded_backward_block<T, VB, 1>(pr, q0, q1, M, gk, a, m1, W, ga, gW, dv, u0);
    if (u0 < m1) folded_backward_rest(pr, q0, q1, M, gk, a, m1, W, ga, gW, dv, VL, u0, dv + n_pairs * VL);
  }
  // gb[j] += Σ c D: per j, the sum over its terms in registers, then one update of its accumulator
  for (const JGroup* jg = jgroups + p.jgroup_begin; jg != jgroups + p.jgroup_end; ++jg) {
    typename S::V acc = S::zero();
    for (const JTerm<T>* t = jterms + jg->begin; t != jterms + jg->end; ++t) acc += t->c * S::load(dv + t->q * VL);
    T* gj = gbv + jg->j * VL;
    S::store(gj, S::load(gj) + acc);
  }
}

template <typename T, int VB>
FASTFLOW_TP_INLINE void path_forward(const Path& p, const Entry<T>* E, const Pair* pairs, const Term<T>* terms,
                                     const T* a, const T* b, const T* W, T* o, T* s) {
  const Entry<T>* e0 = E + p.begin;
  const Entry<T>* e1 = E + p.end;
  const int64_t m1 = p.mul1, m2 = p.mul2, mo = p.mul_out;
  switch (p.mode) {
    case kUVU: {
      if (m2 == 1) {
        folded_forward<T, VB>(p, pairs, terms, a, b, W, o, s);
        return;
      }
      T* y = s;  // [d2][m1]
      for (int64_t j = 0; j < p.d2; ++j) {
        for (int64_t u = 0; u < m1; ++u) {
          T acc = 0;
          for (int64_t v = 0; v < m2; ++v) acc += W[u * m2 + v] * b[j * m2 + v];
          y[j * m1 + u] = acc;
        }
      }
      contract<K, I, J>(o, m1, a, m1, y, m1, m1, e0, e1);
      return;
    }
    case kUVV: {
      T* z = s;  // [d1][m2]
      mix_first_input(z, a, W, p.d1, m1, m2);
      contract<K, I, J>(o, m2, z, m2, b, m2, m2, e0, e1);
      return;
    }
    case kUUU: {
      T* aw = s;  // [d1][m1]
      for (int64_t i = 0; i < p.d1; ++i) {
#pragma omp simd
        for (int64_t u = 0; u < m1; ++u) aw[i * m1 + u] = W[u] * a[i * m1 + u];
      }
      contract<K, I, J>(o, m1, aw, m1, b, m1, m1, e0, e1);
      return;
    }
    case kUUW: {
      T* t = s;  // [d_out][m1]
      fill_zero(t, p.d_out * m1);
      contract<K, I, J>(t, m1, a, m1, b, m1, m1, e0, e1);
      if (!p.has_weight) {
        add_row_sums(t, m1, p.d_out, o, mo);
        return;
      }
      for (int64_t k = 0; k < p.d_out; ++k) {
        T* __restrict ok = o + k * mo;
        for (int64_t u = 0; u < m1; ++u) {
          const T tv = t[k * m1 + u];
          const T* __restrict Wu = W + u * mo;
#pragma omp simd
          for (int64_t w = 0; w < mo; ++w) ok[w] += tv * Wu[w];
        }
      }
      return;
    }
    default: {  // uvw
      T* t = s;  // [d_out][m1], one v at a time
      if (!p.has_weight) {  // W = 1: o[k][w] += Σ_u Σ_v t_v[k][u] for every w
        fill_zero(t, p.d_out * m1);
        for (int64_t v = 0; v < m2; ++v) contract_scalar<K, I, J>(t, m1, a, m1, b + v, m2, m1, e0, e1);
        add_row_sums(t, m1, p.d_out, o, mo);
        return;
      }
      for (int64_t v = 0; v < m2; ++v) {
        fill_zero(t, p.d_out * m1);
        contract_scalar<K, I, J>(t, m1, a, m1, b + v, m2, m1, e0, e1);
        for (int64_t k = 0; k < p.d_out; ++k) {
          T* __restrict ok = o + k * mo;
          for (int64_t u = 0; u < m1; ++u) {
            const T tv = t[k * m1 + u];
            const T* __restrict Wuv = W + (u * m2 + v) * mo;
#pragma omp simd
            for (int64_t w = 0; w < mo; ++w) ok[w] += tv * Wuv[w];
          }
        }
      }
    }
  }
}

// Adds the path's gradients for one row: ga (x1, ir_mul), gb (x2, ir_mul; uvu with mul2 = 1 adds to gbv, the
// vector accumulators of gb[pos2 :]), gW (the path's weights; nullptr: none wanted), from g (the output
// gradient, ir_mul).
template <typename T, int VB>
FASTFLOW_TP_INLINE void path_backward(const Path& p, const Entry<T>* E, const Pair* pairs, const Term<T>* terms,
                                      const JGroup* jgroups, const JTerm<T>* jterms, const T* g, const T* a,
                                      const T* b, const T* W, T* ga, T* gb, T* gbv, T* gW, T* s, int64_t half) {
  const Entry<T>* e0 = E + p.begin;
  const Entry<T>* e1 = E + p.end;
  const int64_t m1 = p.mul1, m2 = p.mul2, mo = p.mul_out;
  switch (p.mode) {
    case kUVU: {
      if (m2 == 1) {
        folded_backward<T, VB>(p, pairs, terms, jgroups, jterms, g, a, b, W, ga, gbv, gW, s);
        return;
      }
      T* y = s;  // [d2][m1] as in the forward
      for (int64_t j = 0; j < p.d2; ++j) {
        for (int64_t u = 0; u < m1; ++u) {
          T acc = 0;
          for (int64_t v = 0; v < m2; ++v) acc += W[u * m2 + v] * b[j * m2 + v];
          y[j * m1 + u] = acc;
        }
      }
      contract<I, K, J>(ga, m1, g, m1, y, m1, m1, e0, e1);
      T* gy = s + half;  // [d2][m1]
      fill_zero(gy, p.d2 * m1);
      contract<J, I, K>(gy, m1, a, m1, g, m1, m1, e0, e1);
      for (int64_t u = 0; u < m1; ++u) {
        for (int64_t j = 0; j < p.d2; ++j) {
          const T gyv = gy[j * m1 + u];
          const T* __restrict bj = b + j * m2;
          T* __restrict gbj = gb + j * m2;
          const T* __restrict Wu = W + u * m2;
          if (gW != nullptr) {
            T* __restrict gWu = gW + u * m2;
#pragma omp simd
            for (int64_t v = 0; v < m2; ++v) gWu[v] += gyv * bj[v];
          }
#pragma omp simd
          for (int64_t v = 0; v < m2; ++v) gbj[v] += Wu[v] * gyv;
        }
      }
      return;
    }
    case kUVV: {
      T* z = s;  // [d1][m2] as in the forward
      mix_first_input(z, a, W, p.d1, m1, m2);
      contract<J, I, K>(gb, m2, z, m2, g, m2, m2, e0, e1);
      T* gz = s + half;  // [d1][m2]: Σ c g[k][v] b[j][v]
      fill_zero(gz, p.d1 * m2);
      contract<I, K, J>(gz, m2, g, m2, b, m2, m2, e0, e1);
      for (int64_t u = 0; u < m1; ++u) {
        const T* __restrict Wu = W + u * m2;
        for (int64_t i = 0; i < p.d1; ++i) {
          const T* __restrict gzi = gz + i * m2;
          const T av = a[i * m1 + u];
          if (gW != nullptr) {
            T* __restrict gWu = gW + u * m2;
#pragma omp simd
            for (int64_t v = 0; v < m2; ++v) gWu[v] += av * gzi[v];
          }
          T acc = 0;
#pragma omp simd reduction(+ : acc)
          for (int64_t v = 0; v < m2; ++v) acc += Wu[v] * gzi[v];
          ga[i * m1 + u] += acc;
        }
      }
      return;
    }
    case kUUU: {
      T* h = s;  // [d1][m1]: Σ c g[k][u] b[j][u]
      fill_zero(h, p.d1 * m1);
      contract<I, K, J>(h, m1, g, m1, b, m1, m1, e0, e1);
      T* aw = s + half;  // [d1][m1]: W[u] a[i][u]
      for (int64_t i = 0; i < p.d1; ++i) {
        const T* __restrict hi = h + i * m1;
        const T* __restrict ai = a + i * m1;
        T* __restrict gai = ga + i * m1;
        T* __restrict awi = aw + i * m1;
        if (gW != nullptr) {
#pragma omp simd
          for (int64_t u = 0; u < m1; ++u) gW[u] += ai[u] * hi[u];
        }
#pragma omp simd
        for (int64_t u = 0; u < m1; ++u) {
          gai[u] += W[u] * hi[u];
          awi[u] = W[u] * ai[u];
        }
      }
      contract<J, I, K>(gb, m1, aw, m1, g, m1, m1, e0, e1);
      return;
    }
    case kUUW: {
      T* gt = s;  // [d_out][m1]: Σ_w W[u,w] g[k][w]
      if (!p.has_weight) {
        broadcast_row_sums(g, mo, p.d_out, gt, m1);
      } else {
        for (int64_t k = 0; k < p.d_out; ++k) {
          const T* __restrict gk = g + k * mo;
          for (int64_t u = 0; u < m1; ++u) {
            const T* __restrict Wu = W + u * mo;
            T acc = 0;
#pragma omp simd reduction(+ : acc)
            for (int64_t w = 0; w < mo; ++w) acc += Wu[w] * gk[w];
            gt[k * m1 + u] = acc;
          }
        }
      }
      contract<I, K, J>(ga, m1, gt, m1, b, m1, m1, e0, e1);
      contract<J, I, K>(gb, m1, a, m1, gt, m1, m1, e0, e1);
      if (gW != nullptr) {
        T* t = s + half;  // [d_out][m1]: the forward's t
        fill_zero(t, p.d_out * m1);
        contract<K, I, J>(t, m1, a, m1, b, m1, m1, e0, e1);
        for (int64_t k = 0; k < p.d_out; ++k) {
          const T* __restrict gk = g + k * mo;
          for (int64_t u = 0; u < m1; ++u) {
            const T tv = t[k * m1 + u];
            T* __restrict gWu = gW + u * mo;
#pragma omp simd
            for (int64_t w = 0; w < mo; ++w) gWu[w] += tv * gk[w];
          }
        }
      }
      return;
    }
    default: {  // uvw, one v at a time
      T* gt = s;         // [d_out][m1]: Σ_w W[u,v,w] g[k][w]
      T* t = s + half;  // [d_out][m1]: the forward's t
      if (!p.has_weight) {  // gt is the same for every v
        broadcast_row_sums(g, mo, p.d_out, gt, m1);
        for (int64_t v = 0; v < m2; ++v) {
          contract_scalar<I, K, J>(ga, m1, gt, m1, b + v, m2, m1, e0, e1);
          contract_dot<J, I, K>(gb + v, m2, a, m1, gt, m1, m1, e0, e1);
        }
        return;
      }
      for (int64_t v = 0; v < m2; ++v) {
        for (int64_t k = 0; k < p.d_out; ++k) {
          const T* __restrict gk = g + k * mo;
          for (int64_t u = 0; u < m1; ++u) {
            const T* __restrict Wuv = W + (u * m2 + v) * mo;
            T acc = 0;
#pragma omp simd reduction(+ : acc)
            for (int64_t w = 0; w < mo; ++w) acc += Wuv[w] * gk[w];
            gt[k * m1 + u] = acc;
          }
        }
        contract_scalar<I, K, J>(ga, m1, gt, m1, b + v, m2, m1, e0, e1);
        contract_dot<J, I, K>(gb + v, m2, a, m1, gt, m1, m1, e0, e1);
        if (gW != nullptr) {
          fill_zero(t, p.d_out * m1);
          contract_scalar<K, I, J>(t, m1, a, m1, b + v, m2, m1, e0, e1);
          for (int64_t k = 0; k < p.d_out; ++k) {
            const T* __restrict gk = g + k * mo;
            for (int64_t u = 0; u < m1; ++u) {
              const T tv = t[k * m1 + u];
              T* __restrict gWuv = gW + (u * m2 + v) * mo;
#pragma omp simd
              for (int64_t w = 0; w < mo; ++w) gWuv[w] += tv * gk[w];
            }
          }
        }
      }
    }
  }
}

// ---- rows ----

// The operands of one call. Rows r of the output (forward) or of x1 (backward) own the edge slots
// row_ptr[r] : row_ptr[r + 1], slot t holding edge perm[t]; without row_ptr, row r owns edge r and the other
// node of edge e is e.
template <typename T>
struct Problem {
  const Descriptor<T>* D;
  const T* x1;          // [n_src, dim1] rows, or [n_src, in1.width] already in ir_mul if x1_ir_mul
  int64_t dim1, x1_stride;
  bool x1_ir_mul;
  const T* x2;          // [E, dim2]
  int64_t dim2;
  const T* w;           // [E, n_weights], or [n_weights] with w_stride = 0
  int64_t w_stride, n_weights;
  const int64_t* row_ptr;  // nullptr: identity
  const int64_t* perm;     // edge of each slot
  const int64_t* other;    // per slot, the edge's other node: its source (forward), destination (backward)
  int64_t dim_out;
  // forward
  T* out;               // [rows, dim_out]
  // backward
  const T* g;           // [n_nodes, dim_out] rows, or [n_nodes, out.width] in ir_mul if g_ir_mul
  int64_t g_stride;
  bool g_ir_mul;
  T* gx1;               // [rows, dim1]
  T* gx2;               // [E, dim2]
  T* gw;                // [E, n_weights] (gw_per_row false) or a chunk's partial sums [n_weights]
};

// The inputs every kernel reads: first input (rows, or already ir_mul), second input, weights (shared: stride 0).
template <typename T>
Problem<T> input_problem(const Descriptor<T>& D, const at::Tensor& x1, int64_t dim1, bool x1_ir_mul,
                         const at::Tensor& x2, const at::Tensor& w, int64_t n_w, int64_t dim_out) {
  Problem<T> pr{};
  pr.D = &D;
  pr.x1 = x1.const_data_ptr<T>(), pr.dim1 = dim1, pr.x1_stride = x1.size(1), pr.x1_ir_mul = x1_ir_mul;
  pr.x2 = x2.const_data_ptr<T>(), pr.dim2 = x2.size(1);
  pr.w = w.const_data_ptr<T>(), pr.w_stride = w.dim() == 2 ? n_w : 0, pr.n_weights = n_w;
  pr.dim_out = dim_out;
  return pr;
}

template <typename T>
FASTFLOW_TP_INLINE void edge_range(const Problem<T>& pr, int64_t r, int64_t& begin, int64_t& end) {
  if (pr.row_ptr == nullptr) {
    begin = r, end = r + 1;
  } else {
    begin = pr.row_ptr[r], end = pr.row_ptr[r + 1];
  }
}

// Per-thread buffers: the output row (forward) or grad_x1 row (backward) being summed, x1 / x2 / grad_out rows
// transposed to ir_mul, the grad_x2 row and its vector accumulators, and the paths' scratch
template <typename T>
struct Scratch {
  std::vector<T> acc, x1, x2, gb, gbv, g, s;
  explicit Scratch(const Problem<T>& pr)
      : acc(std::max(pr.D->out.width, pr.D->in1.width) + 1),
        x1(pr.D->in1.width + 1),
        x2(pr.D->in2.width + 1),
        gb(pr.D->in2.width + 1),
        gbv((pr.D->fold_hi - pr.D->fold_lo) * (kMaxVectorBytes / sizeof(T)) + 1),
        g(pr.D->out.width + 1),
        s(pr.D->scratch + pr.D->max_pairs * (1 + kMaxVectorBytes / sizeof(T)) + 1) {}
};

template <typename T>
FASTFLOW_TP_INLINE const T* x1_row(const Problem<T>& pr, int64_t node, T* buf) {
  if (pr.x1_ir_mul || pr.D->in1.trivial) return pr.x1 + node * pr.x1_stride;
  to_ir_mul(pr.D->in1, pr.x1 + node * pr.x1_stride, buf);
  return buf;
}

template <typename T>
FASTFLOW_TP_INLINE const T* x2_row(const Problem<T>& pr, int64_t e, T* buf) {
  if (pr.D->in2.trivial) return pr.x2 + e * pr.dim2;
  to_ir_mul(pr.D->in2, pr.x2 + e * pr.dim2, buf);
  return buf;
}

// The rows of a later edge are requested while the current one is computed: tp_conv reads the weight rows in
// destination order, i.e. at random, and they are most of the bytes read.
constexpr int64_t kPrefetchAhead = 2;  // edges

// every cache line of p[0 : n]
template <typename T>
FASTFLOW_TP_INLINE void prefetch_rows(const T* p, int64_t n) {
#if defined(__GNUC__)
  if (n <= 0) return;
  const uintptr_t first = reinterpret_cast<uintptr_t>(p) & ~uintptr_t(63);
  const uintptr_t last = reinterpret_cast<uintptr_t>(p + n - 1);
  for (uintptr_t c = first; c <= last; c += 64) __builtin_prefetch(reinterpret_cast<const void*>(c), 0, 3);
#endif
}

template <typename T>
FASTFLOW_TP_INLINE void prefetch_rows_for_write(T* p, int64_t n) {
#if defined(__GNUC__)
  if (n <= 0) return;
  const uintptr_t first = reinterpret_cast<uintptr_t>(p) & ~uintptr_t(63);
  const uintptr_t last = reinterpret_cast<uintptr_t>(p + n - 1);
  for (uintptr_t c = first; c <= last; c += 64) __builtin_prefetch(reinterpret_cast<void*>(c), 1, 3);
#endif
}

// the rows edge slot t (index into perm) will read in the forward
template <typename T>
FASTFLOW_TP_INLINE void prefetch_forward(const Problem<T>& pr, int64_t t) {
  const int64_t e = pr.perm == nullptr ? t : pr.perm[t];
  const int64_t node = pr.other == nullptr ? e : pr.other[t];
  if (pr.w_stride != 0) prefetch_rows(pr.w + e * pr.w_stride, pr.n_weights);
  prefetch_rows(pr.x1 + node * pr.x1_stride, pr.x1_stride);
  prefetch_rows(pr.x2 + e * pr.dim2, pr.dim2);
}

// the rows edge slot t will read and write in the backward
template <typename T>
FASTFLOW_TP_INLINE void prefetch_backward(const Problem<T>& pr, int64_t t, bool gw_per_row) {
  const int64_t e = pr.perm == nullptr ? t : pr.perm[t];
  const int64_t node = pr.other == nullptr ? e : pr.other[t];
  if (pr.w_stride != 0) prefetch_rows(pr.w + e * pr.w_stride, pr.n_weights);
  if (gw_per_row) prefetch_rows_for_write(pr.gw + e * pr.n_weights, pr.n_weights);
  prefetch_rows(pr.g + node * pr.g_stride, std::min<int64_t>(pr.g_stride, 256 / sizeof(T)));
  prefetch_rows(pr.x2 + e * pr.dim2, pr.dim2);
  prefetch_rows_for_write(pr.gx2 + e * pr.dim2, pr.dim2);
}

template <typename T, int VB>
FASTFLOW_TP_INLINE void forward_rows_impl(const Problem<T>& pr, int64_t r0, int64_t r1, Scratch<T>& S) {
  const Descriptor<T>& D = *pr.D;
  const Entry<T>* E = D.entries.data();
  const Pair* pairs = D.pairs.data();
  const Term<T>* terms = D.terms.data();
  const int64_t width = D.out.width;
  T* acc = S.acc.data();
  const int64_t last = pr.row_ptr == nullptr ? r1 : pr.row_ptr[r1];  // the edge slots of rows r0 : r1 end here
  for (int64_t r = r0; r < r1; ++r) {
    fill_zero(acc, width);
    int64_t begin, end;
    edge_range(pr, r, begin, end);
    for (int64_t t = begin; t < end; ++t) {
      if (t + kPrefetchAhead < last) prefetch_forward(pr, t + kPrefetchAhead);
      const int64_t e = pr.perm == nullptr ? t : pr.perm[t];
      const int64_t node = pr.other == nullptr ? e : pr.other[t];
      const T* a = x1_row(pr, node, S.x1.data());
      const T* b = x2_row(pr, e, S.x2.data());
      const T* w = pr.w + e * pr.w_stride;
      for (const Path& p : D.paths) {
        const T* W = p.has_weight ? w + p.w_off : D.ones.data();
        path_forward<T, VB>(p, E, pairs, terms, a + p.pos1, b + p.pos2, W, acc + p.pos_out, S.s.data());
      }
    }
    from_ir_mul(D.out, acc, pr.out + r * pr.dim_out, pr.dim_out);
  }
}

template <typename T, int VB>
FASTFLOW_TP_INLINE void backward_rows_impl(const Problem<T>& pr, int64_t r0, int64_t r1, bool gw_per_row,
                                           Scratch<T>& S) {
  const Descriptor<T>& D = *pr.D;
  const Entry<T>* E = D.entries.data();
  const Pair* pairs = D.pairs.data();
  const Term<T>* terms = D.terms.data();
  const JGroup* jgroups = D.jgroups.data();
  const JTerm<T>* jterms = D.jterms.data();
  const int64_t half = D.scratch / 2;
  T* ga = S.acc.data();
  T* gb = S.gb.data();
  constexpr int64_t VL = Simd<T, VB>::kLanes;
  T* gbv = S.gbv.data();  // gbv[(x - fold_lo) · VL]: the vector accumulator of gb[x], x in fold_lo : fold_hi
  const int64_t last = pr.row_ptr == nullptr ? r1 : pr.row_ptr[r1];
  for (int64_t r = r0; r < r1; ++r) {
    fill_zero(ga, D.in1.width);
    int64_t begin, end;
    edge_range(pr, r, begin, end);
    const T* a = end > begin ? x1_row(pr, r, S.x1.data()) : nullptr;
    for (int64_t t = begin; t < end; ++t) {
      if (t + kPrefetchAhead < last) prefetch_backward(pr, t + kPrefetchAhead, gw_per_row);
      const int64_t e = pr.perm == nullptr ? t : pr.perm[t];
      const int64_t node = pr.other == nullptr ? e : pr.other[t];
      const T* b = x2_row(pr, e, S.x2.data());
      const T* g;
      if (pr.g_ir_mul || D.out.trivial) {
        g = pr.g + node * pr.g_stride;
      } else {
        to_ir_mul(D.out, pr.g + node * pr.g_stride, S.g.data());
        g = S.g.data();
      }
      const T* w = pr.w + e * pr.w_stride;
      T* gw = gw_per_row ? pr.gw + e * pr.n_weights : pr.gw;
      if (gw_per_row) fill_zero(gw, pr.n_weights);
      fill_zero(gb, D.in2.width);
      fill_zero(gbv, (D.fold_hi - D.fold_lo) * VL);
      for (const Path& p : D.paths) {
        const T* W = p.has_weight ? w + p.w_off : D.ones.data();
        T* gW = p.has_weight ? gw + p.w_off : nullptr;
        T* gbv_p = p.pos2 >= D.fold_lo ? gbv + (p.pos2 - D.fold_lo) * VL : nullptr;
        path_backward<T, VB>(p, E, pairs, terms, jgroups, jterms, g + p.pos_out, a + p.pos1, b + p.pos2, W,
                             ga + p.pos1, gb + p.pos2, gbv_p, gW, S.s.data(), half);
      }
      for (int64_t x = D.fold_lo; x < D.fold_hi; ++x) {
        gb[x] += Simd<T, VB>::sum(Simd<T, VB>::load(gbv + (x - D.fold_lo) * VL));
      }
      from_ir_mul(D.in2, gb, pr.gx2 + e * pr.dim2, pr.dim2);
    }
    from_ir_mul(D.in1, ga, pr.gx1 + r * pr.dim1, pr.dim1);
  }
}

// ---- one variant per instruction set ----

#if defined(FASTFLOW_TP_X86_DISPATCH)
template <typename T>
FASTFLOW_TP_TARGET_V4 void forward_rows_v4(const Problem<T>& pr, int64_t r0, int64_t r1, Scratch<T>& S) {
  forward_rows_impl<T, 64>(pr, r0, r1, S);
}
template <typename T>
FASTFLOW_TP_TARGET_V3 void forward_rows_v3(const Problem<T>& pr, int64_t r0, int64_t r1, Scratch<T>& S) {
  forward_rows_impl<T, 32>(pr, r0, r1, S);
}
template <typename T>
FASTFLOW_TP_TARGET_V4 void backward_rows_v4(const Problem<T>& pr, int64_t r0, int64_t r1, bool per_row,
                                            Scratch<T>& S) {
  backward_rows_impl<T, 64>(pr, r0, r1, per_row, S);
}
template <typename T>
FASTFLOW_TP_TARGET_V3 void backward_rows_v3(const Problem<T>& pr, int64_t r0, int64_t r1, bool per_row,
                                            Scratch<T>& S) {
  backward_rows_impl<T, 32>(pr, r0, r1, per_row, S);
}
#endif
template <typename T>
void forward_rows_base(const Problem<T>& pr, int64_t r0, int64_t r1, Scratch<T>& S) {
  forward_rows_impl<T, 16>(pr, r0, r1, S);
}
template <typename T>
void backward_rows_base(const Problem<T>& pr, int64_t r0, int64_t r1, bool per_row, Scratch<T>& S) {
  backward_rows_impl<T, 16>(pr, r0, r1, per_row, S);
}

// The vector width of the variant to run: the CPU's (once), capped by FASTFLOW_TP_ISA (read per call).
int vector_bytes() {
#if defined(FASTFLOW_TP_X86_DISPATCH)
  static const int cpu = [] {
    __builtin_cpu_init();
    if (__builtin_cpu_supports("x86-64-v4")) return 64;
    if (__builtin_cpu_supports("x86-64-v3")) return 32;
    return 16;
  }();
  const char* cap = std::getenv("FASTFLOW_TP_ISA");
  if (cap != nullptr && std::strcmp(cap, "sse2") == 0) return 16;
  if (cap != nullptr && std::strcmp(cap, "avx2") == 0) return std::min(cpu, 32);
  return cpu;
#else
  return 16;
#endif
}

template <typename T>
void forward_rows(int vb, const Problem<T>& pr, int64_t r0, int64_t r1, Scratch<T>& S) {
#if defined(FASTFLOW_TP_X86_DISPATCH)
  if (vb == 64) return forward_rows_v4(pr, r0, r1, S);
  if (vb == 32) return forward_rows_v3(pr, r0, r1, S);
#endif
  forward_rows_base(pr, r0, r1, S);
}

template <typename T>
void backward_rows(int vb, const Problem<T>& pr, int64_t r0, int64_t r1, bool per_row, Scratch<T>& S) {
#if defined(FASTFLOW_TP_X86_DISPATCH)
  if (vb == 64) return backward_rows_v4(pr, r0, r1, per_row, S);
  if (vb == 32) return backward_rows_v3(pr, r0, r1, per_row, S);
#endif
  backward_rows_base(pr, r0, r1, per_row, S);
}

// ---- drivers ----

// The rows are cut into chunks of whole rows and about kChunkEdges edges (an edge counts 4, a row 1); the
// threads take chunks in turn from a shared counter, so a thread that the OS deschedules holds up one chunk, not
// a fixed share of the rows. The chunks depend on the problem alone, so every result (shared-weight gradients
// included, one partial sum per chunk, added in chunk order) is the same for any number of threads.
constexpr int64_t kChunkEdges = 128;
constexpr int64_t kMaxChunks = 4096;
constexpr int64_t kMaxSharedChunks = 64;  // partial sums of shared-weight gradients
constexpr int64_t kMaxPartialElements = int64_t(1) << 24;

std::vector<int64_t> split_rows(const int64_t* row_ptr, int64_t rows, int64_t edges, int64_t max_chunks) {
  auto cost = [&](int64_t r) { return 4 * (row_ptr == nullptr ? r : row_ptr[r]) + r; };
  const int64_t total = cost(rows);
  const int64_t n = std::max<int64_t>(
      1, std::min({max_chunks, rows, (4 * edges + rows + 4 * kChunkEdges - 1) / (4 * kChunkEdges)}));
  std::vector<int64_t> bounds(n + 1, rows);
  bounds[0] = 0;
  for (int64_t c = 1; c < n; ++c) {
    const int64_t target = total / n * c + total % n * c / n;  // total·c/n without overflow
    int64_t lo = bounds[c - 1], hi = rows;
    while (lo < hi) {  // the first row r with cost(r) >= target
      const int64_t mid = lo + (hi - lo) / 2;
      if (cost(mid) < target) {
        lo = mid + 1;
      } else {
        hi = mid;
      }
    }
    bounds[c] = lo;
  }
  return bounds;
}

// f(chunk, scratch) for every chunk, chunks handed out dynamically; one Scratch per thread
template <typename T, typename F>
void for_each_chunk(const Problem<T>& pr, int64_t n_chunks, const F& f) {
  std::atomic<int64_t> next{0};
  const int64_t workers = std::max<int64_t>(1, std::min<int64_t>(n_chunks, at::get_num_threads()));
  at::parallel_for(0, workers, 1, [&](int64_t, int64_t) {
    Scratch<T> S(pr);
    for (int64_t c = next.fetch_add(1); c < n_chunks; c = next.fetch_add(1)) f(c, S);
  });
}

template <typename T>
void run_forward(const Problem<T>& pr, int64_t rows, int64_t edges) {
  const int vb = vector_bytes();
  const std::vector<int64_t> bounds = split_rows(pr.row_ptr, rows, edges, kMaxChunks);
  for_each_chunk(pr, static_cast<int64_t>(bounds.size()) - 1,
                 [&](int64_t c, Scratch<T>& S) { forward_rows(vb, pr, bounds[c], bounds[c + 1], S); });
}

// gw: [E, n_weights] when per_row, else [n_weights] (the sum over rows)
template <typename T>
void run_backward(const Problem<T>& pr, int64_t rows, int64_t edges, bool per_row) {
  const int vb = vector_bytes();
  if (per_row) {
    const std::vector<int64_t> bounds = split_rows(pr.row_ptr, rows, edges, kMaxChunks);
    for_each_chunk(pr, static_cast<int64_t>(bounds.size()) - 1,
                   [&](int64_t c, Scratch<T>& S) { backward_rows(vb, pr, bounds[c], bounds[c + 1], true, S); });
    return;
  }
  const int64_t n_w = pr.n_weights;
  const int64_t max_chunks = std::max<int64_t>(
      1, std::min(kMaxSharedChunks, kMaxPartialElements / std::max<int64_t>(n_w, 1)));
  const std::vector<int64_t> bounds = split_rows(pr.row_ptr, rows, edges, max_chunks);
  const int64_t chunks = static_cast<int64_t>(bounds.size()) - 1;
  std::vector<T> partial(chunks * n_w, T(0));
  for_each_chunk(pr, chunks, [&](int64_t c, Scratch<T>& S) {
    Problem<T> local = pr;
    local.gw = partial.data() + c * n_w;
    backward_rows(vb, local, bounds[c], bounds[c + 1], false, S);
  });
  T* total = pr.gw;
  at::parallel_for(0, n_w, 1024, [&](int64_t k0, int64_t k1) {
    for (int64_t k = k0; k < k1; ++k) {
      T acc = 0;
      for (int64_t c = 0; c < chunks; ++c) acc += partial[c * n_w + k];
      total[k] = acc;
    }
  });
}

// ---- uvw paths with shared weights: GEMMs over blocks of rows ----
// With one weight tensor for every row (tensor_product only: a self-interaction such as NequIP's, e3nn's
// FullyConnectedTensorProduct of features with node attributes), the row kernel reads all of W[u, v, w] for each
// row, a memory-bound matrix-vector product. Here the path runs as matrix products over a block of rows, W read
// once per block (the blocks of mul_ir rows: a[r][u][i], b[r][v][j], o[r][w][k]; C[i][j][k] the path's CG):
//   A[r][u][j][k] = Σ_i a[r][u][i] C[i][j][k]
//   T[r][k][u][v] = Σ_j A[r][u][j][k] b[r][v][j]
//   o[r][w][k]   += Σ_{u,v} T[r][k][u][v] W[u][v][w]
// and the backward, with gT = g W^T:
//   gW += T^T g,   ga[r][u][i] = Σ_{k,j} (Σ_v gT[r][k][u][v] b[r][v][j]) C[i][j][k],
//   gb[r][v][j] = Σ_{u,k} gT[r][k][u][v] A[r][u][j][k].

bool runs_as_gemm(const Path& p) { return p.mode == kUVW && p.has_weight && p.mul1 * p.mul2 * p.mul_out > 0; }

// Moves the paths that run as GEMMs out of D (the row kernel runs the others) and returns them.
template <typename T>
std::vector<Path> take_gemm_paths(Descriptor<T>& D) {
  std::vector<Path> gemm, rows;
  for (const Path& p : D.paths) (runs_as_gemm(p) ? gemm : rows).push_back(p);
  D.paths = rows;
  return gemm;
}

// Rows per block: T of a block stays within 16 Mi elements.
constexpr int64_t kGemmBlockElements = int64_t(1) << 24;

// One uvw path on rows of x1 [Z, dim1], x2 [Z, dim2] with shared weights w [n_w]: the tensors of its blocks.
template <typename T>
struct GemmPath {
  const Path& p;
  int64_t off1, off2, off_out, rows_per_block;
  at::Tensor C, Ct, W;  // [d1, d2 · d_out], [d_out · d2, d1] (the backward's), [mul1 · mul2, mul_out]

  GemmPath(const Path& path, const Descriptor<T>& D, const at::Tensor& w)
      : p(path),
        off1(D.in1.blocks[path.block1].off),
        off2(D.in2.blocks[path.block2].off),
        off_out(D.out.blocks[path.block_out].off),
        rows_per_block(std::max<int64_t>(1, kGemmBlockElements / (path.d_out * path.mul1 * path.mul2))) {
    C = at::zeros({p.d1, p.d2, p.d_out}, w.options());
    T* c = C.mutable_data_ptr<T>();
    for (int64_t e = p.begin; e < p.end; ++e) {
      const Entry<T>& x = D.entries[e];
      c[(x.idx[I] * p.d2 + x.idx[J]) * p.d_out + x.idx[K]] += x.c;
    }
    Ct = C.permute({2, 1, 0}).reshape({p.d_out * p.d2, p.d1});
    C = C.view({p.d1, p.d2 * p.d_out});
    W = w.narrow(0, p.w_off, p.w_size).view({p.mul1 * p.mul2, p.mul_out});
  }

  at::Tensor block(const at::Tensor& x, int64_t off, int64_t mul, int64_t d, int64_t r0, int64_t n) const {
    return x.narrow(0, r0, n).narrow(1, off, mul * d).view({n, mul, d});
  }

  // A as [n, mul1 · d_out, d2] (rows (u, k)) and T as [n · d_out, mul1 · mul2] (rows (r, k), columns (u, v))
  std::pair<at::Tensor, at::Tensor> a_and_t(const at::Tensor& a, const at::Tensor& b, int64_t n) const {
    const at::Tensor A = at::mm(a.reshape({n * p.mul1, p.d1}), C)
                             .view({n, p.mul1, p.d2, p.d_out})
                             .transpose(2, 3)
                             .reshape({n, p.mul1 * p.d_out, p.d2});
    const at::Tensor t = at::bmm(A, b.transpose(1, 2))  // [n, (u, k), v]
                             .view({n, p.mul1, p.d_out, p.mul2})
                             .transpose(1, 2)
                             .reshape({n * p.d_out, p.mul1 * p.mul2});
    return {A, t};
  }

  void forward(const at::Tensor& x1, const at::Tensor& x2, at::Tensor& out, int64_t Z) const {
    for (int64_t r0 = 0; r0 < Z; r0 += rows_per_block) {
      const int64_t n = std::min(rows_per_block, Z - r0);
      const at::Tensor t = a_and_t(block(x1, off1, p.mul1, p.d1, r0, n), block(x2, off2, p.mul2, p.d2, r0, n), n)
                               .second;
      const at::Tensor o = at::mm(t, W).view({n, p.d_out, p.mul_out});
      block(out, off_out, p.mul_out, p.d_out, r0, n).add_(o.transpose(1, 2));
    }
  }

  // Adds to gx1, gx2 and gw (the sum over rows) the path's gradients.
  void backward(const at::Tensor& g, const at::Tensor& x1, const at::Tensor& x2, at::Tensor& gx1, at::Tensor& gx2,
                at::Tensor& gw, int64_t Z) const {
    at::Tensor gW = gw.narrow(0, p.w_off, p.w_size).view({p.mul1 * p.mul2, p.mul_out});
    for (int64_t r0 = 0; r0 < Z; r0 += rows_per_block) {
      const int64_t n = std::min(rows_per_block, Z - r0);
      const at::Tensor a = block(x1, off1, p.mul1, p.d1, r0, n), b = block(x2, off2, p.mul2, p.d2, r0, n);
      const at::Tensor go =
          block(g, off_out, p.mul_out, p.d_out, r0, n).transpose(1, 2).reshape({n * p.d_out, p.mul_out});
      const auto [A, t] = a_and_t(a, b, n);
      gW.addmm_(t.t(), go);
      const at::Tensor gt = at::mm(go, W.t()).view({n, p.d_out, p.mul1, p.mul2});
      // ga: H[r][(u, k)][j] = Σ_v gT[r][k][u][v] b[r][v][j], then Σ_{k,j} H C[i][j][k]
      const at::Tensor H = at::bmm(gt.transpose(1, 2).reshape({n, p.mul1 * p.d_out, p.mul2}), b);
      const at::Tensor ga = at::mm(H.reshape({n * p.mul1, p.d_out * p.d2}), Ct);
      block(gx1, off1, p.mul1, p.d1, r0, n).add_(ga.view({n, p.mul1, p.d1}));
      // gb[r][v][j] = Σ_{(u, k)} gT[r][k][u][v] A[r][(u, k)][j]
      const at::Tensor gb = at::bmm(gt.permute({0, 3, 2, 1}).reshape({n, p.mul2, p.mul1 * p.d_out}), A);
      block(gx2, off2, p.mul2, p.d2, r0, n).add_(gb);
    }
  }
};

// Rows of x ([rows, dim]) in the ir_mul layout L: [rows, L.width]
template <typename T>
at::Tensor rows_to_ir_mul(const Layout& L, const at::Tensor& x) {
  const int64_t rows = x.size(0), dim = x.size(1);
  at::Tensor t = at::empty({rows, L.width}, x.options());
  const T* src = x.const_data_ptr<T>();
  T* dst = t.mutable_data_ptr<T>();
  at::parallel_for(0, rows, 256, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) to_ir_mul(L, src + r * dim, dst + r * L.width);
  });
  return t;
}

// Stable counting sort of the edges by key in [0, n): row_ptr [n + 1], perm [E] (the edge in each slot) and
// other_sorted [E] (other[perm[t]], so that the edge loops read it in order)
void sort_edges(const int64_t* key, const int64_t* other, int64_t E, int64_t n, std::vector<int64_t>& row_ptr,
                std::vector<int64_t>& perm, std::vector<int64_t>& other_sorted) {
  row_ptr.assign(n + 1, 0);
  perm.resize(E);
  other_sorted.resize(E);
  for (int64_t e = 0; e < E; ++e) ++row_ptr[key[e] + 1];
  for (int64_t r = 0; r < n; ++r) row_ptr[r + 1] += row_ptr[r];
  std::vector<int64_t> next(row_ptr.begin(), row_ptr.end() - 1);
  for (int64_t e = 0; e < E; ++e) {
    const int64_t t = next[key[e]]++;
    perm[t] = e;
    other_sorted[t] = other[e];
  }
}

// ---- argument checks ----

std::string shape_string(at::IntArrayRef shape) {
  std::string s = "[";
  for (size_t d = 0; d < shape.size(); ++d) s += (d ? ", " : "") + (shape[d] < 0 ? "*" : std::to_string(shape[d]));
  return s + "]";
}

void check_tensor(const char* op, const char* name, const at::Tensor& t, at::ScalarType dtype,
                  at::IntArrayRef shape) {
  TORCH_CHECK(t.device().is_cpu(), op, " (cpu kernel): ", name, " must be on cpu, got ", t.device());
  TORCH_CHECK(t.scalar_type() == dtype, op, ": ", name, " must have dtype ", dtype, ", got ", t.scalar_type());
  bool ok = t.dim() == static_cast<int64_t>(shape.size());
  for (size_t d = 0; ok && d < shape.size(); ++d) ok = shape[d] < 0 || t.size(d) == shape[d];
  TORCH_CHECK(ok, op, ": ", name, " must have shape ", shape_string(shape), ", got ", t.sizes());
}

at::ScalarType check_float(const char* op, const char* name, const at::Tensor& t) {
  TORCH_CHECK(t.device().is_cpu(), op, " (cpu kernel): ", name, " must be on cpu, got ", t.device());
  TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble, op, ": ", name,
              " must be float32 or float64, got ", t.scalar_type());
  TORCH_CHECK(t.dim() == 2, op, ": ", name, " must be 2-D, got shape ", t.sizes());
  return t.scalar_type();
}

void check_descriptor_tensors(const char* op, const at::Tensor& paths, const at::Tensor& cg_index,
                              const at::Tensor& cg_value, const at::Tensor& cg_offsets, at::ScalarType dtype) {
  check_tensor(op, "paths", paths, at::kLong, {-1, 12});
  const int64_t P = paths.size(0);
  check_tensor(op, "cg_index", cg_index, at::kLong, {-1, 3});
  check_tensor(op, "cg_value", cg_value, dtype, {cg_index.size(0)});
  check_tensor(op, "cg_offsets", cg_offsets, at::kLong, {P + 1});
}

// weights: [rows, n_weights] or [n_weights] (shared); returns n_weights
int64_t check_weights(const char* op, const at::Tensor& weights, at::ScalarType dtype, int64_t rows,
                      const char* rows_name) {
  TORCH_CHECK(weights.device().is_cpu(), op, " (cpu kernel): weights must be on cpu, got ", weights.device());
  TORCH_CHECK(weights.scalar_type() == dtype, op, ": weights must have dtype ", dtype, ", got ",
              weights.scalar_type());
  TORCH_CHECK(weights.dim() == 1 || (weights.dim() == 2 && weights.size(0) == rows), op,
              ": weights must have shape [n_weights] (shared) or [", rows, " (", rows_name,
              "), n_weights], got ", weights.sizes());
  return weights.size(-1);
}

void check_index(const char* op, const char* name, const at::Tensor& index, int64_t E, int64_t n,
                 const char* bound) {
  check_tensor(op, name, index, at::kLong, {E});
  const int64_t* p = index.const_data_ptr<int64_t>();
  for (int64_t e = 0; e < E; ++e) {
    TORCH_CHECK(p[e] >= 0 && p[e] < n, op, ": ", name, "[", e, "] = ", p[e], " is out of range for ", bound, " = ",
                n);
  }
}

// ---- the ops ----

at::Tensor tensor_product_cpu(const at::Tensor& x1, const at::Tensor& x2, const at::Tensor& weights,
                              const at::Tensor& paths, const at::Tensor& cg_index, const at::Tensor& cg_value,
                              const at::Tensor& cg_offsets, int64_t dim_out) {
  constexpr const char* op = "tensor_product";
  const auto dtype = check_float(op, "x1", x1);
  const int64_t Z = x1.size(0);
  check_tensor(op, "x2", x2, dtype, {Z, -1});
  const int64_t n_w = check_weights(op, weights, dtype, Z, "Z = x1.size(0)");
  TORCH_CHECK(dim_out >= 0, op, ": dim_out must be >= 0, got ", dim_out);
  check_descriptor_tensors(op, paths, cg_index, cg_value, cg_offsets, dtype);
  const at::Tensor a = x1.contiguous(), b = x2.contiguous(), w = weights.contiguous();
  at::Tensor out = at::empty({Z, dim_out}, a.options());
  AT_DISPATCH_FLOATING_TYPES(dtype, "tensor_product_cpu", [&] {
    Descriptor<scalar_t> D = parse_descriptor<scalar_t>(op, paths, cg_index, cg_value, cg_offsets, a.size(1),
                                                        b.size(1), dim_out, n_w);
    const std::vector<Path> gemm = w.dim() == 1 ? take_gemm_paths(D) : std::vector<Path>{};
    Problem<scalar_t> pr = input_problem(D, a, a.size(1), false, b, w, n_w, dim_out);
    pr.out = out.mutable_data_ptr<scalar_t>();
    run_forward(pr, Z, Z);
    for (const Path& p : gemm) GemmPath<scalar_t>(p, D, w).forward(a, b, out, Z);
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> tensor_product_backward_cpu(
    const at::Tensor& grad_out, const at::Tensor& x1, const at::Tensor& x2, const at::Tensor& weights,
    const at::Tensor& paths, const at::Tensor& cg_index, const at::Tensor& cg_value, const at::Tensor& cg_offsets) {
  constexpr const char* op = "tensor_product_backward";
  const auto dtype = check_float(op, "x1", x1);
  const int64_t Z = x1.size(0);
  check_tensor(op, "x2", x2, dtype, {Z, -1});
  check_tensor(op, "grad_out", grad_out, dtype, {Z, -1});
  const int64_t n_w = check_weights(op, weights, dtype, Z, "Z = x1.size(0)");
  check_descriptor_tensors(op, paths, cg_index, cg_value, cg_offsets, dtype);
  const at::Tensor g = grad_out.contiguous(), a = x1.contiguous(), b = x2.contiguous(), w = weights.contiguous();
  at::Tensor gx1 = at::empty_like(a), gx2 = at::empty_like(b), gw = at::empty_like(w);
  AT_DISPATCH_FLOATING_TYPES(dtype, "tensor_product_backward_cpu", [&] {
    Descriptor<scalar_t> D = parse_descriptor<scalar_t>(op, paths, cg_index, cg_value, cg_offsets, a.size(1),
                                                        b.size(1), g.size(1), n_w);
    const std::vector<Path> gemm = w.dim() == 1 ? take_gemm_paths(D) : std::vector<Path>{};
    Problem<scalar_t> pr = input_problem(D, a, a.size(1), false, b, w, n_w, g.size(1));
    pr.g = g.const_data_ptr<scalar_t>(), pr.g_stride = g.size(1), pr.g_ir_mul = false;
    pr.gx1 = gx1.mutable_data_ptr<scalar_t>(), pr.gx2 = gx2.mutable_data_ptr<scalar_t>();
    pr.gw = gw.mutable_data_ptr<scalar_t>();
    run_backward(pr, Z, Z, w.dim() == 2);  // the GEMM paths' gradients are zero here; they add theirs
    for (const Path& p : gemm) GemmPath<scalar_t>(p, D, w).backward(g, a, b, gx1, gx2, gw, Z);
  });
  return {gx1, gx2, gw};
}

at::Tensor tp_conv_cpu(const at::Tensor& node_feats, const at::Tensor& edge_attrs, const at::Tensor& weights,
                       const at::Tensor& edge_src, const at::Tensor& edge_dst, int64_t n_nodes,
                       const at::Tensor& paths, const at::Tensor& cg_index, const at::Tensor& cg_value,
                       const at::Tensor& cg_offsets, int64_t dim_out) {
  constexpr const char* op = "tp_conv";
  const auto dtype = check_float(op, "node_feats", node_feats);
  const int64_t n_src = node_feats.size(0);
  check_tensor(op, "edge_attrs", edge_attrs, dtype, {-1, -1});
  const int64_t E = edge_attrs.size(0);
  const int64_t n_w = check_weights(op, weights, dtype, E, "E = edge_attrs.size(0)");
  TORCH_CHECK(n_nodes >= 0, op, ": n_nodes must be >= 0, got ", n_nodes);
  TORCH_CHECK(dim_out >= 0, op, ": dim_out must be >= 0, got ", dim_out);
  check_index(op, "edge_src", edge_src, E, n_src, "node_feats.size(0)");
  check_index(op, "edge_dst", edge_dst, E, n_nodes, "n_nodes");
  check_descriptor_tensors(op, paths, cg_index, cg_value, cg_offsets, dtype);
  const at::Tensor x = node_feats.contiguous(), b = edge_attrs.contiguous(), w = weights.contiguous();
  const at::Tensor src = edge_src.contiguous(), dst = edge_dst.contiguous();
  at::Tensor out = at::empty({n_nodes, dim_out}, x.options());
  AT_DISPATCH_FLOATING_TYPES(dtype, "tp_conv_cpu", [&] {
    const Descriptor<scalar_t> D = parse_descriptor<scalar_t>(op, paths, cg_index, cg_value, cg_offsets,
                                                              x.size(1), b.size(1), dim_out, n_w);
    std::vector<int64_t> row_ptr, perm, src_sorted;
    sort_edges(dst.const_data_ptr<int64_t>(), src.const_data_ptr<int64_t>(), E, n_nodes, row_ptr, perm,
               src_sorted);
    const at::Tensor xt = D.in1.trivial ? x : rows_to_ir_mul<scalar_t>(D.in1, x);
    Problem<scalar_t> pr = input_problem(D, xt, x.size(1), true, b, w, n_w, dim_out);
    pr.row_ptr = row_ptr.data(), pr.perm = perm.data(), pr.other = src_sorted.data();
    pr.out = out.mutable_data_ptr<scalar_t>();
    run_forward(pr, n_nodes, E);
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> tp_conv_backward_cpu(
    const at::Tensor& grad_out, const at::Tensor& node_feats, const at::Tensor& edge_attrs,
    const at::Tensor& weights, const at::Tensor& edge_src, const at::Tensor& edge_dst, const at::Tensor& paths,
    const at::Tensor& cg_index, const at::Tensor& cg_value, const at::Tensor& cg_offsets) {
  constexpr const char* op = "tp_conv_backward";
  const auto dtype = check_float(op, "node_feats", node_feats);
  const int64_t n_src = node_feats.size(0);
  check_tensor(op, "grad_out", grad_out, dtype, {-1, -1});
  const int64_t n_nodes = grad_out.size(0), dim_out = grad_out.size(1);
  check_tensor(op, "edge_attrs", edge_attrs, dtype, {-1, -1});
  const int64_t E = edge_attrs.size(0);
  const int64_t n_w = check_weights(op, weights, dtype, E, "E = edge_attrs.size(0)");
  check_index(op, "edge_src", edge_src, E, n_src, "node_feats.size(0)");
  check_index(op, "edge_dst", edge_dst, E, n_nodes, "grad_out.size(0)");
  check_descriptor_tensors(op, paths, cg_index, cg_value, cg_offsets, dtype);
  const at::Tensor g = grad_out.contiguous(), x = node_feats.contiguous(), b = edge_attrs.contiguous();
  const at::Tensor w = weights.contiguous(), src = edge_src.contiguous(), dst = edge_dst.contiguous();
  at::Tensor gx = at::empty_like(x), gb = at::empty_like(b), gw = at::empty_like(w);
  AT_DISPATCH_FLOATING_TYPES(dtype, "tp_conv_backward_cpu", [&] {
    const Descriptor<scalar_t> D = parse_descriptor<scalar_t>(op, paths, cg_index, cg_value, cg_offsets,
                                                              x.size(1), b.size(1), dim_out, n_w);
    std::vector<int64_t> row_ptr, perm, dst_sorted;
    sort_edges(src.const_data_ptr<int64_t>(), dst.const_data_ptr<int64_t>(), E, n_src, row_ptr, perm,
               dst_sorted);
    const at::Tensor xt = D.in1.trivial ? x : rows_to_ir_mul<scalar_t>(D.in1, x);
    const at::Tensor gt = D.out.trivial ? g : rows_to_ir_mul<scalar_t>(D.out, g);
    Problem<scalar_t> pr = input_problem(D, xt, x.size(1), true, b, w, n_w, dim_out);
    pr.row_ptr = row_ptr.data(), pr.perm = perm.data(), pr.other = dst_sorted.data();
    pr.g = gt.const_data_ptr<scalar_t>(), pr.g_stride = gt.size(1), pr.g_ir_mul = true;
    pr.gx1 = gx.mutable_data_ptr<scalar_t>(), pr.gx2 = gb.mutable_data_ptr<scalar_t>();
    pr.gw = gw.mutable_data_ptr<scalar_t>();
    run_backward(pr, n_src, E, w.dim() == 2);
  });
  return {gx, gb, gw};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastflow, CPU, m) {
  m.impl("tensor_product", &tensor_product_cpu);
  m.impl("tensor_product_backward", &tensor_product_backward_cpu);
  m.impl("tp_conv", &tp_conv_cpu);
  m.impl("tp_conv_backward", &tp_conv_backward_cpu);
}

}  // namespace fastflow
