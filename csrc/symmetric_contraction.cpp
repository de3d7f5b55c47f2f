// CPU kernels of fastflow::symmetric_contraction and symmetric_contraction_backward (math, plan and reference:
// fastflow/ops/symmetric_contraction.py).
//
// A node's features x[n] are [C][I] (MACE's layout). Per node and block of kBlock channels the kernel transposes
// the block to xt[I][kBlock] (channels innermost), computes the monomials P[s] = P[parent] · xt[i] in slot order
// into a [S][kBlock] scratch, and per output row r sums its terms coeffs[e][q] · P[s_q] in registers (two partial
// sums: independent FMA chains) before writing the row to MACE's columns. Every inner loop runs over the block's
// channels, contiguous in coeffs and in the scratch rows, so it vectorises; the loops are compiled per ISA
// (FASTFLOW_CLONES: AVX-512, AVX2, baseline). Nodes run in parallel; no node's result depends on another's.
//
// Backward: the same monomials, then gP[s] = Σ_q g[r_q] · coeffs[e][q] over the terms, and one reverse pass over
// the slots (gP[parent] += gP[s] · x[i], gx[i] += gP[s] · P[parent]). The coefficients' gradient sums over the
// nodes of each element: then the work is split into (element, channel block) jobs, each walking its element's
// nodes in order, so the sums are the same for any thread count and need no atomics. Without it (forces), nodes
// run in parallel as in the forward.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#include "common.h"

namespace fastflow {
namespace {

constexpr const char* kOp = "symmetric_contraction";

// Channels per block: 32 floats (two AVX-512 vectors) or 16 doubles; two partial sums make four FMA chains.
template <typename T>
constexpr int kBlock = 128 / sizeof(T);

struct Plan {
  int64_t N = 0, C = 0, I = 0, E = 0, S = 0, Q = 0, R = 0, dim_out = 0;
  std::vector<int32_t> parent, index;     // [S]
  std::vector<int32_t> term_mono;         // [Q]
  std::vector<int32_t> row_begin;         // [R + 1]: the terms of row r
  std::vector<int64_t> row_col, row_step;  // output column of (row r, channel c): row_col[r] + c · row_step[r]
};

template <typename T>
struct Problem {
  const Plan* plan;
  const T* x;              // [N, C, I]
  const int64_t* element;  // [N]
  const T* coeffs;         // [E, Q, C]
  T* out;                  // [N, dim_out]
  const T* grad;           // [N, dim_out] (backward)
  T* grad_x;               // [N, C, I] or null
  T* grad_coeffs;          // [E, Q, C] or null
};

void check_tensor(const char* op, const char* name, const at::Tensor& t, at::ScalarType dtype, int64_t dim) {
  TORCH_CHECK(t.device().is_cpu(), op, ": ", name, " must be a CPU tensor, got ", t.device());
  TORCH_CHECK(t.dim() == dim, op, ": ", name, " must be ", dim, "-d, got shape ", t.sizes());
  TORCH_CHECK(t.scalar_type() == dtype, op, ": ", name, " must have dtype ", dtype, ", got ", t.scalar_type());
}

// Checks every argument against the others and converts the plan; messages name the op and the argument.
Plan parse(const char* op, const at::Tensor& x, const at::Tensor& elements, const at::Tensor& coeffs,
           const at::Tensor& monomials, const at::Tensor& terms, at::IntArrayRef out_dims) {
  TORCH_CHECK(x.device().is_cpu(), op, ": x must be a CPU tensor, got ", x.device());
  TORCH_CHECK(x.dim() == 3, op, ": x must be [N, C, I] (nodes, channels, irrep components), got shape ", x.sizes());
  const auto dtype = x.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kDouble, op, ": x must be float32 or float64, got ", dtype);
  check_tensor(op, "elements", elements, at::kLong, 1);
  check_tensor(op, "coeffs", coeffs, dtype, 3);
  check_tensor(op, "monomials", monomials, at::kLong, 2);
  check_tensor(op, "terms", terms, at::kLong, 2);
  Plan p;
  p.N = x.size(0), p.C = x.size(1), p.I = x.size(2), p.E = coeffs.size(0), p.S = monomials.size(0);
  p.Q = terms.size(0);
  TORCH_CHECK(elements.size(0) == p.N, op, ": elements must have one entry per node (", p.N, "), got ",
              elements.size(0));
  TORCH_CHECK(monomials.size(1) == 2 && terms.size(1) == 2, op,
              ": monomials must be [S, 2] (parent, i) and terms [Q, 2] (monomial, row), got ", monomials.sizes(),
              " and ", terms.sizes());
  TORCH_CHECK(coeffs.size(1) == p.Q && coeffs.size(2) == p.C, op, ": coeffs must be [E, Q=", p.Q, ", C=", p.C,
              "] (one row per term, one column per channel of x), got ", coeffs.sizes());
  TORCH_CHECK(p.S < (int64_t(1) << 30) && p.Q < (int64_t(1) << 30), op, ": plan too large (S = ", p.S, ", Q = ",
              p.Q, ")");
  for (const int64_t d : out_dims) TORCH_CHECK(d >= 1, op, ": out_dims must be positive, got ", out_dims);
  for (const int64_t d : out_dims) p.R += d;
  p.dim_out = p.C * p.R;

  const at::Tensor mono = monomials.contiguous(), tm = terms.contiguous(), el = elements.contiguous();
  const int64_t* m = mono.const_data_ptr<int64_t>();
  p.parent.resize(p.S), p.index.resize(p.S);
  for (int64_t s = 0; s < p.S; ++s) {
    TORCH_CHECK(m[2 * s] >= -1 && m[2 * s] < s, op, ": monomials[", s, ", 0] (the parent) must be -1 or an earlier "
                "slot (< ", s, "), got ", m[2 * s]);
    TORCH_CHECK(m[2 * s + 1] >= 0 && m[2 * s + 1] < p.I, op, ": monomials[", s, ", 1] must index x's ", p.I,
                " irrep components, got ", m[2 * s + 1]);
    p.parent[s] = static_cast<int32_t>(m[2 * s]), p.index[s] = static_cast<int32_t>(m[2 * s + 1]);
  }
  const int64_t* t = tm.const_data_ptr<int64_t>();
  p.term_mono.resize(p.Q);
  p.row_begin.assign(p.R + 1, 0);
  for (int64_t q = 0; q < p.Q; ++q) {
    TORCH_CHECK(t[2 * q] >= 0 && t[2 * q] < p.S, op, ": terms[", q, ", 0] must index the ", p.S,
                " monomials, got ", t[2 * q]);
    TORCH_CHECK(t[2 * q + 1] >= 0 && t[2 * q + 1] < p.R, op, ": terms[", q, ", 1] must index the ", p.R,
                " output rows (sum(out_dims)), got ", t[2 * q + 1]);
    TORCH_CHECK(q == 0 || t[2 * q + 1] >= t[2 * q - 1], op, ": terms must be sorted by output row (terms[:, 1])");
    p.term_mono[q] = static_cast<int32_t>(t[2 * q]);
    ++p.row_begin[t[2 * q + 1] + 1];
  }
  for (int64_t r = 0; r < p.R; ++r) p.row_begin[r + 1] += p.row_begin[r];
  int64_t offset = 0;
  for (const int64_t d : out_dims) {  // row (o, m) → column C·offset_o + c·d_o + m
    for (int64_t k = 0; k < d; ++k) p.row_col.push_back(p.C * offset + k), p.row_step.push_back(d);
    offset += d;
  }
  const int64_t* e = el.const_data_ptr<int64_t>();
  for (int64_t n = 0; n < p.N; ++n) {
    TORCH_CHECK(e[n] >= 0 && e[n] < p.E, op, ": elements[", n, "] = ", e[n], " is outside [0, ", p.E,
                ") (coeffs.size(0))");
  }
  return p;
}

// ---- one node × one channel block (width n <= kBlock; loops have a constant trip count for full blocks) ----

template <typename T>
FASTFLOW_INLINE void monomials_block(const Plan& pl, const T* xn, int64_t c0, int n, T* xt, T* P) {
  constexpr int B = kBlock<T>;
  for (int l = 0; l < n; ++l) {
    for (int64_t i = 0; i < pl.I; ++i) xt[i * B + l] = xn[(c0 + l) * pl.I + i];
  }
  for (int64_t s = 0; s < pl.S; ++s) {
    const T* xi = xt + pl.index[s] * B;
    T* ps = P + s * B;
    if (pl.parent[s] < 0) {
      for (int l = 0; l < n; ++l) ps[l] = xi[l];
    } else {
      const T* pp = P + pl.parent[s] * B;
      for (int l = 0; l < n; ++l) ps[l] = pp[l] * xi[l];
    }
  }
}

template <typename T>
FASTFLOW_INLINE void forward_block(const Problem<T>& pr, int64_t node, int64_t c0, int n, T* xt, T* P) {
  constexpr int B = kBlock<T>;
  const Plan& pl = *pr.plan;
  monomials_block(pl, pr.x + node * pl.C * pl.I, c0, n, xt, P);
  const T* A = pr.coeffs + pr.element[node] * pl.Q * pl.C + c0;
  T* out = pr.out + node * pl.dim_out;
  for (int64_t r = 0; r < pl.R; ++r) {
    T acc0[B] = {}, acc1[B] = {};
    int32_t q = pl.row_begin[r];
    const int32_t end = pl.row_begin[r + 1];
    for (; q + 1 < end; q += 2) {
      const T *a0 = A + q * pl.C, *a1 = a0 + pl.C;
      const T *p0 = P + pl.term_mono[q] * B, *p1 = P + pl.term_mono[q + 1] * B;
      for (int l = 0; l < n; ++l) acc0[l] += a0[l] * p0[l], acc1[l] += a1[l] * p1[l];
    }
    if (q < end) {
      const T* a0 = A + q * pl.C;
      const T* p0 = P + pl.term_mono[q] * B;
      for (int l = 0; l < n; ++l) acc0[l] += a0[l] * p0[l];
    }
    T* o = out + pl.row_col[r] + c0 * pl.row_step[r];
    const int64_t step = pl.row_step[r];
    for (int l = 0; l < n; ++l) o[l * step] = acc0[l] + acc1[l];
  }
}

// gP, gxt: [S][B] and [I][B] scratch; g: [R][B]
template <typename T>
FASTFLOW_INLINE void backward_block(const Problem<T>& pr, int64_t node, int64_t c0, int n, T* xt, T* P, T* gP,
                                    T* gxt, T* g) {
  constexpr int B = kBlock<T>;
  const Plan& pl = *pr.plan;
  monomials_block(pl, pr.x + node * pl.C * pl.I, c0, n, xt, P);
  const int64_t e = pr.element[node];
  const T* A = pr.coeffs + e * pl.Q * pl.C + c0;
  const T* grad = pr.grad + node * pl.dim_out;
  for (int64_t r = 0; r < pl.R; ++r) {
    const T* gr = grad + pl.row_col[r] + c0 * pl.row_step[r];
    const int64_t step = pl.row_step[r];
    for (int l = 0; l < n; ++l) g[r * B + l] = gr[l * step];
  }
  if (pr.grad_coeffs != nullptr) {
    T* gA = pr.grad_coeffs + e * pl.Q * pl.C + c0;
    for (int64_t r = 0; r < pl.R; ++r) {
      const T* gr = g + r * B;
      for (int32_t q = pl.row_begin[r]; q < pl.row_begin[r + 1]; ++q) {
        T* ga = gA + q * pl.C;
        const T* p = P + pl.term_mono[q] * B;
        for (int l = 0; l < n; ++l) ga[l] += gr[l] * p[l];
      }
    }
  }
  if (pr.grad_x == nullptr) return;
  std::fill(gP, gP + pl.S * B, T(0));
  std::fill(gxt, gxt + pl.I * B, T(0));
  for (int64_t r = 0; r < pl.R; ++r) {
    const T* gr = g + r * B;
    for (int32_t q = pl.row_begin[r]; q < pl.row_begin[r + 1]; ++q) {
      const T* a = A + q * pl.C;
      T* gp = gP + pl.term_mono[q] * B;
      for (int l = 0; l < n; ++l) gp[l] += gr[l] * a[l];
    }
  }
  for (int64_t s = pl.S - 1; s >= 0; --s) {
    const T* gs = gP + s * B;
    T* gi = gxt + pl.index[s] * B;
    if (pl.parent[s] < 0) {
      for (int l = 0; l < n; ++l) gi[l] += gs[l];
    } else {
      const T* xi = xt + pl.index[s] * B;
      const T* pp = P + pl.parent[s] * B;
      T* gpp = gP + pl.parent[s] * B;
      for (int l = 0; l < n; ++l) gpp[l] += gs[l] * xi[l], gi[l] += gs[l] * pp[l];
    }
  }
  T* gx = pr.grad_x + node * pl.C * pl.I;
  for (int l = 0; l < n; ++l) {
    for (int64_t i = 0; i < pl.I; ++i) gx[(c0 + l) * pl.I + i] = gxt[i * B + l];
  }
}

template <typename T>
struct Scratch {
  std::vector<T> xt, P, gP, gxt, g;
  explicit Scratch(const Plan& pl, bool backward) {
    constexpr int B = kBlock<T>;
    xt.assign(pl.I * B, T(0)), P.assign(std::max<int64_t>(pl.S, 1) * B, T(0));
    if (backward) gP.assign(P.size(), T(0)), gxt.assign(xt.size(), T(0)), g.assign(pl.R * B, T(0));
  }
};

// Nodes [n0, n1), all channel blocks; channel blocks [b0, b1) of one node list (backward with coefficients).
template <typename T>
FASTFLOW_INLINE void forward_nodes_impl(const Problem<T>& pr, int64_t n0, int64_t n1, Scratch<T>& S) {
  constexpr int B = kBlock<T>;
  const int64_t C = pr.plan->C, full = C / B * B;
  for (int64_t node = n0; node < n1; ++node) {
    for (int64_t c0 = 0; c0 < full; c0 += B) forward_block(pr, node, c0, B, S.xt.data(), S.P.data());
    if (full < C) forward_block(pr, node, full, static_cast<int>(C - full), S.xt.data(), S.P.data());
  }
}

template <typename T>
FASTFLOW_INLINE void backward_nodes_impl(const Problem<T>& pr, const int64_t* nodes, int64_t count, int64_t c_begin,
                                         int64_t c_end, Scratch<T>& S) {
  constexpr int B = kBlock<T>;
  for (int64_t t = 0; t < count; ++t) {
    for (int64_t c0 = c_begin; c0 < c_end; c0 += B) {
      const int n = static_cast<int>(std::min<int64_t>(B, c_end - c0));
      if (n == B) {
        backward_block(pr, nodes[t], c0, B, S.xt.data(), S.P.data(), S.gP.data(), S.gxt.data(), S.g.data());
      } else {
        backward_block(pr, nodes[t], c0, n, S.xt.data(), S.P.data(), S.gP.data(), S.gxt.data(), S.g.data());
      }
    }
  }
}

// The per-ISA clones (templates cannot carry target_clones, so one definition per type).
#define FASTFLOW_PER_TYPE(T)                                                                                     \
  FASTFLOW_CLONES void forward_nodes(const Problem<T>& pr, int64_t n0, int64_t n1, Scratch<T>& S) {             \
    forward_nodes_impl(pr, n0, n1, S);                                                                           \
  }                                                                                                              \
  FASTFLOW_CLONES void backward_nodes(const Problem<T>& pr, const int64_t* nodes, int64_t count, int64_t c_begin, \
                                      int64_t c_end, Scratch<T>& S) {                                            \
    backward_nodes_impl(pr, nodes, count, c_begin, c_end, S);                                                    \
  }
FASTFLOW_PER_TYPE(float)
FASTFLOW_PER_TYPE(double)
#undef FASTFLOW_PER_TYPE

// Nodes per parallel chunk: a node costs ~(S + Q)·C multiply-adds, thousands of cycles, so small chunks balance.
constexpr int64_t kGrainNodes = 4;

at::Tensor symmetric_contraction_cpu(const at::Tensor& x, const at::Tensor& elements, const at::Tensor& coeffs,
                                     const at::Tensor& monomials, const at::Tensor& terms, at::IntArrayRef out_dims) {
  const Plan pl = parse(kOp, x, elements, coeffs, monomials, terms, out_dims);
  const at::Tensor xc = x.contiguous(), ec = elements.contiguous(), cc = coeffs.contiguous();
  at::Tensor out = at::empty({pl.N, pl.dim_out}, xc.options());
  if (pl.N == 0 || pl.dim_out == 0) return out;
  AT_DISPATCH_FLOATING_TYPES(xc.scalar_type(), "symmetric_contraction_cpu", [&] {
    Problem<scalar_t> pr{&pl, xc.const_data_ptr<scalar_t>(), ec.const_data_ptr<int64_t>(),
                         cc.const_data_ptr<scalar_t>(), out.mutable_data_ptr<scalar_t>(), nullptr, nullptr, nullptr};
    at::parallel_for(0, pl.N, kGrainNodes, [&](int64_t n0, int64_t n1) {
      Scratch<scalar_t> S(pl, false);
      forward_nodes(pr, n0, n1, S);
    });
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> symmetric_contraction_backward_cpu(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& elements, const at::Tensor& coeffs,
    const at::Tensor& monomials, const at::Tensor& terms, at::IntArrayRef out_dims, bool need_x, bool need_coeffs) {
  constexpr const char* op = "symmetric_contraction_backward";
  const Plan pl = parse(op, x, elements, coeffs, monomials, terms, out_dims);
  check_tensor(op, "grad_out", grad_out, x.scalar_type(), 2);
  TORCH_CHECK(grad_out.size(0) == pl.N && grad_out.size(1) == pl.dim_out, op, ": grad_out must be [", pl.N, ", ",
              pl.dim_out, "], got ", grad_out.sizes());
  const at::Tensor g = grad_out.contiguous(), xc = x.contiguous(), ec = elements.contiguous();
  const at::Tensor cc = coeffs.contiguous();
  at::Tensor gx = need_x ? at::empty_like(xc) : at::empty({0}, xc.options());
  at::Tensor gc = need_coeffs ? at::zeros_like(cc) : at::empty({0}, cc.options());
  if (pl.N == 0 || (!need_x && !need_coeffs)) {
    if (need_x) gx.zero_();
    return {gx, gc};
  }
  AT_DISPATCH_FLOATING_TYPES(xc.scalar_type(), "symmetric_contraction_backward_cpu", [&] {
    constexpr int B = kBlock<scalar_t>;
    Problem<scalar_t> pr{&pl,
                         xc.const_data_ptr<scalar_t>(),
                         ec.const_data_ptr<int64_t>(),
                         cc.const_data_ptr<scalar_t>(),
                         nullptr,
                         g.const_data_ptr<scalar_t>(),
                         need_x ? gx.mutable_data_ptr<scalar_t>() : nullptr,
                         need_coeffs ? gc.mutable_data_ptr<scalar_t>() : nullptr};
    if (!need_coeffs) {
      at::parallel_for(0, pl.N, kGrainNodes, [&](int64_t n0, int64_t n1) {
        Scratch<scalar_t> S(pl, true);
        std::vector<int64_t> nodes(n1 - n0);
        for (int64_t n = n0; n < n1; ++n) nodes[n - n0] = n;
        backward_nodes(pr, nodes.data(), n1 - n0, 0, pl.C, S);
      });
      return;
    }
    // nodes grouped by element (stable), then one job per (element, channel block)
    const int64_t* element = ec.const_data_ptr<int64_t>();
    std::vector<int64_t> start(pl.E + 1, 0), order(pl.N);
    for (int64_t n = 0; n < pl.N; ++n) ++start[element[n] + 1];
    for (int64_t e = 0; e < pl.E; ++e) start[e + 1] += start[e];
    std::vector<int64_t> fill(start.begin(), start.end() - 1);
    for (int64_t n = 0; n < pl.N; ++n) order[fill[element[n]]++] = n;
    const int64_t blocks = std::max<int64_t>(1, (pl.C + B - 1) / B);
    at::parallel_for(0, pl.E * blocks, 1, [&](int64_t j0, int64_t j1) {
      Scratch<scalar_t> S(pl, true);
      for (int64_t j = j0; j < j1; ++j) {
        const int64_t e = j / blocks, c0 = (j % blocks) * B;
        backward_nodes(pr, order.data() + start[e], start[e + 1] - start[e], c0, std::min<int64_t>(c0 + B, pl.C),
                       S);
      }
    });
  });
  return {gx, gc};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastflow, CPU, m) {
  m.impl("symmetric_contraction", &symmetric_contraction_cpu);
  m.impl("symmetric_contraction_backward", &symmetric_contraction_backward_cpu);
}

}  // namespace fastflow
