"""Triton kernel of fastflow::semla_attention: pair messages, node attention and coordinate attention, fused.

Program layout. One program per (molecule b, block of BLOCK_I rows i); it walks j in tiles of BLOCK_J and treats
the BLOCK_I x BLOCK_J pairs of a tile, flattened j-major (pair m = (i0 + m % BLOCK_I, j0 + m // BLOCK_I)), as the
M rows or columns of its matrix products: hidden = a_i + c_j + G_ij Wg^T [+ LN(e_ij) We^T] ([M, F]) and the
logits z = silu(hidden) W2^T + b2. The former layout, one program per row i (M = 16 j), re-read every weight per
row and spilled 10-40 KB per thread at the semlaflow preset with 115 KB of shared memory; the dots here are wide
enough for tensor cores (mma on sm_80/89, wgmma on sm_90) in the tf32 and bf16 variants and every weight tile
read serves a whole tile of pairs. Sizes, warps and stages per dtype and precision: :func:`launch_config`.

What keeps the live registers small (ptxas spills, read with ``fastflow bench gpu-static``):
- F is walked in chunks of BLOCK_FC columns: each chunk's hidden -> SiLU -> its share of the logits goes into
  the logit accumulators, so no [M, F] hidden tile exists (F = 224 in the last semlaflow layer), and the
  chunk's weight tiles are loaded in the loop (L1/L2 hits after the first tile of j), never pinned.
- The K dimensions of the hidden layer's products are walked in chunks too: S in chunks of BLOCK_SC (the Gram
  entries of a chunk rebuilt from X_s,i [BLOCK_I, BLOCK_SC] and X_s,j [BLOCK_J, BLOCK_SC] for every chunk of F;
  a load per pair costs a 64-bit address per element) and the edge features in chunks of BLOCK_EC (LayerNorm
  statistics once per tile of j, the normalised chunk rebuilt per chunk of F). A [pairs, S] or [pairs, E] operand
  held across the F loop costs a row of K values per thread in the FMA (ieee) dots' operand layout (128-256
  registers at S = 64, E = 128) and spilled 2-17 KB per thread in the bf16 and edge-input variants; the rebuild
  costs about 3 * S FMAs per pair and chunk of F (under 10% of the hidden-layer product at BLOCK_FC = 16).
- Node logits are z_h [pairs, H] = act · W2_h^T, but the coordinate sets' are computed transposed,
  z_p^T [P, pairs] = W2_p · act^T: with P on the rows of the mma layout the per-(set, row i) softmax state
  (max, Σexp, Σexp², three coordinate sums) takes a few registers per thread, where [pairs, P] would keep P / 4
  columns per thread for each of them. j-major pairs put most of j in registers of that layout, so the sums over
  j are mostly in-thread.
- The coordinate phase takes the tile's j in two halves (j's top bit is a register bit there: the split is
  free), and the value sum Σ_j p_hji v_jh,d goes one channel d at a time: a [H, j, i, d] broadcast, or a batched
  fp32 dot over heads (whose operands are materialised per thread), spills.
The online softmax is the flash-attention one: per (row i, head h) and (row i, set p) a running max m,
s1 = Σ exp(z − m), s2 = Σ exp(2(z − m)) and the weighted sums of values / unit vectors, rescaled whenever m
grows. Only e' = z[H + P:] is written per pair. Math, schema, fake impl and reference:
fastflow/ops/semla_attention.py.

Dot dimensions are padded to powers of two (K >= 16 for bf16 operands; chunks of 8 for S, E, and F in tf32,
float64 and the fp32 last layer) and masked; padded rows and columns load as 0, so they add nothing to the
products. precision "fp32" uses input_precision="ieee" (the GPU default,
TF32, keeps 10 mantissa bits and would miss the fp32 tolerance of the tests); "tf32" runs the hidden layer's and
the output linear's dots in TF32; "bf16" rounds the operands of z = W2 · silu(hidden) to bfloat16 and accumulates
in fp32, as the op's reference defines it. The value and coordinate sums stay in the input dtype everywhere.
"""

import torch
import triton
import triton.language as tl
from fastflow.triton_kernels.dots import dot as precise_dot

MIN_DOT = 16  # padded size of a dot dimension: bf16 needs K >= 16, tensor-core N tiles are 8 or 16 wide


@triton.jit
def _online_softmax_tile(z, in_softmax, m, s1, s2):
    """One tile of j of the online softmax of logits z [K, BLOCK_J, BLOCK_I] (K heads or sets), j masked per row
    i by in_softmax [BLOCK_J, BLOCK_I].

    Returns the new running max [K, BLOCK_I], the factor that rescales everything accumulated so far,
    p = exp(z − max) (0 on masked j), and the updated s1 = Σ p and s2 = Σ p².
    """
    z = tl.where(in_softmax[None, :, :], z, float("-inf"))
    m_new = tl.maximum(m, tl.max(z, axis=1))
    # Until a head or set has seen an unmasked j its max is -inf; shifting by 0 then avoids -inf - -inf = nan.
    shift = tl.where(m_new == float("-inf"), 0.0, m_new)
    rescale = tl.exp(m - shift)
    p = tl.exp(z - shift[:, None, :])
    return m_new, rescale, p, s1 * rescale + tl.sum(p, axis=1), s2 * rescale * rescale + tl.sum(p * p, axis=1)


@triton.jit
def _softmax_columns(adj_rows, offs_j, mask_i, no_edge, N):
    """Which j of offs_j [K] take part in the softmax of each row i: [K, BLOCK_I], its edges, or every real j when
    the row has none."""
    mask_j = offs_j < N
    adj = tl.load(adj_rows + offs_j[:, None], mask=mask_j[:, None] & mask_i[None, :], other=0)
    return mask_j[:, None] & ((adj != 0) | no_edge[None, :])


@triton.jit
def _out_dot(x, y, acc, BF16_OUT: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """acc + x · y for the output linear: bf16 operands with fp32 accumulation, or in the dots' precision."""
    if BF16_OUT:
        return precise_dot(x, y, acc, "bf16")
    return precise_dot(x, y, acc, DOT_PRECISION)


@triton.jit
def _semla_attention_kernel(
    a_ptr,  # node_terms_i [B, N, F] (b1 included)
    c_ptr,  # node_terms_j [B, N, F]
    x_ptr,  # gram_coords [B, S, N, 3]
    wg_ptr,  # gram_weight [F, S]
    w2_ptr,  # out_weight [H + P + EO, F]
    b2_ptr,  # out_bias [H + P + EO]
    v_ptr,  # values [B, N, H, D]
    y_ptr,  # attn_coords [B, P, N, 3]
    adj_ptr,  # adjacency [B, N, N] as uint8
    e_ptr,  # edge_feats [B, N, N, E]; any pointer when not HAS_EDGE_IN
    ln_w_ptr,  # edge_norm_weight [E]
    ln_b_ptr,  # edge_norm_bias [E]
    we_ptr,  # edge_weight [F, E]
    node_out_ptr,  # [B, N, H * D]
    coord_out_ptr,  # [B, N, P, 3]
    edge_out_ptr,  # [B, N, N, EO]; any pointer when not HAS_EDGE_OUT
    N,
    F,
    S,
    H,
    D,
    P,
    E,
    EO,
    edge_norm_eps,
    coord_eps,
    BLOCK_I: tl.constexpr,
    BLOCK_J: tl.constexpr,
    BLOCK_FC: tl.constexpr,  # columns of the hidden layer per chunk
    BLOCK_SC: tl.constexpr,  # coordinate sets per chunk of the Gram product
    BLOCK_H: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_P: tl.constexpr,
    BLOCK_EC: tl.constexpr,  # edge channels per chunk of the edge-input product
    BLOCK_EO: tl.constexpr,
    HAS_EDGE_IN: tl.constexpr,
    HAS_EDGE_OUT: tl.constexpr,
    DOT_PRECISION: tl.constexpr,  # "ieee" or "tf32"
    BF16_OUT: tl.constexpr,  # the output linear in bf16
):
    dtype = a_ptr.dtype.element_ty  # fp32 or fp64: everything is computed in the input dtype
    BLOCK_M: tl.constexpr = BLOCK_I * BLOCK_J
    blocks_i = tl.cdiv(N, BLOCK_I)
    program = tl.program_id(0)
    b = (program // blocks_i).to(tl.int64)  # int64 so that (b * N + i) * N * E cannot overflow
    i0 = (program % blocks_i) * BLOCK_I

    offs_i = i0 + tl.arange(0, BLOCK_I)
    mask_i = offs_i < N
    row_i = b * N + offs_i  # flat atom index of each row i
    # The tile's pairs, j-major: pair m is (i0 + m % BLOCK_I, j0 + m // BLOCK_I).
    offs_m = tl.arange(0, BLOCK_M)
    pair_i = i0 + offs_m % BLOCK_I
    mask_m_i = pair_i < N
    row_m = b * N + pair_i
    offs_h = tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, BLOCK_D)
    offs_p = tl.arange(0, BLOCK_P)
    mask_h = offs_h < H
    mask_d = offs_d < D
    mask_p = offs_p < P

    # Pass 1: which rows have an edge? A row without one takes its softmax over every j, like the reference.
    adj_rows = adj_ptr + row_i[None, :] * N  # [1, BLOCK_I]
    row_edges = tl.zeros([BLOCK_J, BLOCK_I], dtype=tl.int32)
    for j0 in range(0, N, BLOCK_J):
        offs_j = j0 + tl.arange(0, BLOCK_J)
        row_edges += tl.load(
            adj_rows + offs_j[:, None], mask=(offs_j < N)[:, None] & mask_i[None, :], other=0
        ).to(tl.int32)
    no_edge = tl.sum(row_edges, axis=0) == 0  # [BLOCK_I]

    # Y_p,i of the block's rows: [BLOCK_P, BLOCK_I] per axis.
    y_i_base = y_ptr + ((b * P + offs_p[:, None]) * N + offs_i[None, :]) * 3
    y_i_mask = mask_p[:, None] & mask_i[None, :]
    y_i0 = tl.load(y_i_base + 0, mask=y_i_mask, other=0.0)
    y_i1 = tl.load(y_i_base + 1, mask=y_i_mask, other=0.0)
    y_i2 = tl.load(y_i_base + 2, mask=y_i_mask, other=0.0)
    b2_h = tl.load(b2_ptr + offs_h, mask=mask_h, other=0.0)
    b2_p = tl.load(b2_ptr + H + offs_p, mask=mask_p, other=0.0)

    # Online softmax state per (head h, row i) and (set p, row i). Padded heads / sets get logits 0 on real j and
    # finite sums; they are never stored.
    m_h = tl.full([BLOCK_H, BLOCK_I], float("-inf"), dtype)
    s1_h = tl.zeros([BLOCK_H, BLOCK_I], dtype)
    s2_h = tl.zeros([BLOCK_H, BLOCK_I], dtype)
    acc_h = tl.zeros([BLOCK_H, BLOCK_I, BLOCK_D], dtype)
    m_p = tl.full([BLOCK_P, BLOCK_I], float("-inf"), dtype)
    s1_p = tl.zeros([BLOCK_P, BLOCK_I], dtype)
    s2_p = tl.zeros([BLOCK_P, BLOCK_I], dtype)
    acc_p0 = tl.zeros([BLOCK_P, BLOCK_I], dtype)
    acc_p1 = tl.zeros([BLOCK_P, BLOCK_I], dtype)
    acc_p2 = tl.zeros([BLOCK_P, BLOCK_I], dtype)

    for j0 in range(0, N, BLOCK_J):
        offs_j = j0 + tl.arange(0, BLOCK_J)
        mask_j = offs_j < N
        pair_j = j0 + offs_m // BLOCK_I
        mask_m_j = pair_j < N
        mask_m = mask_m_i & mask_m_j

        if HAS_EDGE_IN:
            # LayerNorm statistics of the tile's pairs over the E real channels (biased variance, as
            # F.layer_norm), two passes over chunks of E; the normalised features are rebuilt per chunk below.
            e_base = e_ptr + (row_m[:, None] * N + pair_j[:, None]) * E  # [BLOCK_M, 1]
            total = tl.zeros([BLOCK_M], dtype)
            for e0 in range(0, E, BLOCK_EC):
                offs_e = e0 + tl.arange(0, BLOCK_EC)
                total += tl.sum(
                    tl.load(
                        e_base + offs_e[None, :], mask=mask_m[:, None] & (offs_e < E)[None, :], other=0.0
                    ),
                    axis=1,
                )
            mean = total / E
            total = tl.zeros([BLOCK_M], dtype)
            for e0 in range(0, E, BLOCK_EC):
                offs_e = e0 + tl.arange(0, BLOCK_EC)
                e_mask = mask_m[:, None] & (offs_e < E)[None, :]
                centred = tl.where(
                    e_mask, tl.load(e_base + offs_e[None, :], mask=e_mask, other=0.0) - mean[:, None], 0.0
                )
                total += tl.sum(centred * centred, axis=1)
            rstd = 1.0 / tl.sqrt(total / E + edge_norm_eps)

        # Logits: z_h [pairs, heads] and z_e [pairs, E_out] as act · W^T, the coordinate sets' transposed,
        # z_p^T [sets, pairs] = W · act^T (see the module docstring).
        z_h = tl.zeros([BLOCK_M, BLOCK_H], dtype)
        z_p = tl.zeros([BLOCK_P, BLOCK_M], dtype)
        if HAS_EDGE_OUT:
            offs_eo = tl.arange(0, BLOCK_EO)
            mask_eo = offs_eo < EO
            z_e = tl.zeros([BLOCK_M, BLOCK_EO], dtype)
        for f0 in range(0, F, BLOCK_FC):
            offs_f = f0 + tl.arange(0, BLOCK_FC)
            mask_f = offs_f < F
            # hidden chunk = a_i + c_j + G Wg^T [+ LN(e_ij) We^T]: [BLOCK_M, BLOCK_FC]
            a_i = tl.load(
                a_ptr + row_i[:, None] * F + offs_f[None, :],
                mask=mask_i[:, None] & mask_f[None, :],
                other=0.0,
            )
            c_j = tl.load(
                c_ptr + (b * N + offs_j[:, None]) * F + offs_f[None, :],
                mask=mask_j[:, None] & mask_f[None, :],
                other=0.0,
            )
            hidden = tl.reshape(c_j[:, None, :] + a_i[None, :, :], [BLOCK_M, BLOCK_FC])
            # + G Wg^T, S in chunks of BLOCK_SC: the Gram entries G[m, s] = <X_s,i, X_s,j> of the chunk are
            # rebuilt here from X_s,j [BLOCK_J, BLOCK_SC] and X_s,i [BLOCK_I, BLOCK_SC] (a load per pair would cost
            # a 64-bit address each), so no [pairs, S] tile stays live across the chunks of F.
            for s0 in range(0, S, BLOCK_SC):
                offs_s = s0 + tl.arange(0, BLOCK_SC)
                mask_s = offs_s < S
                x_j_base = x_ptr + ((b * S + offs_s[None, :]) * N + offs_j[:, None]) * 3
                x_j_mask = mask_j[:, None] & mask_s[None, :]
                x_i_base = x_ptr + ((b * S + offs_s[None, :]) * N + offs_i[:, None]) * 3
                x_i_mask = mask_i[:, None] & mask_s[None, :]
                gram = tl.zeros([BLOCK_J, BLOCK_I, BLOCK_SC], dtype)
                for k in tl.static_range(3):
                    x_i = tl.load(x_i_base + k, mask=x_i_mask, other=0.0)
                    gram += tl.load(x_j_base + k, mask=x_j_mask, other=0.0)[:, None, :] * x_i[None, :, :]
                wg_t = tl.load(
                    wg_ptr + offs_f[None, :] * S + offs_s[:, None],
                    mask=mask_s[:, None] & mask_f[None, :],
                    other=0.0,
                )  # Wg^T chunk [BLOCK_SC, BLOCK_FC]
                hidden = tl.dot(
                    tl.reshape(gram, [BLOCK_M, BLOCK_SC]), wg_t, hidden, input_precision=DOT_PRECISION
                )
            if HAS_EDGE_IN:
                # + LN(e_ij) We^T, E in chunks of BLOCK_EC
                for e0 in range(0, E, BLOCK_EC):
                    offs_e = e0 + tl.arange(0, BLOCK_EC)
                    mask_e = offs_e < E
                    e_mask = mask_m[:, None] & mask_e[None, :]
                    feats = tl.load(e_base + offs_e[None, :], mask=e_mask, other=0.0)
                    ln_w = tl.load(ln_w_ptr + offs_e, mask=mask_e, other=0.0)
                    ln_b = tl.load(ln_b_ptr + offs_e, mask=mask_e, other=0.0)
                    normed = (feats - mean[:, None]) * rstd[:, None] * ln_w[None, :] + ln_b[None, :]
                    normed = tl.where(e_mask, normed, 0.0)
                    we_t = tl.load(
                        we_ptr + offs_f[None, :] * E + offs_e[:, None],
                        mask=mask_e[:, None] & mask_f[None, :],
                        other=0.0,
                    )  # We^T chunk [BLOCK_EC, BLOCK_FC]
                    hidden = tl.dot(normed, we_t, hidden, input_precision=DOT_PRECISION)
            # SiLU; exp(-h) overflowing to inf for very negative h gives h / inf = -0, the right limit.
            act = hidden / (1.0 + tl.exp(-hidden))
            w2_h_t = tl.load(
                w2_ptr + offs_h[None, :] * F + offs_f[:, None],
                mask=mask_f[:, None] & mask_h[None, :],
                other=0.0,
            )  # W2[:H]^T chunk [BLOCK_FC, BLOCK_H]
            z_h = _out_dot(act, w2_h_t, z_h, BF16_OUT, DOT_PRECISION)
            w2_p = tl.load(
                w2_ptr + (H + offs_p[:, None]) * F + offs_f[None, :],
                mask=mask_p[:, None] & mask_f[None, :],
                other=0.0,
            )  # W2[H:H+P] chunk [BLOCK_P, BLOCK_FC]
            z_p = _out_dot(w2_p, tl.trans(act), z_p, BF16_OUT, DOT_PRECISION)
            if HAS_EDGE_OUT:
                w2_e_t = tl.load(
                    w2_ptr + (H + P + offs_eo[None, :]) * F + offs_f[:, None],
                    mask=mask_f[:, None] & mask_eo[None, :],
                    other=0.0,
                )  # W2[H+P:]^T chunk [BLOCK_FC, BLOCK_EO]
                z_e = _out_dot(act, w2_e_t, z_e, BF16_OUT, DOT_PRECISION)

        if HAS_EDGE_OUT:
            b2_e = tl.load(b2_ptr + H + P + offs_eo, mask=mask_eo, other=0.0)
            tl.store(
                edge_out_ptr + (row_m[:, None] * N + pair_j[:, None]) * EO + offs_eo[None, :],
                z_e + b2_e[None, :],
                mask=mask_m[:, None] & mask_eo[None, :],
            )

        in_softmax = _softmax_columns(adj_rows, offs_j, mask_i, no_edge, N)  # [BLOCK_J, BLOCK_I]

        # Node attention, all heads at once: logits [BLOCK_H, BLOCK_J, BLOCK_I] (a view of z_h).
        z3 = tl.permute(tl.reshape(z_h + b2_h[None, :], [BLOCK_J, BLOCK_I, BLOCK_H]), (2, 0, 1))
        m_h, rescale, p, s1_h, s2_h = _online_softmax_tile(z3, in_softmax, m_h, s1_h, s2_h)
        # Σ_j p_hji v_jh,d one channel d at a time: the whole sum would be a [BLOCK_H, BLOCK_J, BLOCK_I, BLOCK_D]
        # tile, and a batched fp32 dot over heads materialises its operands per thread (both spill).
        acc_h = acc_h * rescale[:, :, None]
        v_base = v_ptr + ((b * N + offs_j[None, :]) * H + offs_h[:, None]) * D  # [BLOCK_H, BLOCK_J]
        v_mask = mask_h[:, None] & mask_j[None, :]
        for d in range(D):
            v_d = tl.load(v_base + d, mask=v_mask, other=0.0)
            acc_h += tl.where(
                offs_d[None, None, :] == d, tl.sum(p * v_d[:, :, None], axis=1)[:, :, None], 0.0
            )

        # Coordinate attention, all sets at once: logits [BLOCK_P, BLOCK_J, BLOCK_I], taken in two halves of j
        # (j's top bit is a register bit of z_p's layout, so the split is free): the probabilities, lengths and
        # differences of one half at a time are what fits in the registers.
        z_lo, z_hi = tl.split(
            tl.permute(tl.reshape(z_p + b2_p[:, None], [BLOCK_P, 2, BLOCK_J // 2, BLOCK_I]), (0, 2, 3, 1))
        )
        offs_lo = j0 + tl.arange(0, BLOCK_J // 2)
        offs_hi = offs_lo + BLOCK_J // 2
        z_lo = tl.where(
            _softmax_columns(adj_rows, offs_lo, mask_i, no_edge, N)[None, :, :], z_lo, float("-inf")
        )
        z_hi = tl.where(
            _softmax_columns(adj_rows, offs_hi, mask_i, no_edge, N)[None, :, :], z_hi, float("-inf")
        )
        m_new = tl.maximum(m_p, tl.maximum(tl.max(z_lo, axis=1), tl.max(z_hi, axis=1)))
        shift = tl.where(m_new == float("-inf"), 0.0, m_new)  # see _online_softmax_tile
        rescale = tl.exp(m_p - shift)
        m_p = m_new
        s1_p *= rescale
        s2_p *= rescale * rescale
        acc_p0 *= rescale
        acc_p1 *= rescale
        acc_p2 *= rescale
        for half in tl.static_range(2):
            if half == 0:
                p = tl.exp(z_lo - shift[:, None, :])
                offs_jh = offs_lo
            else:
                p = tl.exp(z_hi - shift[:, None, :])
                offs_jh = offs_hi
            s1_p += tl.sum(p, axis=1)
            s2_p += tl.sum(p * p, axis=1)
            # Unit vectors (Y_p,i − Y_p,j) / (‖·‖ + eps): the length first, then one axis at a time (the
            # differences are re-read: three [BLOCK_P, BLOCK_J // 2, BLOCK_I] tiles at once crowd the registers).
            y_j_base = (
                y_ptr + ((b * P + offs_p[:, None]) * N + offs_jh[None, :]) * 3
            )  # [BLOCK_P, BLOCK_J // 2]
            y_j_mask = mask_p[:, None] & (offs_jh < N)[None, :]
            diff = y_i0[:, None, :] - tl.load(y_j_base + 0, mask=y_j_mask, other=0.0)[:, :, None]
            square = diff * diff
            diff = y_i1[:, None, :] - tl.load(y_j_base + 1, mask=y_j_mask, other=0.0)[:, :, None]
            square += diff * diff
            diff = y_i2[:, None, :] - tl.load(y_j_base + 2, mask=y_j_mask, other=0.0)[:, :, None]
            square += diff * diff
            weight = p / (tl.sqrt(square) + coord_eps)
            # other=1.0: not the loads above (which would stay live until here), the same values where used
            diff = y_i0[:, None, :] - tl.load(y_j_base + 0, mask=y_j_mask, other=1.0)[:, :, None]
            acc_p0 += tl.sum(weight * diff, axis=1)
            diff = y_i1[:, None, :] - tl.load(y_j_base + 1, mask=y_j_mask, other=1.0)[:, :, None]
            acc_p1 += tl.sum(weight * diff, axis=1)
            diff = y_i2[:, None, :] - tl.load(y_j_base + 2, mask=y_j_mask, other=1.0)[:, :, None]
            acc_p2 += tl.sum(weight * diff, axis=1)

    # Σ_j α_j x_j · sqrt(Σ_j α_j²) with α = p / s1 is acc / s1 · sqrt(s2) / s1. Every row has at least one
    # softmax j, so s1 > 0.
    scale_h = tl.sqrt(s2_h) / (s1_h * s1_h)
    tl.store(
        node_out_ptr + row_i[None, :, None] * H * D + offs_h[:, None, None] * D + offs_d[None, None, :],
        acc_h * scale_h[:, :, None],
        mask=mask_h[:, None, None] & mask_i[None, :, None] & mask_d[None, None, :],
    )
    scale_p = tl.sqrt(s2_p) / (s1_p * s1_p)
    coord_out = coord_out_ptr + (row_i[None, :] * P + offs_p[:, None]) * 3
    tl.store(coord_out + 0, acc_p0 * scale_p, mask=y_i_mask)
    tl.store(coord_out + 1, acc_p1 * scale_p, mask=y_i_mask)
    tl.store(coord_out + 2, acc_p2 * scale_p, mask=y_i_mask)


def _dot_block(size: int) -> int:
    """Padded size of a tl.dot dimension: a power of two, at least MIN_DOT."""
    return max(MIN_DOT, triton.next_power_of_2(size))


def launch_config(F, S, H, D, P, E, EO, dtype, precision) -> dict:
    """Block sizes (constexprs) and launch options of the kernel for one layer's sizes.

    Chosen with ``fastflow bench gpu-static`` (registers and spills per target): 2 rows i x 16 j = 32 pairs per
    tile and 4 warps, F in chunks of 16 columns (8 in TF32, whose K may be 8: smaller transient operand tiles),
    S in chunks of 8 and E in chunks of 8 (32 in bf16: 8 left a few bytes of spills on sm_89 / sm_90a), no
    software pipelining of the chunk loop (its prefetch buffers cost registers, not only shared memory), one
    row i per program in float64 (twice the registers per value). The last layer in fp32 (ieee dots on FMA
    units, which hold a row of K values per thread of every operand) writes e' = [pairs, EO] besides the logits:
    F in chunks of 8 and 8 warps there (4 warps and chunks of 16 spilled 0.7-0.9 KB), and in float64 everywhere
    (1.3-1.8 KB -> under 130 B in the semlaflow core and edge-input layers on sm_80 / sm_90a). float64 also takes
    j tiles of 8 (8 pairs per tile) and S and E in chunks of 4: the semlaflow core / edge-input layers spilled
    36 / 36 B on sm_80 and 96 / 128 B on sm_90a with 16, 8 and 8 (fp64 mma operands on those targets), none
    with 8, 4 and 4 (j tiles of 8 alone left 24 B in edge_in on sm_90a). maxnreg=255: without it
    ptxas caps some variants at 128 registers for occupancy and spills (the small preset's core layer on
    sm_90a: 48 B at 128 registers, none at 198).
    """
    del S, E, H, D, P
    # The last layer's ieee dots, and float64 (twice the registers per value) in every layer
    wide_fma = (EO > 0 and precision == "fp32") or dtype == torch.float64
    chunk = 8 if precision == "tf32" or wide_fma else 16
    fp64 = dtype == torch.float64
    return dict(
        BLOCK_I=1 if fp64 else 2,
        BLOCK_J=8 if fp64 else 16,
        BLOCK_FC=min(chunk, _dot_block(F)),
        BLOCK_SC=4 if fp64 else 8,
        BLOCK_EC=32 if precision == "bf16" else 4 if fp64 else 8,
        num_warps=8 if wide_fma else 4,
        num_stages=1,
        maxnreg=255,
    )


def semla_attention(
    node_terms_i,
    node_terms_j,
    gram_coords,
    gram_weight,
    out_weight,
    out_bias,
    values,
    attn_coords,
    adjacency,
    edge_feats,
    edge_norm_weight,
    edge_norm_bias,
    edge_weight,
    edge_norm_eps: float,
    coord_eps: float,
    precision: str = "fp32",
):
    """Launch on inputs validated by fastflow.ops.semla_attention.check_inputs (shapes, dtype, device)."""
    dtype = node_terms_i.dtype
    if dtype not in (torch.float32, torch.float64):
        raise TypeError(f"semla_attention (triton): tensors must be float32 or float64, got {dtype}")
    B, N, F = node_terms_i.shape
    S, P = gram_coords.size(1), attn_coords.size(1)
    H, D = values.size(2), values.size(3)
    EO = out_weight.size(0) - H - P
    has_edge_in = edge_feats is not None
    E = edge_feats.size(-1) if has_edge_in else 0

    # The kernel indexes flat row-major tensors; these names keep the copies alive during the launch.
    dense = (node_terms_i, node_terms_j, gram_coords, gram_weight, out_weight, out_bias, values, attn_coords)
    a, c, x, wg, w2, b2, v, y = (t.contiguous() for t in dense)
    adj = adjacency.contiguous().view(torch.uint8)  # bool as bytes: a plain integer load in the kernel
    node_agg = torch.empty((B, N, H * D), dtype=dtype, device=a.device)
    coord_agg = torch.empty((B, N, P, 3), dtype=dtype, device=a.device)
    edge_out = torch.empty((B, N, N, EO), dtype=dtype, device=a.device)
    if has_edge_in:
        e, ln_w, ln_b, we = (
            t.contiguous() for t in (edge_feats, edge_norm_weight, edge_norm_bias, edge_weight)
        )
    else:
        e = ln_w = ln_b = we = a  # never read (HAS_EDGE_IN is False): any valid pointer
    edge_out_arg = edge_out if EO > 0 else node_agg  # an empty tensor's pointer may be null; never written

    config = launch_config(F, S, H, D, P, E, EO, dtype, precision)
    _semla_attention_kernel[(B * triton.cdiv(N, config["BLOCK_I"]),)](
        a,
        c,
        x,
        wg,
        w2,
        b2,
        v,
        y,
        adj,
        e,
        ln_w,
        ln_b,
        we,
        node_agg,
        coord_agg,
        edge_out_arg,
        N,
        F,
        S,
        H,
        D,
        P,
        E,
        EO,
        float(edge_norm_eps),
        float(coord_eps),
        BLOCK_H=_dot_block(H),
        BLOCK_D=triton.next_power_of_2(D),  # N of the value dot: no tensor cores there, only a power of two
        BLOCK_P=_dot_block(P),
        BLOCK_EO=_dot_block(max(EO, 1)),
        HAS_EDGE_IN=has_edge_in,
        HAS_EDGE_OUT=EO > 0,
        DOT_PRECISION="tf32" if precision == "tf32" else "ieee",
        BF16_OUT=precision == "bf16",
        **config,
    )
    return node_agg, coord_agg, edge_out
