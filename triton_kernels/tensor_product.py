"""Triton kernels of fastflow::tensor_product and fastflow::tp_conv (forward only).

Math, descriptor format and references: fastflow/ops/tensor_product.py. Forward only: this module has no
tensor_product_backward / tp_conv_backward, so the binding's autograd uses the reference's VJP.

The descriptor is small and known on the host, so each path gets its own launch, specialised on its mode, on
whether it has weights and on the power-of-two blocks of its multiplicities (constexprs); offsets, muls and
dims are plain arguments. One launch adds one path into `out`, so paths that share an output block simply add
up, launch after launch.

Inside a launch, a program owns a block of rows (samples, edges or the edges of one node) and vectorises over
them and over the multiplicities u, v, w. The path's CG entries are sorted on the host by output component k;
for each k the program contracts the entries of that k into t[z, u, v] = Σ C[i, j, k] x1[z, u, i] x2[z, v, j]
(t[z, u] in the uu* modes), applies the weights W (mode by mode) and drops the result into column k of a
[rows, mul_out, d_out] tile, which is written once at the end. Cost per row: n_cg·mul1·mul2 for the products
plus d_out·mul1·mul2·mul_out for the weights (uvw), as in e3nn.

tp_conv, two variants:
    atomic (default)  one program per block of edges: gather node_feats[edge_src], product, tl.atomic_add into
                      out[edge_dst]. Fast, but the order of the additions (so the last bits) may vary.
    deterministic     edges sorted by destination on the host (stable argsort) with CSR row pointers; one
                      program per destination node sums its edges in chunks, in a fixed order, and writes its
                      own row: bitwise reproducible, no atomics.

Everything is computed in the input dtype (float32 or float64), except in the tf32 / bf16 variants (float32
tensors): there a weighted uvw path with shared weights, whose weight step is a matrix product
o[z, w] = Σ_(u,v) t[z, (u, v)] W[(u, v), w], runs it as tl.dot tiles over chunks of u (_uvw_dot_tile) on tensor
cores: TF32, or bf16 operands, with float32 accumulation. Paths too small for tl.dot (a dimension under 16), per-row
weights (message passing: no matrix product) and the other modes stay float32.

Limits: the multiplicities are not tiled. A program holds [rows, mul1, mul2(, mul_out)] tiles in registers
(rows shrink to 1 as the tile grows, see _blocks), which suits the channel-wise products of message passing
(uvu with mul2 = 1) and small fully connected ones; a uvw path of 128 × 128 × 128 would need tiling over
u, v and w. The descriptor is read on the host (paths.tolist(), a sync on GPU) and its CG entries regrouped once
per descriptor, dtype and device (a plan, rebuilt only if a descriptor tensor is modified in place); each call
launches one kernel per path.
"""

import torch
import triton
import triton.language as tl
from fastflow.triton_kernels.dots import dot as precise_dot

from fastflow.memo import TensorMemo

# Mode codes, as in fastflow.ops.tensor_product.MODES (constexprs: jit functions may read them).
MODE_NAMES = ("uvw", "uvu", "uvv", "uuw", "uuu")
UVW, UVU, UVV, UUW, UUU = (tl.constexpr(code) for code in range(5))

MAX_TILE = 4096  # elements of the largest register tile of a program ([rows, u, v, w] for uvw)
MAX_ROWS = 64  # rows (samples or edges) per program at most
DETERMINISTIC_CHUNK = 16  # edges per chunk of a node in the deterministic tp_conv
DOT_DEPTH = 64  # (u, v) pairs per tl.dot of the tf32 / bf16 uvw paths
DOT_WEIGHT_TILE = 8192  # elements of their [U_CHUNK·V, W] weight tile at most


# ----------------------------------------------------------------------------------------------- device code


@triton.jit
def _path_tile(
    x1_ptr,
    x2_ptr,
    w_ptr,  # operand tensors (rows of x1 / x2 / weights picked by row1 / row2 / row_w)
    row1,
    row2,
    row_w,
    mask_z,  # [BLOCK_Z] int64 row indices and the mask of real rows
    stride1,
    stride2,
    stride_w,  # row strides; stride_w = 0 for shared weights
    cg_i,
    cg_j,
    cg_v,  # this path's CG entries, sorted by k
    k_start,  # [d_out + 1]: the entries of component k are k_start[k] : k_start[k + 1]
    off1,
    mul1,
    d1,
    off2,
    mul2,
    d2,
    mul_out,
    d_out,
    w_off,
    MODE: tl.constexpr,
    HAS_WEIGHT: tl.constexpr,
    BLOCK_Z: tl.constexpr,
    BLOCK_U: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_W: tl.constexpr,
    BLOCK_K: tl.constexpr,
    DOT: tl.constexpr,
    U_CHUNK: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """The path's contribution to the rows: a [BLOCK_Z, BLOCK_W, BLOCK_K] tile (output multiplicity, k)."""
    if DOT:
        return _uvw_dot_tile(
            x1_ptr,
            x2_ptr,
            w_ptr + w_off,
            row1,
            row2,
            mask_z,
            stride1,
            stride2,
            cg_i,
            cg_j,
            cg_v,
            k_start,
            off1,
            mul1,
            d1,
            off2,
            mul2,
            d2,
            mul_out,
            d_out,
            BLOCK_Z,
            BLOCK_V,
            BLOCK_W,
            BLOCK_K,
            BLOCK_U // U_CHUNK,
            U_CHUNK,
            PRECISION,
        )
    dtype = x1_ptr.dtype.element_ty
    offs_u = tl.arange(0, BLOCK_U)
    offs_v = tl.arange(0, BLOCK_V)
    offs_w = tl.arange(0, BLOCK_W)
    offs_k = tl.arange(0, BLOCK_K)
    mask_u = offs_u < mul1
    mask_v = offs_v < mul2
    mask_w = offs_w < mul_out

    # Column 0 of each operand block; component i of copy u is at + u * d1 + i.
    x1_base = x1_ptr + row1[:, None] * stride1 + off1 + offs_u[None, :] * d1  # [Z, U]
    x1_mask = mask_z[:, None] & mask_u[None, :]
    if MODE <= UVV:  # uv*: x2 has its own multiplicity v
        x2_base = x2_ptr + row2[:, None] * stride2 + off2 + offs_v[None, :] * d2  # [Z, V]
        x2_mask = mask_z[:, None] & mask_v[None, :]
    else:  # uu*: x2 shares u
        x2_base = x2_ptr + row2[:, None] * stride2 + off2 + offs_u[None, :] * d2  # [Z, U]
        x2_mask = x1_mask

    # The path's weights, in e3nn's row-major order of the mode's indices; W = 1 without weights. Padded
    # entries are 0, so they add nothing.
    w_row = w_ptr + row_w * stride_w + w_off  # [Z]
    z3 = mask_z[:, None, None]
    if MODE == UVW:  # W[u, v, w]: [Z, U, V, W]
        uvw_mask = mask_u[:, None, None] & mask_v[None, :, None] & mask_w[None, None, :]
        w_mask = z3[:, :, :, None] & uvw_mask[None]
        w_offs = (offs_u[:, None, None] * mul2 + offs_v[None, :, None]) * mul_out + offs_w[None, None, :]
        w_ptrs = w_row[:, None, None, None] + w_offs[None]
    elif MODE == UVU or MODE == UVV:  # W[u, v]: [Z, U, V]
        w_mask = z3 & (mask_u[:, None] & mask_v[None, :])[None]
        w_ptrs = w_row[:, None, None] + (offs_u[:, None] * mul2 + offs_v[None, :])[None]
    elif MODE == UUW:  # W[u, w]: [Z, U, W]
        w_mask = z3 & (mask_u[:, None] & mask_w[None, :])[None]
        w_ptrs = w_row[:, None, None] + (offs_u[:, None] * mul_out + offs_w[None, :])[None]
    else:  # UUU, W[u]: [Z, U]
        w_mask = mask_z[:, None] & mask_u[None, :]
        w_ptrs = w_row[:, None] + offs_u[None, :]
    if HAS_WEIGHT:
        W = tl.load(w_ptrs, mask=w_mask, other=0.0)
    else:
        W = tl.where(w_mask, 1.0, 0.0).to(dtype)

    acc = tl.zeros([BLOCK_Z, BLOCK_W, BLOCK_K], dtype)
    for k in range(d_out):
        # t = Σ over the entries of k of C[i, j, k] x1[:, u, i] x2[:, v, j] (x2[:, u, j] in the uu* modes).
        if MODE <= UVV:
            t = tl.zeros([BLOCK_Z, BLOCK_U, BLOCK_V], dtype)
        else:
            t = tl.zeros([BLOCK_Z, BLOCK_U], dtype)
        for e in range(tl.load(k_start + k), tl.load(k_start + k + 1)):
            c = tl.load(cg_v + e)
            a = tl.load(x1_base + tl.load(cg_i + e), mask=x1_mask, other=0.0)
            b = tl.load(x2_base + tl.load(cg_j + e), mask=x2_mask, other=0.0)
            if MODE <= UVV:
                t += c * a[:, :, None] * b[:, None, :]
            else:
                t += c * a * b

        # Weights, then the sum the mode asks for: o[z, output copy] for this k.
        if MODE == UVW:
            o = tl.sum(tl.sum(W * t[:, :, :, None], axis=2), axis=1)  # Σ_{u,v} W[u, v, w] t[u, v]
        elif MODE == UVU:
            o = tl.sum(W * t, axis=2)  # Σ_v W[u, v] t[u, v]
        elif MODE == UVV:
            o = tl.sum(W * t, axis=1)  # Σ_u W[u, v] t[u, v]
        elif MODE == UUW:
            o = tl.sum(W * t[:, :, None], axis=1)  # Σ_u W[u, w] t[u]
        else:
            o = W * t  # W[u] t[u]
        acc += tl.where(offs_k[None, None, :] == k, o[:, :, None], 0.0)
    return acc


@triton.jit
def _uvw_dot_tile(
    x1_ptr,
    x2_ptr,
    w_ptr,  # this path's weights W[u, v, w], shared by all rows
    row1,
    row2,
    mask_z,
    stride1,
    stride2,
    cg_i,
    cg_j,
    cg_v,
    k_start,
    off1,
    mul1,
    d1,
    off2,
    mul2,
    d2,
    mul_out,
    d_out,
    BLOCK_Z: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_W: tl.constexpr,
    BLOCK_K: tl.constexpr,
    N_CHUNKS: tl.constexpr,
    U_CHUNK: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """_path_tile of a uvw path with shared weights in float32 as matrix products, for the tf32 and bf16 variants:
    for each k, o[z, w] = Σ_(u,v) t[z, (u, v)] W[(u, v), w] by tl.dot over chunks of U_CHUNK copies u, on tensor
    cores (TF32, or bf16 operands), accumulated in float32."""
    offs_v = tl.arange(0, BLOCK_V)
    offs_w = tl.arange(0, BLOCK_W)
    offs_k = tl.arange(0, BLOCK_K)
    offs_c = tl.arange(0, U_CHUNK)
    offs_uv = tl.arange(0, U_CHUNK * BLOCK_V)  # (u, v) row-major: the order of t's reshape and of W's rows
    uv_u, uv_v = offs_uv // BLOCK_V, offs_uv % BLOCK_V
    x2_base = x2_ptr + row2[:, None] * stride2 + off2 + offs_v[None, :] * d2  # [Z, V]
    x2_mask = mask_z[:, None] & (offs_v < mul2)[None, :]
    acc = tl.zeros([BLOCK_Z, BLOCK_W, BLOCK_K], tl.float32)
    for k in range(d_out):
        o = tl.zeros([BLOCK_Z, BLOCK_W], tl.float32)
        for chunk in tl.static_range(N_CHUNKS):
            u = chunk * U_CHUNK + offs_c
            x1_base = x1_ptr + row1[:, None] * stride1 + off1 + u[None, :] * d1  # [Z, U_CHUNK]
            x1_mask = mask_z[:, None] & (u < mul1)[None, :]
            t = tl.zeros([BLOCK_Z, U_CHUNK, BLOCK_V], tl.float32)
            for e in range(tl.load(k_start + k), tl.load(k_start + k + 1)):
                c = tl.load(cg_v + e)
                a = tl.load(x1_base + tl.load(cg_i + e), mask=x1_mask, other=0.0)
                b = tl.load(x2_base + tl.load(cg_j + e), mask=x2_mask, other=0.0)
                t += c * a[:, :, None] * b[:, None, :]
            rows_uv = chunk * U_CHUNK + uv_u
            w_mask = ((rows_uv < mul1) & (uv_v < mul2))[:, None] & (offs_w < mul_out)[None, :]
            W = tl.load(
                w_ptr + (rows_uv * mul2 + uv_v)[:, None] * mul_out + offs_w[None, :], mask=w_mask, other=0.0
            )  # [U_CHUNK * V, W]
            t = tl.reshape(t, [BLOCK_Z, U_CHUNK * BLOCK_V])
            o = precise_dot(t, W, o, PRECISION)
        acc += tl.where(offs_k[None, None, :] == k, o[:, :, None], 0.0)
    return acc


@triton.jit
def _out_tile(
    out_ptr, rows, mask_z, dim_out, off_out, mul_out, d_out, BLOCK_W: tl.constexpr, BLOCK_K: tl.constexpr
):
    """Pointers to out[rows[z], off_out + w * d_out + k] for _path_tile's [BLOCK_Z, BLOCK_W, BLOCK_K] tile, and
    the mask of the real ones (real rows, w < mul_out, k < d_out)."""
    offs_w = tl.arange(0, BLOCK_W)
    offs_k = tl.arange(0, BLOCK_K)
    cols = off_out + offs_w[:, None] * d_out + offs_k[None, :]  # [W, K]
    ptrs = out_ptr + rows[:, None, None] * dim_out + cols[None]
    mask = mask_z[:, None, None] & ((offs_w[:, None] < mul_out) & (offs_k[None, :] < d_out))[None]
    return ptrs, mask


@triton.jit
def _tensor_product_kernel(
    x1_ptr,
    x2_ptr,
    w_ptr,
    out_ptr,
    Z,
    stride1,
    stride2,
    stride_w,
    dim_out,
    cg_i,
    cg_j,
    cg_v,
    k_start,
    off1,
    mul1,
    d1,
    off2,
    mul2,
    d2,
    off_out,
    mul_out,
    d_out,
    w_off,
    MODE: tl.constexpr,
    HAS_WEIGHT: tl.constexpr,
    BLOCK_Z: tl.constexpr,
    BLOCK_U: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_W: tl.constexpr,
    BLOCK_K: tl.constexpr,
    DOT: tl.constexpr,
    U_CHUNK: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """One program per block of samples: out[z] += path(x1[z], x2[z], W[z])."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK_Z + tl.arange(0, BLOCK_Z)
    mask_z = rows < Z
    acc = _path_tile(
        x1_ptr,
        x2_ptr,
        w_ptr,
        rows,
        rows,
        rows,
        mask_z,
        stride1,
        stride2,
        stride_w,
        cg_i,
        cg_j,
        cg_v,
        k_start,
        off1,
        mul1,
        d1,
        off2,
        mul2,
        d2,
        mul_out,
        d_out,
        w_off,
        MODE,
        HAS_WEIGHT,
        BLOCK_Z,
        BLOCK_U,
        BLOCK_V,
        BLOCK_W,
        BLOCK_K,
        DOT,
        U_CHUNK,
        PRECISION,
    )
    # The program owns its rows; earlier launches (other paths) may already have written to them.
    ptrs, mask = _out_tile(out_ptr, rows, mask_z, dim_out, off_out, mul_out, d_out, BLOCK_W, BLOCK_K)
    tl.store(ptrs, tl.load(ptrs, mask=mask, other=0.0) + acc, mask=mask)


@triton.jit
def _tp_conv_atomic_kernel(
    x1_ptr,
    x2_ptr,
    w_ptr,
    out_ptr,
    src_ptr,
    dst_ptr,
    E,
    stride1,
    stride2,
    stride_w,
    dim_out,
    cg_i,
    cg_j,
    cg_v,
    k_start,
    off1,
    mul1,
    d1,
    off2,
    mul2,
    d2,
    off_out,
    mul_out,
    d_out,
    w_off,
    MODE: tl.constexpr,
    HAS_WEIGHT: tl.constexpr,
    BLOCK_Z: tl.constexpr,
    BLOCK_U: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_W: tl.constexpr,
    BLOCK_K: tl.constexpr,
    DOT: tl.constexpr,
    U_CHUNK: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """One program per block of edges: out[dst[e]] += path(node_feats[src[e]], edge_attrs[e], W[e])."""
    edges = tl.program_id(0).to(tl.int64) * BLOCK_Z + tl.arange(0, BLOCK_Z)
    mask_z = edges < E
    src = tl.load(src_ptr + edges, mask=mask_z, other=0)
    dst = tl.load(dst_ptr + edges, mask=mask_z, other=0)
    acc = _path_tile(
        x1_ptr,
        x2_ptr,
        w_ptr,
        src,
        edges,
        edges,
        mask_z,
        stride1,
        stride2,
        stride_w,
        cg_i,
        cg_j,
        cg_v,
        k_start,
        off1,
        mul1,
        d1,
        off2,
        mul2,
        d2,
        mul_out,
        d_out,
        w_off,
        MODE,
        HAS_WEIGHT,
        BLOCK_Z,
        BLOCK_U,
        BLOCK_V,
        BLOCK_W,
        BLOCK_K,
        DOT,
        U_CHUNK,
        PRECISION,
    )
    ptrs, mask = _out_tile(out_ptr, dst, mask_z, dim_out, off_out, mul_out, d_out, BLOCK_W, BLOCK_K)
    tl.atomic_add(ptrs, acc, mask=mask)  # several edges (in this block or others) may share a destination


@triton.jit
def _tp_conv_deterministic_kernel(
    x1_ptr,
    x2_ptr,
    w_ptr,
    out_ptr,
    src_ptr,
    perm_ptr,
    row_ptr,
    stride1,
    stride2,
    stride_w,
    dim_out,
    cg_i,
    cg_j,
    cg_v,
    k_start,
    off1,
    mul1,
    d1,
    off2,
    mul2,
    d2,
    off_out,
    mul_out,
    d_out,
    w_off,
    MODE: tl.constexpr,
    HAS_WEIGHT: tl.constexpr,
    BLOCK_Z: tl.constexpr,
    BLOCK_U: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_W: tl.constexpr,
    BLOCK_K: tl.constexpr,
    DOT: tl.constexpr,
    U_CHUNK: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """One program per node n: out[n] += Σ of path(...) over its edges perm[row_ptr[n] : row_ptr[n + 1]]."""
    node = tl.program_id(0).to(tl.int64)
    start = tl.load(row_ptr + node)
    stop = tl.load(row_ptr + node + 1)
    total = tl.zeros([BLOCK_W, BLOCK_K], x1_ptr.dtype.element_ty)
    # Chunks of BLOCK_Z edges in destination-sorted order, each summed by a fixed-shape reduction: the
    # same additions in the same order on every run.
    for chunk in range(start, stop, BLOCK_Z):
        slots = chunk + tl.arange(0, BLOCK_Z)
        mask_z = slots < stop
        edges = tl.load(perm_ptr + slots, mask=mask_z, other=0)
        src = tl.load(src_ptr + edges, mask=mask_z, other=0)
        acc = _path_tile(
            x1_ptr,
            x2_ptr,
            w_ptr,
            src,
            edges,
            edges,
            mask_z,
            stride1,
            stride2,
            stride_w,
            cg_i,
            cg_j,
            cg_v,
            k_start,
            off1,
            mul1,
            d1,
            off2,
            mul2,
            d2,
            mul_out,
            d_out,
            w_off,
            MODE,
            HAS_WEIGHT,
            BLOCK_Z,
            BLOCK_U,
            BLOCK_V,
            BLOCK_W,
            BLOCK_K,
            DOT,
            U_CHUNK,
            PRECISION,
        )
        total += tl.sum(acc, axis=0)  # masked edges contribute exact zeros
    offs_w = tl.arange(0, BLOCK_W)
    offs_k = tl.arange(0, BLOCK_K)
    ptrs = out_ptr + node * dim_out + off_out + offs_w[:, None] * d_out + offs_k[None, :]
    mask = (offs_w[:, None] < mul_out) & (offs_k[None, :] < d_out)
    tl.store(ptrs, tl.load(ptrs, mask=mask, other=0.0) + total, mask=mask)


# ------------------------------------------------------------------------------------------------- host code


def _prepare(paths, cg_index, cg_value, cg_offsets, dtype):
    """The paths as Python ints, and the CG entries regrouped by (path, k) for the kernels.

    Returns (rows, cg_i, cg_j, cg_v, k_start, k_stride): path p's entries of component k are
    k_start[p * k_stride + k] : k_start[p * k_stride + k + 1] of cg_i / cg_j / cg_v.
    """
    rows = paths.tolist()  # P × 12 ints (a host sync on GPU; the descriptor is tiny)
    for row in rows:
        if not 0 <= row[0] < len(MODE_NAMES):
            raise NotImplementedError(f"tensor product (triton): unknown path mode code {row[0]}")
    device = cg_value.device
    k_stride = max([row[9] for row in rows], default=1)
    counts = (cg_offsets[1:] - cg_offsets[:-1]).to(device)
    path_of_entry = torch.repeat_interleave(torch.arange(len(rows), device=device), counts)
    key = path_of_entry * k_stride + cg_index[:, 2].to(device)
    order = torch.argsort(key, stable=True)
    per_key = torch.bincount(key, minlength=len(rows) * k_stride)
    k_start = torch.cat([per_key.new_zeros(1), per_key.cumsum(0)])
    cg_index = cg_index.to(device)[order]
    cg_i, cg_j = cg_index[:, 0].contiguous(), cg_index[:, 1].contiguous()
    return rows, cg_i, cg_j, cg_value[order].to(dtype).contiguous(), k_start, k_stride


_PLANS = TensorMemo()


def _plan(paths, cg_index, cg_value, cg_offsets, dtype):
    """_prepare's result, built on the first call with this descriptor, dtype and device and reused while its
    four tensors are the same objects, unmodified (the host sync and the argsort stay off the hot path)."""
    return _PLANS.get(
        (paths, cg_index, cg_value, cg_offsets),
        lambda: _prepare(paths, cg_index, cg_value, cg_offsets, dtype),
        key=(dtype, cg_value.device),
    )


def _blocks(row, max_rows: int, precision: str = "fp32", shared: bool = False) -> dict:
    """Constexprs of one path's launch: power-of-two blocks (BLOCK_Z shrinks so that the largest tile stays under
    MAX_TILE) and, for a weighted uvw path with shared weights in the tf32 / bf16 variants, the tl.dot tiling
    (_dot_blocks) where its blocks are big enough for tensor cores."""
    mode, mul1, mul2, mul_out, d_out, has_weight = row[0], row[2], row[5], row[8], row[9], row[11]
    BU, BV, BW = (triton.next_power_of_2(m) for m in (mul1, mul2, mul_out))
    BK = triton.next_power_of_2(d_out)
    if precision != "fp32" and MODE_NAMES[mode] == "uvw" and shared and has_weight:
        dot = _dot_blocks(BU, BV, BW, BK, max_rows, precision)
        if dot is not None:
            return dot
    tile = {"uvw": BU * BV * BW, "uvu": BU * BV, "uvv": BU * BV, "uuw": BU * BW, "uuu": BU}[MODE_NAMES[mode]]
    BZ = _rows(max(tile, BW * BK), max_rows)  # the [rows, W, K] accumulator counts too
    blocks = {"BLOCK_Z": BZ, "BLOCK_U": BU, "BLOCK_V": BV, "BLOCK_W": BW, "BLOCK_K": BK}
    return {**blocks, "DOT": False, "U_CHUNK": 1, "PRECISION": "ieee"}


def _rows(tile: int, max_rows: int) -> int:
    """Rows per program: a power of two, at most max_rows, with rows × tile ≤ MAX_TILE (at least 1)."""
    rows = max(1, min(max_rows, MAX_TILE // tile))
    return 1 << (rows.bit_length() - 1)


def _dot_blocks(BU, BV, BW, BK, max_rows, precision):
    """_uvw_dot_tile's blocks: chunks of U_CHUNK copies u so that a product's depth U_CHUNK·V is about DOT_DEPTH;
    None where a dimension of the product would be under 16 (tl.dot's minimum) or the weight tile over
    DOT_WEIGHT_TILE elements (then the path runs the plain float32 tile)."""
    u_chunk = min(BU, max(1, DOT_DEPTH // BV))
    depth = u_chunk * BV
    BZ = _rows(max(depth, BW * BK), max_rows)
    if min(depth, BW, BZ) < 16 or depth * BW > DOT_WEIGHT_TILE:
        return None
    blocks = {"BLOCK_Z": BZ, "BLOCK_U": BU, "BLOCK_V": BV, "BLOCK_W": BW, "BLOCK_K": BK}
    return {**blocks, "DOT": True, "U_CHUNK": u_chunk, "PRECISION": precision}


def launch_options(dtype, *, deterministic: bool, dot: bool = False) -> dict:
    """Launch options (num_warps, maxnreg) of the tp_conv kernels per variant and dtype.

    Chosen with ``fastflow bench gpu-static`` (spills per target, NequIP l<=1 / l<=3 uvu and fc-8 uvw paths):
    without them ptxas caps some variants below what they need for occupancy and spills 12-32 B. The
    deterministic kernel gets maxnreg=255 (fp64 uvu paths were capped at 168 registers on sm_89 / sm_90a and
    spilled 12 / 32 B, fp64 d1x1x1 12 B at 72 registers on sm_80, fc-8 fp32 d1x1x1 24 B on sm_80; none with
    it). The atomic kernel in float64 runs 8 warps (fc-8 uvw d1x3x3 / d3x1x3 spilled 16-32 B at 168 registers
    with 4; maxnreg=255 instead made the uvu d?x?x1 paths spill 16 B on sm_90a). The atomic kernel's tl.dot
    paths (tf32 / bf16) run 8 warps with maxnreg=255 (with 4 warps: nequip-sc tf32 d3x1x3 spilled 32-48 B at 168
    registers on sm_89 / sm_90a, fc-16 d1x3x3 24-40 B at 255 on sm_89), and the float32 atomic kernel takes maxnreg=255 (nequip-sc d5x1x5, a [1, 32, 4, 32] tile per row, spilled 16 B at 168
    registers on sm_89; none of the 111 float32 atomic rows spill with it).
    """
    if deterministic:
        return {"maxnreg": 255}
    if dot:
        return {"num_warps": 8, "maxnreg": 255}
    if dtype == torch.float64:
        return {"num_warps": 8}
    return {"maxnreg": 255}


def _check(x1, x2, weights, n_rows):
    dtype = x1.dtype
    if dtype not in (torch.float32, torch.float64):
        raise TypeError(f"tensor product (triton): tensors must be float32 or float64, got {dtype}")
    if x2.dtype != dtype or (weights.numel() and weights.dtype != dtype):
        raise TypeError("tensor product (triton): x1, x2 and weights must share a dtype")
    if weights.dim() not in (1, 2) or (weights.dim() == 2 and weights.size(0) != n_rows):
        raise ValueError(
            f"tensor product (triton): weights must be [n_weights] or [{n_rows}, n_weights], "
            f"got {tuple(weights.shape)}"
        )


def _operands(x1, x2, weights):
    """Contiguous operands, the weights' row stride (0 when shared) and a valid pointer when they're empty."""
    x1, x2, weights = x1.contiguous(), x2.contiguous(), weights.contiguous()
    stride_w = weights.size(1) if weights.dim() == 2 else 0
    if weights.numel() == 0:
        weights = x1  # no path has weights: never read
    return x1, x2, weights, stride_w


def _path_args(row, cg, p):
    """Kernel arguments of path p: CG tensors, scalars and constexprs."""
    cg_i, cg_j, cg_v, k_start, k_stride = cg
    mode, off1, mul1, d1, off2, mul2, d2, off_out, mul_out, d_out, w_off, has_weight = row
    args = (
        cg_i,
        cg_j,
        cg_v,
        k_start[p * k_stride :],
        off1,
        mul1,
        d1,
        off2,
        mul2,
        d2,
        off_out,
        mul_out,
        d_out,
        w_off,
    )
    return args, {"MODE": mode, "HAS_WEIGHT": bool(has_weight)}


def tensor_product(
    x1, x2, weights, paths, cg_index, cg_value, cg_offsets, dim_out: int, precision: str = "fp32"
):
    """out [Z, dim_out] = Σ over paths of the path's product of x1 [Z, dim1], x2 [Z, dim2] (forward only).
    precision: "fp32", or "tf32" / "bf16" for the matrix products of shared-weight uvw paths (float32 tensors;
    checked by fastflow.ops.tensor_product)."""
    Z = x1.size(0)
    _check(x1, x2, weights, Z)
    out = torch.zeros((Z, dim_out), dtype=x1.dtype, device=x1.device)
    if Z == 0 or paths.size(0) == 0:
        return out
    x1, x2, weights, stride_w = _operands(x1, x2, weights)
    rows, *cg = _plan(paths, cg_index, cg_value, cg_offsets, x1.dtype)
    for p, row in enumerate(rows):
        args, consts = _path_args(row, cg, p)
        blocks = _blocks(row, MAX_ROWS, precision, shared=stride_w == 0)
        grid = (triton.cdiv(Z, blocks["BLOCK_Z"]),)
        _tensor_product_kernel[grid](
            x1, x2, weights, out, Z, x1.size(1), x2.size(1), stride_w, dim_out, *args, **consts, **blocks
        )
    return out


def tp_conv(
    node_feats,
    edge_attrs,
    weights,
    edge_src,
    edge_dst,
    n_nodes: int,
    paths,
    cg_index,
    cg_value,
    cg_offsets,
    dim_out: int,
    *,
    deterministic: bool = False,
    precision: str = "fp32",
):
    """out [n_nodes, dim_out] = Σ_{e: edge_dst[e] = n} tensor_product(node_feats[edge_src[e]], edge_attrs[e],
    weights[e]) without the [E, dim_out] messages (forward only). deterministic: see the module docstring;
    precision: as tensor_product's."""
    E = edge_attrs.size(0)
    _check(node_feats, edge_attrs, weights, E)
    out = torch.zeros((n_nodes, dim_out), dtype=node_feats.dtype, device=node_feats.device)
    if E == 0 or n_nodes == 0 or paths.size(0) == 0:
        return out
    x1, x2, weights, stride_w = _operands(node_feats, edge_attrs, weights)
    src = edge_src.to(torch.int64).contiguous()
    dst = edge_dst.to(torch.int64).contiguous()
    rows, *cg = _plan(paths, cg_index, cg_value, cg_offsets, x1.dtype)
    if deterministic:
        perm = torch.argsort(dst, stable=True)  # edges by destination, ties in input order
        row_ptr = torch.cat([dst.new_zeros(1), torch.bincount(dst, minlength=n_nodes).cumsum(0)])
    for p, row in enumerate(rows):
        args, consts = _path_args(row, cg, p)
        common = (x1.size(1), x2.size(1), stride_w, dim_out, *args)
        if deterministic:
            blocks = _blocks(row, DETERMINISTIC_CHUNK, precision, shared=stride_w == 0)
            options = launch_options(x1.dtype, deterministic=True, dot=blocks["DOT"])
            _tp_conv_deterministic_kernel[(n_nodes,)](
                x1, x2, weights, out, src, perm, row_ptr, *common, **consts, **blocks, **options
            )
        else:
            blocks = _blocks(row, MAX_ROWS, precision, shared=stride_w == 0)
            options = launch_options(x1.dtype, deterministic=False, dot=blocks["DOT"])
            grid = (triton.cdiv(E, blocks["BLOCK_Z"]),)
            _tp_conv_atomic_kernel[grid](
                x1, x2, weights, out, src, dst, E, *common, **consts, **blocks, **options
            )
    return out
