"""Triton kernels of fastflow::symmetric_contraction and its backward (MACE's symmetric contraction).

Math, plan format, checks and reference: fastflow/ops/symmetric_contraction.py. A program owns one node and a block
of channels (BLOCK_C lanes, one channel each). The monomial values cannot live in a register array indexed at run
time, so each term recomputes its monomial from the x values it multiplies: the plan's parent chains are unrolled
on the host into a ``factors [S, DEGREE]`` table (x indices, -1 padding; DEGREE = the largest correlation, a
constexpr), and a term costs DEGREE loads of x (L1 hits: a node's x block is I · BLOCK_C values) and multiplies.
Terms are grouped by output row (the plan sorts them), so each row is summed in registers and stored once.

x is transposed to [N, I, C] on the way in (one copy) so that every load of x[n, i, channel block] is coalesced.

Backward: per term, g[r] · coeffs[e, q] times the product of the other factors goes to each factor's gradient
(a factor that appears twice gets two contributions: d(x²) = 2x dx), accumulated with atomic adds into the
program's own rows of grad_x (no other program touches them, so the sums run in a fixed order); the coefficient
gradient g[r] · P adds up over the nodes of an element with atomic adds (summation order may vary between runs).
"""

import torch
import triton
import triton.language as tl

from fastflow.memo import TensorMemo

MAX_BLOCK_C = 128  # channels per program (MACE's widths are 32-256)

_TABLES = TensorMemo()  # modules pass the same plan tensors every call


@triton.jit
def _factor(x_rows, i, C, mask_c):
    """x[i] of the block's channels, or 1 for the padding index -1."""
    value = tl.load(x_rows + tl.maximum(i, 0) * C, mask=mask_c, other=1.0)
    return tl.where(i >= 0, value, 1.0)


@triton.jit
def _symmetric_contraction_kernel(
    xt_ptr,  # [N, I, C] x transposed (channels innermost)
    elements_ptr,  # [N] int64
    coeffs_ptr,  # [E, Q, C]
    factors_ptr,  # [S, DEGREE] int32: x indices of each monomial, -1 padding
    term_mono_ptr,  # [Q] int32
    row_ptr,  # [R + 1] int32: the terms of row r are row_ptr[r] : row_ptr[r + 1]
    row_col_ptr,  # [R] int32: output column of (row r, channel c) = row_col[r] + c · row_step[r]
    row_step_ptr,  # [R] int32
    out_ptr,  # [N, dim_out]
    C,
    I,
    Q,
    R,
    dim_out,
    DEGREE: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    node = tl.program_id(0).to(tl.int64)
    offs_c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_c = offs_c < C
    element = tl.load(elements_ptr + node)
    x_rows = xt_ptr + node * I * C + offs_c  # + i · C: component i of the block's channels
    a_rows = coeffs_ptr + element * Q * C + offs_c  # + q · C: term q's coefficients
    for r in range(R):
        acc = tl.zeros([BLOCK_C], dtype=out_ptr.dtype.element_ty)
        for q in range(tl.load(row_ptr + r), tl.load(row_ptr + r + 1)):
            s = tl.load(term_mono_ptr + q)
            value = tl.load(a_rows + q * C, mask=mask_c, other=0.0)
            for d in tl.static_range(DEGREE):
                value *= _factor(x_rows, tl.load(factors_ptr + s * DEGREE + d), C, mask_c)
            acc += value
        column = tl.load(row_col_ptr + r) + offs_c * tl.load(row_step_ptr + r)
        tl.store(out_ptr + node * dim_out + column, acc, mask=mask_c)


@triton.jit
def _symmetric_contraction_backward_kernel(
    grad_ptr,  # [N, dim_out]
    xt_ptr,  # [N, I, C]
    elements_ptr,
    coeffs_ptr,
    factors_ptr,
    term_mono_ptr,
    row_ptr,
    row_col_ptr,
    row_step_ptr,
    grad_xt_ptr,  # [N, I, C] zeros (NEED_X)
    grad_coeffs_ptr,  # [E, Q, C] zeros (NEED_COEFFS)
    C,
    I,
    Q,
    R,
    dim_out,
    DEGREE: tl.constexpr,
    NEED_X: tl.constexpr,
    NEED_COEFFS: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    node = tl.program_id(0).to(tl.int64)
    offs_c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_c = offs_c < C
    element = tl.load(elements_ptr + node)
    x_rows = xt_ptr + node * I * C + offs_c
    gx_rows = grad_xt_ptr + node * I * C + offs_c
    a_rows = coeffs_ptr + element * Q * C + offs_c
    ga_rows = grad_coeffs_ptr + element * Q * C + offs_c
    for r in range(R):
        column = tl.load(row_col_ptr + r) + offs_c * tl.load(row_step_ptr + r)
        g = tl.load(grad_ptr + node * dim_out + column, mask=mask_c, other=0.0)
        for q in range(tl.load(row_ptr + r), tl.load(row_ptr + r + 1)):
            s = tl.load(term_mono_ptr + q)
            if NEED_COEFFS:
                monomial = g
                for d in tl.static_range(DEGREE):
                    monomial *= _factor(x_rows, tl.load(factors_ptr + s * DEGREE + d), C, mask_c)
                tl.atomic_add(ga_rows + q * C, monomial, mask=mask_c)
            if NEED_X:
                ga = g * tl.load(a_rows + q * C, mask=mask_c, other=0.0)
                for d in tl.static_range(DEGREE):
                    i = tl.load(factors_ptr + s * DEGREE + d)
                    others = ga
                    for d2 in tl.static_range(DEGREE):
                        if d2 != d:
                            others *= _factor(x_rows, tl.load(factors_ptr + s * DEGREE + d2), C, mask_c)
                    # (a vector mask: the interpreter rejects a scalar condition combined with mask_c)
                    tl.atomic_add(gx_rows + tl.maximum(i, 0) * C, others, mask=mask_c & (offs_c * 0 + i >= 0))


def _tables(monomials: torch.Tensor, terms: torch.Tensor, out_dims: list[int]):
    """(factors [S, DEGREE] int32, term_mono, row_ptr, row_offset, row_m, row_step, DEGREE) on the plan's device,
    built on the host once per plan (and again if a plan tensor changes)."""
    return _TABLES.get(
        (terms, monomials), lambda: _build_tables(monomials, terms, out_dims), key=tuple(out_dims)
    )


def _build_tables(monomials: torch.Tensor, terms: torch.Tensor, out_dims: list[int]):
    parents, indices = monomials[:, 0].tolist(), monomials[:, 1].tolist()
    chains = []
    for s in range(len(parents)):
        chain = [indices[s]] if parents[s] < 0 else chains[parents[s]] + [indices[s]]
        chains.append(chain)
    degree = max((len(chain) for chain in chains), default=1)
    factors = [chain + [-1] * (degree - len(chain)) for chain in chains] or [[-1]]
    rows = terms[:, 1].tolist()
    R = sum(out_dims)
    row_ptr = [0] * (R + 1)
    for r in rows:
        row_ptr[r + 1] += 1
    for r in range(R):
        row_ptr[r + 1] += row_ptr[r]
    row_offset, row_m, row_step, offset = [], [], [], 0
    for d in out_dims:  # row (o, m): column C·offset_o + c·d_o + m
        row_offset += [offset] * d
        row_m += list(range(d))
        row_step += [d] * d
        offset += d
    device = terms.device
    tables = (
        torch.tensor(factors, dtype=torch.int32, device=device),
        terms[:, 0].to(torch.int32),
        torch.tensor(row_ptr, dtype=torch.int32, device=device),
        torch.tensor(row_offset, dtype=torch.int32, device=device),
        torch.tensor(row_m, dtype=torch.int32, device=device),
        torch.tensor(row_step, dtype=torch.int32, device=device),
        degree,
    )
    return tables


def _launch(C: int):
    """(BLOCK_C, num_warps): one lane per channel, up to MAX_BLOCK_C per program."""
    block = min(MAX_BLOCK_C, triton.next_power_of_2(max(C, 1)))
    return block, max(1, min(4, block // 32))


def symmetric_contraction(x, elements, coeffs, monomials, terms, out_dims):
    """Launch on validated inputs (fastflow.ops.symmetric_contraction.check_inputs)."""
    N, C, I = x.shape
    R = sum(out_dims)
    out = torch.empty(N, C * R, dtype=x.dtype, device=x.device)
    if out.numel() == 0:
        return out
    factors, term_mono, row_ptr, row_offset, row_m, row_step, degree = _tables(monomials, terms, out_dims)
    xt = x.transpose(1, 2).contiguous()
    block, warps = _launch(C)
    _symmetric_contraction_kernel[(N, triton.cdiv(C, block))](
        xt,
        elements,
        coeffs,
        factors,
        term_mono,
        row_ptr,
        row_offset * C + row_m,
        row_step,
        out,
        C,
        I,
        coeffs.size(1),
        R,
        C * R,
        DEGREE=degree,
        BLOCK_C=block,
        num_warps=warps,
    )
    return out


def symmetric_contraction_backward(
    grad_out, x, elements, coeffs, monomials, terms, out_dims, need_x, need_coeffs
):
    """(grad_x or an empty tensor, grad_coeffs or an empty tensor) on validated inputs."""
    N, C, I = x.shape
    R = sum(out_dims)
    grad_xt = torch.zeros(N, I, C, dtype=x.dtype, device=x.device) if need_x else x.new_empty(0)
    grad_coeffs = torch.zeros_like(coeffs) if need_coeffs else coeffs.new_empty(0)
    if N and C and R and (need_x or need_coeffs):
        factors, term_mono, row_ptr, row_offset, row_m, row_step, degree = _tables(monomials, terms, out_dims)
        block, warps = _launch(C)
        _symmetric_contraction_backward_kernel[(N, triton.cdiv(C, block))](
            grad_out.contiguous(),
            x.transpose(1, 2).contiguous(),
            elements,
            coeffs,
            factors,
            term_mono,
            row_ptr,
            row_offset * C + row_m,
            row_step,
            grad_xt if need_x else x,  # an unused pointer when not needed
            grad_coeffs if need_coeffs else coeffs,
            C,
            I,
            coeffs.size(1),
            R,
            C * R,
            DEGREE=degree,
            NEED_X=bool(need_x),
            NEED_COEFFS=bool(need_coeffs),
            BLOCK_C=block,
            num_warps=warps,
        )
    return (grad_xt.transpose(1, 2).contiguous() if need_x else grad_xt), grad_coeffs
