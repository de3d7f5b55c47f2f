"""Triton kernel of fastflow::semla_attention: pair messages, node attention and coordinate attention, fused.

One program per row (b, i). It walks j in tiles of BLOCK_J, builds the message MLP's hidden layer for the
pairs (i, j) of the tile, and keeps, per head h and per coordinate set p, a flash-attention style online
softmax: running max m, s1 = Σ exp(z − m), s2 = Σ exp(2(z − m)) and the weighted sums of values / unit
vectors, rescaled whenever m grows. Only e' = z[H + P:] is written per pair. Math, schema, fake impl and
reference: fastflow/ops/semla_attention.py.

Every tl.dot dimension is padded to a power of two >= 16 (tl.dot's minimum) and masked; padded rows and
columns load as 0, so they add nothing to the products. precision "fp32" uses input_precision="ieee" (the GPU
default, TF32, keeps 10 mantissa bits and would miss the fp32 tolerance of the tests); "tf32" runs every dot in
TF32; "bf16" rounds the operands of z = W2 · silu(hidden) to bfloat16 and accumulates in fp32, as the op's
reference defines it.
"""

import torch
import triton
import triton.language as tl

MIN_DOT = 16  # smallest size of every tl.dot dimension


@triton.jit
def _online_softmax_tile(z, in_softmax, m, s1, s2):
    """One tile of j of the online softmax of logits z [BLOCK_J, K] (K heads or sets), j masked by in_softmax.

    Returns the new running max, the factor that rescales everything accumulated so far, p = exp(z − max) (0 on
    masked j), and the updated s1 = Σ p and s2 = Σ p².
    """
    z = tl.where(in_softmax[:, None], z, float("-inf"))
    m_new = tl.maximum(m, tl.max(z, axis=0))
    # Until a head or set has seen an unmasked j its max is -inf; shifting by 0 then avoids -inf - -inf = nan.
    shift = tl.where(m_new == float("-inf"), 0.0, m_new)
    rescale = tl.exp(m - shift)
    p = tl.exp(z - shift[None, :])
    return m_new, rescale, p, s1 * rescale + tl.sum(p, axis=0), s2 * rescale * rescale + tl.sum(p * p, axis=0)


@triton.jit
def _out_dot(act, w_t, BF16_OUT: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """act · w_t for the output linear: bf16 operands with fp32 accumulation, or in the dots' precision."""
    if BF16_OUT:
        return tl.dot(act.to(tl.bfloat16), w_t.to(tl.bfloat16), out_dtype=tl.float32)
    return tl.dot(act, w_t, input_precision=DOT_PRECISION)


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
    BLOCK_J: tl.constexpr,
    BLOCK_F: tl.constexpr,
    BLOCK_S: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_P: tl.constexpr,
    BLOCK_E: tl.constexpr,
    BLOCK_EO: tl.constexpr,
    HAS_EDGE_IN: tl.constexpr,
    HAS_EDGE_OUT: tl.constexpr,
    DOT_PRECISION: tl.constexpr,  # "ieee" or "tf32"
    BF16_OUT: tl.constexpr,  # the output linear in bf16
):
    dtype = a_ptr.dtype.element_ty  # fp32 or fp64: everything is computed in the input dtype
    row = tl.program_id(0).to(tl.int64)  # b * N + i; int64 so that row * N * E cannot overflow
    b = row // N
    i = row % N

    offs_f = tl.arange(0, BLOCK_F)
    offs_s = tl.arange(0, BLOCK_S)
    offs_h = tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, BLOCK_D)
    offs_p = tl.arange(0, BLOCK_P)
    mask_f = offs_f < F
    mask_s = offs_s < S
    mask_h = offs_h < H
    mask_d = offs_d < D
    mask_p = offs_p < P

    # Pass 1: does row i have an edge? If not, its softmax runs over every j, like the reference's mask.
    adj_row = adj_ptr + row * N
    row_edges = tl.zeros([BLOCK_J], dtype=tl.int32)
    for j0 in range(0, N, BLOCK_J):
        offs_j = j0 + tl.arange(0, BLOCK_J)
        row_edges += tl.load(adj_row + offs_j, mask=offs_j < N, other=0).to(tl.int32)
    no_edge = tl.sum(row_edges, axis=0) == 0

    # Per-row operands: a_i and Y_p,i read once; X_s,i re-read per tile (three cached [BLOCK_S] loads).
    a_i = tl.load(a_ptr + row * F + offs_f, mask=mask_f, other=0.0)
    x_i_base = x_ptr + ((b * S + offs_s) * N + i) * 3  # [BLOCK_S]
    y_i_base = y_ptr + ((b * P + offs_p) * N + i) * 3  # [BLOCK_P]
    y_i0 = tl.load(y_i_base + 0, mask=mask_p, other=0.0)
    y_i1 = tl.load(y_i_base + 1, mask=mask_p, other=0.0)
    y_i2 = tl.load(y_i_base + 2, mask=mask_p, other=0.0)

    # Transposed weight tiles [K, F] / [F, K] for the dots. They are loaded inside the j loop rather than
    # hoisted: the same tiles for every tile of j (they stay in L1/L2), and not pinning them all in registers
    # leaves room for the hidden tile when F is large.
    wg_t_ptrs = wg_ptr + offs_f[None, :] * S + offs_s[:, None]  # Wg^T [BLOCK_S, BLOCK_F]
    wg_t_mask = mask_s[:, None] & mask_f[None, :]
    w2_h_ptrs = w2_ptr + offs_h[None, :] * F + offs_f[:, None]  # W2[:H]^T [BLOCK_F, BLOCK_H]
    w2_h_mask = mask_f[:, None] & mask_h[None, :]
    w2_p_ptrs = w2_ptr + (H + offs_p[None, :]) * F + offs_f[:, None]  # W2[H:H+P]^T [BLOCK_F, BLOCK_P]
    w2_p_mask = mask_f[:, None] & mask_p[None, :]
    b2_h = tl.load(b2_ptr + offs_h, mask=mask_h, other=0.0)
    b2_p = tl.load(b2_ptr + H + offs_p, mask=mask_p, other=0.0)

    # Online softmax state. Padded heads / sets get logits 0 on real j and finite sums; they are never stored.
    m_h = tl.full([BLOCK_H], float("-inf"), dtype)
    s1_h = tl.zeros([BLOCK_H], dtype)
    s2_h = tl.zeros([BLOCK_H], dtype)
    acc_h = tl.zeros([BLOCK_H, BLOCK_D], dtype)
    m_p = tl.full([BLOCK_P], float("-inf"), dtype)
    s1_p = tl.zeros([BLOCK_P], dtype)
    s2_p = tl.zeros([BLOCK_P], dtype)
    acc_p0 = tl.zeros([BLOCK_P], dtype)
    acc_p1 = tl.zeros([BLOCK_P], dtype)
    acc_p2 = tl.zeros([BLOCK_P], dtype)

    for j0 in range(0, N, BLOCK_J):
        offs_j = j0 + tl.arange(0, BLOCK_J)
        mask_j = offs_j < N
        pair_j = b * N + offs_j  # flat atom index of j

        # Gram entries G[j, s] = <X_s,i, X_s,j>, one coordinate axis at a time (3 is not a power of two).
        x_j_base = x_ptr + ((b * S + offs_s[None, :]) * N + offs_j[:, None]) * 3  # [BLOCK_J, BLOCK_S]
        x_j_mask = mask_j[:, None] & mask_s[None, :]
        gram = tl.zeros([BLOCK_J, BLOCK_S], dtype)
        for k in tl.static_range(3):
            x_ik = tl.load(x_i_base + k, mask=mask_s, other=0.0)
            x_jk = tl.load(x_j_base + k, mask=x_j_mask, other=0.0)
            gram += x_ik[None, :] * x_jk

        # hidden = a_i + c_j + G Wg^T [+ LN(e_ij) We^T]
        c_j = tl.load(
            c_ptr + pair_j[:, None] * F + offs_f[None, :], mask=mask_j[:, None] & mask_f[None, :], other=0.0
        )
        wg_t = tl.load(wg_t_ptrs, mask=wg_t_mask, other=0.0)
        hidden = a_i[None, :] + c_j + tl.dot(gram, wg_t, input_precision=DOT_PRECISION)
        if HAS_EDGE_IN:
            offs_e = tl.arange(0, BLOCK_E)
            mask_e = offs_e < E
            e_mask = mask_j[:, None] & mask_e[None, :]
            feats = tl.load(e_ptr + (row * N + offs_j[:, None]) * E + offs_e[None, :], mask=e_mask, other=0.0)
            # LayerNorm over the E real channels (biased variance, as F.layer_norm); padded channels stay 0.
            mean = tl.sum(feats, axis=1) / E
            centred = tl.where(e_mask, feats - mean[:, None], 0.0)
            var = tl.sum(centred * centred, axis=1) / E
            ln_w = tl.load(ln_w_ptr + offs_e, mask=mask_e, other=0.0)
            ln_b = tl.load(ln_b_ptr + offs_e, mask=mask_e, other=0.0)
            normed = centred / tl.sqrt(var + edge_norm_eps)[:, None] * ln_w[None, :] + ln_b[None, :]
            we_t = tl.load(
                we_ptr + offs_f[None, :] * E + offs_e[:, None],
                mask=mask_e[:, None] & mask_f[None, :],
                other=0.0,
            )  # We^T [BLOCK_E, BLOCK_F]
            hidden += tl.dot(normed, we_t, input_precision=DOT_PRECISION)
        # SiLU; exp(-h) overflowing to inf for very negative h gives h / inf = -0, the right limit.
        act = hidden / (1.0 + tl.exp(-hidden))

        if HAS_EDGE_OUT:
            offs_eo = tl.arange(0, BLOCK_EO)
            mask_eo = offs_eo < EO
            w2_e_t = tl.load(
                w2_ptr + (H + P + offs_eo[None, :]) * F + offs_f[:, None],
                mask=mask_f[:, None] & mask_eo[None, :],
                other=0.0,
            )  # W2[H+P:]^T
            b2_e = tl.load(b2_ptr + H + P + offs_eo, mask=mask_eo, other=0.0)
            edge_out = _out_dot(act, w2_e_t, BF16_OUT, DOT_PRECISION) + b2_e[None, :]
            tl.store(
                edge_out_ptr + (row * N + offs_j[:, None]) * EO + offs_eo[None, :],
                edge_out,
                mask=mask_j[:, None] & mask_eo[None, :],
            )

        # Which j take part in row i's softmax: its edges, or every real j when it has none.
        adj_j = tl.load(adj_row + offs_j, mask=mask_j, other=0)
        in_softmax = mask_j & ((adj_j != 0) | no_edge)

        # Node attention, all heads at once: logits [BLOCK_J, BLOCK_H].
        w2_h_t = tl.load(w2_h_ptrs, mask=w2_h_mask, other=0.0)
        z_h = _out_dot(act, w2_h_t, BF16_OUT, DOT_PRECISION) + b2_h[None, :]
        m_h, rescale, p, s1_h, s2_h = _online_softmax_tile(z_h, in_softmax, m_h, s1_h, s2_h)
        v_j = tl.load(
            v_ptr + (pair_j[:, None, None] * H + offs_h[None, :, None]) * D + offs_d[None, None, :],
            mask=mask_j[:, None, None] & mask_h[None, :, None] & mask_d[None, None, :],
            other=0.0,
        )
        acc_h = acc_h * rescale[:, None] + tl.sum(p[:, :, None] * v_j, axis=0)

        # Coordinate attention, all sets at once: logits [BLOCK_J, BLOCK_P].
        w2_p_t = tl.load(w2_p_ptrs, mask=w2_p_mask, other=0.0)
        z_p = _out_dot(act, w2_p_t, BF16_OUT, DOT_PRECISION) + b2_p[None, :]
        m_p, rescale, p, s1_p, s2_p = _online_softmax_tile(z_p, in_softmax, m_p, s1_p, s2_p)
        # Unit vectors (Y_p,i − Y_p,j) / (‖·‖ + eps), one axis at a time.
        y_j_base = y_ptr + ((b * P + offs_p[None, :]) * N + offs_j[:, None]) * 3  # [BLOCK_J, BLOCK_P]
        y_j_mask = mask_j[:, None] & mask_p[None, :]
        d0 = y_i0[None, :] - tl.load(y_j_base + 0, mask=y_j_mask, other=0.0)
        d1 = y_i1[None, :] - tl.load(y_j_base + 1, mask=y_j_mask, other=0.0)
        d2 = y_i2[None, :] - tl.load(y_j_base + 2, mask=y_j_mask, other=0.0)
        weight = p / (tl.sqrt(d0 * d0 + d1 * d1 + d2 * d2) + coord_eps)
        acc_p0 = acc_p0 * rescale + tl.sum(weight * d0, axis=0)
        acc_p1 = acc_p1 * rescale + tl.sum(weight * d1, axis=0)
        acc_p2 = acc_p2 * rescale + tl.sum(weight * d2, axis=0)

    # Σ_j α_j x_j · sqrt(Σ_j α_j²) with α = p / s1 is acc / s1 · sqrt(s2) / s1. Every row has at least one
    # softmax j, so s1 > 0.
    scale_h = tl.sqrt(s2_h) / (s1_h * s1_h)
    tl.store(
        node_out_ptr + row * H * D + offs_h[:, None] * D + offs_d[None, :],
        acc_h * scale_h[:, None],
        mask=mask_h[:, None] & mask_d[None, :],
    )
    scale_p = tl.sqrt(s2_p) / (s1_p * s1_p)
    coord_out = coord_out_ptr + (row * P + offs_p) * 3
    tl.store(coord_out + 0, acc_p0 * scale_p, mask=mask_p)
    tl.store(coord_out + 1, acc_p1 * scale_p, mask=mask_p)
    tl.store(coord_out + 2, acc_p2 * scale_p, mask=mask_p)


def _dot_block(size: int) -> int:
    """Padded size of a tl.dot dimension: a power of two, at least MIN_DOT."""
    return max(MIN_DOT, triton.next_power_of_2(size))


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

    _semla_attention_kernel[(B * N,)](
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
        # 16 j per tile: tl.dot's minimum M; larger tiles would grow the [BLOCK_J, BLOCK_F] hidden tile.
        BLOCK_J=MIN_DOT,
        BLOCK_F=_dot_block(F),
        BLOCK_S=_dot_block(S),
        BLOCK_H=_dot_block(H),
        BLOCK_D=triton.next_power_of_2(D),  # no dot over d_head: only a power of two for tl.arange
        BLOCK_P=_dot_block(P),
        BLOCK_E=_dot_block(max(E, 1)),
        BLOCK_EO=_dot_block(max(EO, 1)),
        HAS_EDGE_IN=has_edge_in,
        HAS_EDGE_OUT=EO > 0,
        DOT_PRECISION="tf32" if precision == "tf32" else "ieee",
        BF16_OUT=precision == "bf16",
    )
    return node_agg, coord_agg, edge_out
