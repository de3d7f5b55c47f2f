"""fastflow::symmetric_contraction: MACE's product basis (``SymmetricContraction``) as one op.

Per node n of element e = elements[n] and channel c, for each output irrep o (components m), MACE evaluates a
polynomial of degree ν ≤ correlation in the node's features x[n, c, :] (one copy of each coupling irrep, I values):

    out[n, c, (o, m)] = Σ_ν Σ_{i1..iν} Σ_k U_ν[m, i1, …, iν, k] W_ν[e, k, c] x[n, c, i1] ⋯ x[n, c, iν]

with U_ν the generalised Clebsch–Gordan tensors (buffers) and W_ν the element-dependent weights. The x's commute,
so only sorted index tuples t = (i1 ≤ … ≤ iν) matter (U summed over the permutations of its i's), and U is very
sparse. A plan (``build_plan``, once per U) turns this into a sparse polynomial:

    monomials  int64 [S, 2]  (parent, i): monomial s is P[parent] · x[i] (parent = -1: x[i] itself); every parent
                             comes before its children, so one pass in slot order computes them all
    terms      int64 [Q, 2]  (monomial s, output row r), sorted by r; rows r enumerate (o, m), irrep by irrep
    u          [Q, K]        the symmetrised U: row q = (r, t), column k = a weight row of o (all ν, in the order
                             of the caller's weights)

and the op takes the per-element coefficients of the terms (``contraction_coefficients``, one small matmul):

    coeffs[e, q, c] = Σ_k u[q, k] W[e, k, c]
    out[n, r, c]    = Σ_{q with row r} coeffs[e_n, q, c] · P[n, s_q, c]

Layouts are MACE's: x ``[N, C, I]``; the output ``[N, C · Σ_o d_o]`` holds per output irrep o a block of C · d_o
columns, channel-major (e3nn's mul_ir: column C·off_o + c·d_o + m), d_o = out_dims[o].

Implementations (fastflow.ops.backends picks one; ``auto`` falls back to the reference with one warning where
fastflow._C or fastflow.triton_kernels lacks this op):
    reference  symmetric_contraction_reference below (dense gathers; memory N·Q·C)
    cpp        torch.ops.fastflow.symmetric_contraction (+ _backward): schemas csrc/registration.cpp, kernels
               csrc/symmetric_contraction.cpp (OpenMP over nodes, vectorised over channels)
    triton     torch.ops.fastflow.symmetric_contraction_triton (+ _backward_triton): custom ops below, kernels
               triton_kernels/symmetric_contraction.py (a program per node × channel block)

Autograd: gradients of x (forces) and of coeffs (training: W's gradient then follows through the matmul). The first
backward runs the fused backward kernel; a backward that builds a graph (create_graph=True: training on forces)
recomputes the reference and differentiates it (``recompute_vjp``), so higher derivatives are exact. NaN or inf in
x reach only that node's outputs (in coeffs: the nodes of that element), as in the reference.
"""

from __future__ import annotations

import importlib
from typing import NamedTuple

import torch

from fastflow.memo import TensorMemo, readable
from fastflow.ops.backends import (
    FLOAT_DTYPES,
    BackendUnavailable,
    OpFamily,
    bind_cpp_ops,
    recompute_vjp,
    register_cpp_op,
)

OP = "symmetric_contraction"


class ContractionPlan(NamedTuple):
    """The sparse form of a symmetric contraction (see the module docstring). ``q_offsets[o] : q_offsets[o + 1]``
    are the terms of output irrep o, ``k_offsets[o] : k_offsets[o + 1]`` its columns of ``u`` (its weights)."""

    monomials: torch.Tensor  # int64 [S, 2]
    terms: torch.Tensor  # int64 [Q, 2]
    u: torch.Tensor  # float64 [Q, K]
    out_dims: list[int]
    q_offsets: list[int]
    k_offsets: list[int]


def build_plan(u_blocks, in_dim: int) -> ContractionPlan:
    """The plan of a contraction from its U tensors: ``u_blocks[o]`` lists output irrep o's tensors
    ``[d_o, I, …, I (ν times), K_ν]`` in the order its weights are concatenated along k (MACE: ν = correlation
    first). Entries are summed over permutations of the i's in float64; tuples whose sum is exactly 0 are dropped."""
    blocks = [list(block) for block in u_blocks]
    if not blocks or any(not block for block in blocks):
        raise ValueError(f"{OP}: build_plan needs at least one U tensor per output irrep")
    out_dims, k_offsets = [], [0]
    entries = []  # per output irrep: {(m, t): {k: value}}
    for o, block in enumerate(blocks):
        d_o = block[0].shape[0]
        coefficients: dict[tuple[int, tuple[int, ...]], dict[int, float]] = {}
        k0 = k_offsets[-1]
        for U in block:
            nu = U.dim() - 2
            if nu < 1 or U.shape[0] != d_o or any(n != in_dim for n in U.shape[1:-1]):
                raise ValueError(
                    f"{OP}: U tensors of output irrep {o} must be [{d_o}, {in_dim}, ..., K], got {list(U.shape)}"
                )
            U64 = U.detach().to("cpu", torch.float64)
            index = U64.nonzero()
            values = U64[tuple(index.T)].tolist()
            for row, value in zip(index.tolist(), values):
                key = (row[0], tuple(sorted(row[1:-1])))
                column = coefficients.setdefault(key, {})
                column[k0 + row[-1]] = column.get(k0 + row[-1], 0.0) + value
            k0 += U.shape[-1]
        out_dims.append(int(d_o))
        k_offsets.append(k0)
        entries.append({key: ks for key, ks in coefficients.items() if any(v != 0.0 for v in ks.values())})

    # monomial slots: x itself first (slot i = x[i]), then every tuple and its prefixes, degree by degree
    tuples = {t[:d] for block in entries for (_, t) in block for d in range(2, len(t) + 1)}
    slot = {(i,): i for i in range(in_dim)}
    monomials = [(-1, i) for i in range(in_dim)]
    for t in sorted(tuples, key=lambda t: (len(t), t)):
        slot[t] = len(monomials)
        monomials.append((slot[t[:-1]], t[-1]))

    terms, rows, q_offsets = [], [], [0]
    row0 = 0
    for o, block in enumerate(entries):
        for (m, t), ks in sorted(block.items(), key=lambda item: (item[0][0], slot[item[0][1]])):
            terms.append((slot[t], row0 + m))
            rows.append(ks)
        row0 += out_dims[o]
        q_offsets.append(len(terms))
    u = torch.zeros(len(terms), k_offsets[-1], dtype=torch.float64)
    for q, ks in enumerate(rows):
        for k, value in ks.items():
            u[q, k] = value
    return ContractionPlan(
        torch.tensor(monomials, dtype=torch.int64).reshape(-1, 2),
        torch.tensor(terms, dtype=torch.int64).reshape(-1, 2),
        u,
        out_dims,
        q_offsets,
        k_offsets,
    )


def contraction_coefficients(u, weights, q_offsets: list[int], k_offsets: list[int]) -> torch.Tensor:
    """``coeffs [E, Q, C]`` from the plan's ``u [Q, K]`` and the weights ``[E, K, C]`` (all output irreps' weights
    concatenated along k): one matmul per output irrep (u is block diagonal), differentiable."""
    blocks = [
        torch.matmul(u[q0:q1, k0:k1], weights[:, k0:k1])
        for q0, q1, k0, k1 in zip(q_offsets[:-1], q_offsets[1:], k_offsets[:-1], k_offsets[1:])
    ]
    return torch.cat(blocks, 1)


def symmetric_contraction(
    x, elements, coeffs, monomials, terms, out_dims: list[int], backend: str | None = None
) -> torch.Tensor:
    """MACE's symmetric contraction (see the module docstring for the math and the plan).

    Arguments (N nodes, C channels, I coupling-irrep components, E elements, S monomials, Q terms):
        x ``[N, C, I]``: float32 or float64.
        elements ``[N]`` int64: each node's element, in [0, E).
        coeffs ``[E, Q, C]``: the terms' per-element coefficients, dtype and device of x.
        monomials ``[S, 2]``, terms ``[Q, 2]`` int64: the plan; out_dims: the output irreps' dimensions.
        backend: "auto" (default), "cpp", "triton" or "reference".
    Return:
        ``[N, C · sum(out_dims)]`` in MACE's layout, dtype of x.
    """
    out_dims = [int(d) for d in out_dims]
    args = (x, elements, coeffs, monomials, terms)
    check_inputs(*args, out_dims)
    chosen = _resolve(backend, x.device)
    if chosen == "cpp":
        return _cpp_op()(*_contiguous(args), out_dims)
    if chosen == "triton":
        return symmetric_contraction_triton(*_contiguous(args), out_dims)
    return symmetric_contraction_reference(*args, out_dims)


def symmetric_contraction_reference(
    x, elements, coeffs, monomials, terms, out_dims: list[int]
) -> torch.Tensor:
    """The definition: monomials degree by degree, then out[n, r] = Σ_q coeffs[e_n, q] · P[n, s_q] (differentiable,
    any order)."""
    N, C, _ = x.shape
    xt = x.transpose(1, 2)  # [N, I, C]
    parents, indices = monomials[:, 0].tolist(), monomials[:, 1].tolist()
    # P[:, 0] = 1 (the parent -1), slot s at position[s]; one gather-multiply per degree
    P, position = x.new_ones(N, 1, C), {-1: 0}
    pending = list(range(len(parents)))
    while pending:
        level = [s for s in pending if parents[s] in position]
        if not level:
            raise ValueError(f"{OP}: monomials have a parent that is not an earlier slot")
        gathered = P[:, [position[parents[s]] for s in level]] * xt[:, [indices[s] for s in level]]
        for offset, s in enumerate(level):
            position[s] = P.size(1) + offset
        P = torch.cat([P, gathered], 1)
        pending = [s for s in pending if s not in position]
    P = P[:, [position[s] for s in range(len(parents))]]  # [N, S, C] in slot order
    rows = sum(out_dims)
    contributions = coeffs[elements] * P[:, terms[:, 0]]  # [N, Q, C]
    out = x.new_zeros(N, rows, C).index_add(1, terms[:, 1], contributions)
    blocks, r0 = [], 0
    for d in out_dims:  # rows (o, m) → MACE's columns c·d_o + m per irrep
        blocks.append(out[:, r0 : r0 + d].transpose(1, 2).reshape(N, C * d))
        r0 += d
    return torch.cat(blocks, 1) if blocks else x.new_zeros(N, 0)


# ---- argument checks ----

_CHECKED_PLANS = TensorMemo()  # modules pass the same plan tensors every call


def check_inputs(x, elements, coeffs, monomials, terms, out_dims: list[int]) -> None:
    """Raise with a message naming the argument, the expectation and what arrived."""
    if not torch.is_tensor(x) or x.dim() != 3:
        got = f"shape {list(x.shape)}" if torch.is_tensor(x) else type(x).__name__
        raise ValueError(f"{OP}: x must be [N, C, I] (nodes, channels, irrep components), got {got}")
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{OP}: x must be float32 or float64, got {x.dtype}")
    N, C, I = x.shape
    for name, tensor, shape, dtype in (
        ("elements", elements, "[N]", torch.int64),
        ("coeffs", coeffs, "[E, Q, C]", x.dtype),
        ("monomials", monomials, "[S, 2]", torch.int64),
        ("terms", terms, "[Q, 2]", torch.int64),
    ):
        if not torch.is_tensor(tensor) or tensor.dim() != shape.count(",") + 1:
            got = f"shape {list(tensor.shape)}" if torch.is_tensor(tensor) else type(tensor).__name__
            raise ValueError(f"{OP}: {name} must be {shape}, got {got}")
        if tensor.dtype != dtype:
            raise TypeError(f"{OP}: {name} must have dtype {dtype}, got {tensor.dtype}")
        if tensor.device != x.device:
            raise ValueError(f"{OP}: {name} is on {tensor.device}, expected {x.device} like x")
    if elements.size(0) != N:
        raise ValueError(f"{OP}: elements must have one entry per node ({N}), got {elements.size(0)}")
    if monomials.size(1) != 2 or terms.size(1) != 2:
        raise ValueError(
            f"{OP}: monomials must be [S, 2] (parent, i) and terms [Q, 2] (monomial, row), got "
            f"{list(monomials.shape)} and {list(terms.shape)}"
        )
    if coeffs.size(1) != terms.size(0) or coeffs.size(2) != C:
        raise ValueError(
            f"{OP}: coeffs must be [E, Q={terms.size(0)}, C={C}] (one row per term, one column per channel of "
            f"x), got {list(coeffs.shape)}"
        )
    if not isinstance(out_dims, (list, tuple)) or any(not isinstance(d, int) or d < 1 for d in out_dims):
        raise ValueError(f"{OP}: out_dims must be a list of positive irrep dimensions, got {out_dims!r}")
    if N and coeffs.size(0) == 0:
        raise ValueError(f"{OP}: coeffs has no element rows (E = 0) for {N} nodes")
    if N and readable(elements):
        low, high = (int(v) for v in torch.aminmax(elements))
        if low < 0 or high >= coeffs.size(0):
            raise IndexError(
                f"{OP}: elements holds indices in [{low}, {high}], outside [0, {coeffs.size(0)}) (coeffs.size(0))"
            )
    _check_plan(monomials, terms, I, sum(out_dims))


def _check_plan(monomials, terms, in_dim: int, rows: int) -> None:
    """The plan's values (once per plan tensor and version; CPU plans only, no device sync)."""
    if monomials.device.type != "cpu" or not readable(monomials) or not readable(terms):
        return
    _CHECKED_PLANS.get(
        (terms, monomials), lambda: _check_plan_values(monomials, terms, in_dim, rows), key=(in_dim, rows)
    )


def _check_plan_values(monomials, terms, in_dim: int, rows: int) -> None:
    S = monomials.size(0)
    slots = torch.arange(S)
    parent, index = monomials[:, 0], monomials[:, 1]
    if S and (bool((parent < -1).any()) or bool((parent >= slots).any())):
        raise ValueError(f"{OP}: monomials[s, 0] (the parent) must be -1 or an earlier slot (< s)")
    if S and (bool((index < 0).any()) or bool((index >= in_dim).any())):
        raise ValueError(f"{OP}: monomials[:, 1] must index x's {in_dim} irrep components (x.size(2))")
    if terms.size(0):
        mono, row = terms[:, 0], terms[:, 1]
        if bool((mono < 0).any()) or bool((mono >= S).any()):
            raise ValueError(f"{OP}: terms[:, 0] must index the {S} monomials")
        if bool((row < 0).any()) or bool((row >= rows).any()):
            raise ValueError(f"{OP}: terms[:, 1] must index the {rows} output rows (sum(out_dims))")
        if bool((row[1:] < row[:-1]).any()):
            raise ValueError(f"{OP}: terms must be sorted by output row (terms[:, 1])")


def _check_backward(grad_out, x, elements, coeffs, monomials, terms, out_dims) -> None:
    check_inputs(x, elements, coeffs, monomials, terms, out_dims)
    width = x.size(1) * sum(out_dims)
    if not torch.is_tensor(grad_out) or list(grad_out.shape) != [x.size(0), width]:
        got = f"shape {list(grad_out.shape)}" if torch.is_tensor(grad_out) else type(grad_out).__name__
        raise ValueError(f"{OP}_backward: grad_out must be [{x.size(0)}, {width}], got {got}")
    if grad_out.dtype != x.dtype or grad_out.device != x.device:
        raise TypeError(
            f"{OP}_backward: grad_out is {grad_out.dtype} on {grad_out.device}, expected {x.dtype} on {x.device}"
        )


def _contiguous(tensors):
    return tuple(t.contiguous() for t in tensors)


# ---- backend availability ----

_FAMILY = OpFamily(
    "symmetric contractions",
    (OP, f"{OP}_backward"),
    "csrc/symmetric_contraction.cpp",
    "fastflow.triton_kernels.symmetric_contraction",
)
cpp_unavailable_reason = _FAMILY.cpp_unavailable_reason
triton_unavailable_reason = _FAMILY.triton_unavailable_reason
_resolve = _FAMILY.resolve


# ---- fake kernels (torch.compile / export) and autograd ----


def _fake(x, elements, coeffs, monomials, terms, out_dims):
    check_inputs(x, elements, coeffs, monomials, terms, list(out_dims))
    return x.new_empty(x.size(0), x.size(1) * sum(out_dims))


def _backward_fake(grad_out, x, elements, coeffs, monomials, terms, out_dims, need_x, need_coeffs):
    _check_backward(grad_out, x, elements, coeffs, monomials, terms, list(out_dims))
    return (
        torch.empty_like(x) if need_x else x.new_empty(0),
        torch.empty_like(coeffs) if need_coeffs else coeffs.new_empty(0),
    )


def _setup_context(ctx, inputs, output):
    ctx.out_dims = list(inputs[5])
    ctx.coeffs_node = inputs[2].grad_fn  # None for a leaf: then needs_input_grad decides
    ctx.save_for_backward(*inputs[:5])


def _engine_will_execute(node) -> bool:
    """Whether the running backward pass reaches ``node`` (True where torch cannot say)."""
    try:
        return bool(torch._C._will_engine_execute_node(node))
    except (AttributeError, RuntimeError):
        return True


def _make_backward(fused):
    """Autograd formula: ``fused()(grad, *inputs, need_x, need_coeffs)`` normally; under create_graph the
    reference's VJP, itself differentiable."""

    def backward(ctx, grad):
        x, elements, coeffs, monomials, terms = ctx.saved_tensors
        out_dims = ctx.out_dims
        need_x, _, need_coeffs = ctx.needs_input_grad[:3]
        if need_coeffs and ctx.coeffs_node is not None:
            # Forces (autograd.grad wrt positions) do not reach the weights: skip their gradient, which
            # needs_input_grad (fixed at forward) would still ask for.
            need_coeffs = _engine_will_execute(ctx.coeffs_node)
        if torch.is_grad_enabled():  # create_graph=True: keep the graph, through the reference
            inputs = (x, elements, coeffs, monomials, terms, out_dims)
            return recompute_vjp(symmetric_contraction_reference, inputs, 5, grad, skip=(1, 3, 4))
        grad_x, grad_coeffs = fused()(
            grad.contiguous(), x, elements, coeffs, monomials, terms, out_dims, need_x, need_coeffs
        )
        return (
            grad_x if need_x else None,
            None,
            grad_coeffs if need_coeffs else None,
            None,
            None,
            None,
        )

    return backward


def _cpp_op():
    """torch.ops.fastflow.symmetric_contraction.default, with its fake kernel and autograd registered."""
    _FAMILY.require_cpp()
    return _bind_cpp_ops()


def _bind_cpp_ops():
    """Register the fake kernels and autograd of the C++ ops (schemas in csrc/registration.cpp)."""
    if not hasattr(torch.ops.fastflow, OP):
        raise BackendUnavailable(f"the loaded fastflow._C has no fastflow::{OP}")
    register_cpp_op(f"{OP}_backward", _backward_fake)
    return register_cpp_op(
        OP,
        _fake,
        _make_backward(lambda: torch.ops.fastflow.symmetric_contraction_backward.default),
        _setup_context,
    )


bind_cpp_ops(_bind_cpp_ops)


# ---- Triton: custom ops around fastflow.triton_kernels.symmetric_contraction (imported lazily) ----
# custom_op, not triton_op: see cache_forecast.py.


def _triton_kernels():
    return importlib.import_module(
        "fastflow.triton_kernels.symmetric_contraction"
    )  # fastflow never needs triton


@torch.library.custom_op("fastflow::symmetric_contraction_triton", mutates_args=())
def symmetric_contraction_triton(
    x: torch.Tensor,
    elements: torch.Tensor,
    coeffs: torch.Tensor,
    monomials: torch.Tensor,
    terms: torch.Tensor,
    out_dims: list[int],
) -> torch.Tensor:
    # Every Triton op checks before launching: a kernel launched on wrong shapes reads out of bounds.
    check_inputs(x, elements, coeffs, monomials, terms, out_dims)
    return _triton_kernels().symmetric_contraction(x, elements, coeffs, monomials, terms, out_dims)


@torch.library.custom_op("fastflow::symmetric_contraction_backward_triton", mutates_args=())
def symmetric_contraction_backward_triton(
    grad_out: torch.Tensor,
    x: torch.Tensor,
    elements: torch.Tensor,
    coeffs: torch.Tensor,
    monomials: torch.Tensor,
    terms: torch.Tensor,
    out_dims: list[int],
    need_x: bool,
    need_coeffs: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    _check_backward(grad_out, x, elements, coeffs, monomials, terms, out_dims)
    return tuple(
        _triton_kernels().symmetric_contraction_backward(
            grad_out, x, elements, coeffs, monomials, terms, out_dims, need_x, need_coeffs
        )
    )


symmetric_contraction_triton.register_fake(_fake)
symmetric_contraction_backward_triton.register_fake(_backward_fake)
symmetric_contraction_triton.register_autograd(
    _make_backward(lambda: symmetric_contraction_backward_triton), setup_context=_setup_context
)

__all__ = [
    "ContractionPlan",
    "build_plan",
    "contraction_coefficients",
    "symmetric_contraction",
    "symmetric_contraction_reference",
]
