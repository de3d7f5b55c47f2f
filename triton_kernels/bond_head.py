"""Triton kernel of fastflow::bond_head: BondRefine, the bond LayerNorm, the (i, j) + (j, i) symmetrisation and the
edge head MLP in registers, writing only the [B, N, N, K] logits. Math, schema, fake impl, checks and reference:
fastflow/ops/bond_head.py.

One program per molecule × block pair (I, J) of BLOCK_A atoms each, J >= I; programs with J < I return at once.
The tile's BLOCK_A² ordered pairs (i, j) are the rows of every tl.dot: the program computes r_ij and r_ji for all
of them, s = r_ij + r_ji, and the head once per row. Each unordered pair {i, j} is then stored by exactly one row
(the one with i <= j: on a diagonal block both orders are rows), at (i, j) and (j, i), so the logits are exactly
symmetric.

The hidden widths (BondRefine's F, the head's G) are walked in chunks of CHUNK columns: the first linear of a
chunk, its SiLU and its share of the second linear, accumulated. LN_edge(e') is rebuilt per [CHUNK, CHUNK] tile
of W_e from its row statistics, so the live tiles are s, the refinement accumulator and one weight chunk: no
spills and <= 56 KB of shared memory at the SemlaFlow widths (E = F = G = 128) but fp64 on sm_90 (fastflow bench
gpu-static). Every tl.dot dimension
is a power of two >= 16 and masked; padded channels load as 0 and stay 0 through the LayerNorms. Dots run in the
op's precision (triton_kernels.dots): "fp32" as input_precision="ieee" (TF32, the GPU default, would miss the fp32
tolerance of the tests), "tf32" on TF32 tensor cores, "bf16" with bfloat16 operands and float32 accumulation (the
LayerNorms, SiLU, the distance and dot terms and the accumulators stay float32).
"""

import torch
import triton
import triton.language as tl
from fastflow.triton_kernels.dots import dot as precise_dot

MIN_DOT = 16  # smallest size of every tl.dot dimension
BLOCK_A = 4  # atoms per block: a tile of 4 × 4 = 16 ordered pairs, tl.dot's minimum M
CHUNK = {torch.float32: 32, torch.float64: 8}  # hidden columns per step of the F and G loops
# Per dtype (chosen with `fastflow bench gpu-static`): float64 in chunks of 16 spilled 304 B on sm_90a at 255
# registers (semlaflow/refine); with chunks of 8, ptxas capped small/plain at 96 registers on sm_89 (8 B spilled)
# unless allowed the full register file. The tf32 / bf16 variants get it too (capped at 168 registers, small/refine
# tf32 spilled 32 B on sm_80 and semlaflow/refine bf16 32 B on sm_89).
LAUNCH_OPTIONS = {torch.float32: {}, torch.float64: {"maxnreg": 255}}
DOT_LAUNCH_OPTIONS = {"maxnreg": 255}  # the tf32 / bf16 variants


@triton.jit
def _layer_norm(x, offs_e, mask_e, w_ptr, b_ptr, E, eps):
    """LayerNorm of the rows of x [M, BLOCK_E] over the E real channels (biased variance, as F.layer_norm).
    Padded channels of x must be 0; they stay 0."""
    mean = tl.sum(x, axis=1) / E
    centred = tl.where(mask_e[None, :], x - mean[:, None], 0.0)
    var = tl.sum(centred * centred, axis=1) / E
    w = tl.load(w_ptr + offs_e, mask=mask_e, other=0.0)
    b = tl.load(b_ptr + offs_e, mask=mask_e, other=0.0)
    return centred / tl.sqrt(var + eps)[:, None] * w[None, :] + b[None, :]


@triton.jit
def _silu(x):
    # exp(-x) overflowing to inf for very negative x gives x / inf = -0, the right limit.
    return x / (1.0 + tl.exp(-x))


@triton.jit
def _refined(
    e_ptr,
    bn_w_ptr,
    bn_b_ptr,
    a_ptr,
    c_ptr,
    x_ptr,
    en_w_ptr,
    en_b_ptr,
    we_ptr,
    wd_ptr,
    wo_ptr,
    w2_ptr,
    b2_ptr,
    atom_p,  # [M] flat atom index b * N + p
    atom_q,  # [M] flat atom index b * N + q
    q,  # [M] atom q within its molecule
    real,  # [M] both atoms exist (p, q < N)
    N,
    E,
    F,
    edge_norm_eps,
    bond_norm_eps,
    BLOCK_E: tl.constexpr,
    CHUNK_F: tl.constexpr,
    REFINE: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """r_pq = LN_bond(W2 · silu(hid_pq) + b2) (or LN_bond(e'_pq) without BondRefine) for the ordered pairs (p, q)
    of the tile: [M, BLOCK_E], 0 in padded channels."""
    offs_e = tl.arange(0, BLOCK_E)
    mask_e = offs_e < E
    rows = e_ptr + (atom_p * N + q)[:, None] * E  # the tile's e' rows
    feats = tl.load(rows + offs_e[None, :], mask=real[:, None] & mask_e[None, :], other=0.0)
    if REFINE:
        # LN_edge's statistics only: the normalised rows are rebuilt per chunk of E inside the F loop (from L1),
        # so no [M, BLOCK_E] LN_edge tile stays live next to s and the accumulator (fp64 spilled with it).
        mean = tl.sum(feats, axis=1) / E
        centred = tl.where(mask_e[None, :], feats - mean[:, None], 0.0)
        rstd = 1.0 / tl.sqrt(tl.sum(centred * centred, axis=1) / E + edge_norm_eps)
        sq_dist = tl.zeros_like(mean)
        dot = tl.zeros_like(mean)
        for k in tl.static_range(3):
            x_p = tl.load(x_ptr + atom_p * 3 + k, mask=real, other=0.0)
            x_q = tl.load(x_ptr + atom_q * 3 + k, mask=real, other=0.0)
            sq_dist += (x_p - x_q) * (x_p - x_q)
            dot += x_p * x_q
        refined = tl.zeros_like(feats)
        for f0 in range(0, F, CHUNK_F):
            offs_f = f0 + tl.arange(0, CHUNK_F)
            mask_f = offs_f < F
            pair_f = real[:, None] & mask_f[None, :]
            w_d = tl.load(wd_ptr + offs_f, mask=mask_f, other=0.0)
            w_o = tl.load(wo_ptr + offs_f, mask=mask_f, other=0.0)
            hidden = (
                tl.load(a_ptr + atom_p[:, None] * F + offs_f[None, :], mask=pair_f, other=0.0)
                + tl.load(c_ptr + atom_q[:, None] * F + offs_f[None, :], mask=pair_f, other=0.0)
                + sq_dist[:, None] * w_d[None, :]
                + dot[:, None] * w_o[None, :]
            )
            # not pipelined: prefetched e' chunks cost the registers that made the small preset spill
            for e0 in tl.range(0, E, CHUNK_F, num_stages=1):
                offs_c = e0 + tl.arange(0, CHUNK_F)
                mask_c = offs_c < E
                x = tl.load(rows + offs_c[None, :], mask=real[:, None] & mask_c[None, :], other=0.0)
                ln_w = tl.load(en_w_ptr + offs_c, mask=mask_c, other=0.0)
                ln_b = tl.load(en_b_ptr + offs_c, mask=mask_c, other=0.0)
                normed = (x - mean[:, None]) * rstd[:, None] * ln_w[None, :] + ln_b[None, :]  # 0 where padded
                we_t = tl.load(
                    we_ptr + offs_f[None, :] * E + offs_c[:, None],
                    mask=mask_c[:, None] & mask_f[None, :],
                    other=0.0,
                )  # W_e[f chunk, e chunk]^T
                hidden = precise_dot(normed, we_t, hidden, PRECISION)
            w2_t = tl.load(
                w2_ptr + offs_e[None, :] * F + offs_f[:, None],
                mask=mask_f[:, None] & mask_e[None, :],
                other=0.0,
            )  # W2[:, f chunk]^T [CHUNK_F, BLOCK_E]
            refined = precise_dot(_silu(hidden), w2_t, refined, PRECISION)
        feats = refined + tl.load(b2_ptr + offs_e, mask=mask_e, other=0.0)[None, :]
    return _layer_norm(feats, offs_e, mask_e, bn_w_ptr, bn_b_ptr, E, bond_norm_eps)


@triton.jit
def _bond_head_kernel(
    e_ptr,  # edge_feats [B, N, N, E]
    bn_w_ptr,  # bond_norm_weight [E]
    bn_b_ptr,  # bond_norm_bias [E]
    wh1_ptr,  # head_weight1 [G, E]
    bh1_ptr,  # head_bias1 [G]
    wh2_ptr,  # head_weight2 [K, G]
    bh2_ptr,  # head_bias2 [K]
    a_ptr,  # node_terms_i [B, N, F]; the refinement pointers are any valid pointer when not REFINE
    c_ptr,  # node_terms_j [B, N, F]
    x_ptr,  # coords [B, N, 3]
    en_w_ptr,  # edge_norm_weight [E]
    en_b_ptr,  # edge_norm_bias [E]
    we_ptr,  # edge_weight [F, E]
    wd_ptr,  # dist_weight [F]
    wo_ptr,  # dot_weight [F]
    w2_ptr,  # refine_weight [E, F]
    b2_ptr,  # refine_bias [E]
    out_ptr,  # logits [B, N, N, K]
    N,
    E,
    F,
    G,
    K,
    edge_norm_eps,
    bond_norm_eps,
    BLOCK_A: tl.constexpr,
    BLOCK_E: tl.constexpr,
    BLOCK_K: tl.constexpr,
    CHUNK_F: tl.constexpr,
    CHUNK_G: tl.constexpr,
    REFINE: tl.constexpr,
    PRECISION: tl.constexpr,
):
    block_i = tl.program_id(1)
    block_j = tl.program_id(2)
    if block_j < block_i:  # the tile (J, I) holds these pairs
        return
    b = tl.program_id(0).to(tl.int64)  # int64 so that flat pair indices cannot overflow
    offs_m = tl.arange(0, BLOCK_A * BLOCK_A)
    i = block_i * BLOCK_A + offs_m // BLOCK_A
    j = block_j * BLOCK_A + offs_m % BLOCK_A
    real = (i < N) & (j < N)
    atom_i = b * N + i
    atom_j = b * N + j

    # s = r_ij + r_ji, one direction at a time (each is a [M, BLOCK_E] tile).
    s = _refined(
        e_ptr, bn_w_ptr, bn_b_ptr, a_ptr, c_ptr, x_ptr, en_w_ptr, en_b_ptr, we_ptr, wd_ptr, wo_ptr, w2_ptr,
        b2_ptr, atom_i, atom_j, j, real, N, E, F, edge_norm_eps, bond_norm_eps, BLOCK_E, CHUNK_F, REFINE,
        PRECISION,
    )  # fmt: skip
    s += _refined(
        e_ptr, bn_w_ptr, bn_b_ptr, a_ptr, c_ptr, x_ptr, en_w_ptr, en_b_ptr, we_ptr, wd_ptr, wo_ptr, w2_ptr,
        b2_ptr, atom_j, atom_i, i, real, N, E, F, edge_norm_eps, bond_norm_eps, BLOCK_E, CHUNK_F, REFINE,
        PRECISION,
    )  # fmt: skip

    # logits = Wh2 · silu(Wh1 · s + bh1) + bh2, G in chunks.
    offs_e = tl.arange(0, BLOCK_E)
    mask_e = offs_e < E
    offs_k = tl.arange(0, BLOCK_K)
    mask_k = offs_k < K
    logits = tl.zeros([BLOCK_A * BLOCK_A, BLOCK_K], dtype=s.dtype)
    for g0 in range(0, G, CHUNK_G):
        offs_g = g0 + tl.arange(0, CHUNK_G)
        mask_g = offs_g < G
        wh1_t = tl.load(
            wh1_ptr + offs_g[None, :] * E + offs_e[:, None], mask=mask_e[:, None] & mask_g[None, :], other=0.0
        )  # Wh1[chunk]^T [BLOCK_E, CHUNK_G]
        bh1 = tl.load(bh1_ptr + offs_g, mask=mask_g, other=0.0)
        hidden = precise_dot(s, wh1_t, tl.zeros([BLOCK_A * BLOCK_A, CHUNK_G], dtype=s.dtype), PRECISION)
        hidden = _silu(hidden + bh1[None, :])
        wh2_t = tl.load(
            wh2_ptr + offs_k[None, :] * G + offs_g[:, None], mask=mask_g[:, None] & mask_k[None, :], other=0.0
        )  # Wh2[:, chunk]^T [CHUNK_G, BLOCK_K]
        logits = precise_dot(hidden, wh2_t, logits, PRECISION)
    logits += tl.load(bh2_ptr + offs_k, mask=mask_k, other=0.0)[None, :]

    keep = (real & (i <= j))[:, None] & mask_k[None, :]
    tl.store(out_ptr + (atom_i * N + j)[:, None] * K + offs_k[None, :], logits, mask=keep)
    tl.store(out_ptr + (atom_j * N + i)[:, None] * K + offs_k[None, :], logits, mask=keep)


def _dot_block(size: int) -> int:
    """Padded size of a tl.dot dimension: a power of two, at least MIN_DOT."""
    return max(MIN_DOT, triton.next_power_of_2(size))


def bond_head(
    edge_feats,
    bond_norm_weight,
    bond_norm_bias,
    head_weight1,
    head_bias1,
    head_weight2,
    head_bias2,
    node_terms_i,
    node_terms_j,
    coords,
    edge_norm_weight,
    edge_norm_bias,
    edge_weight,
    dist_weight,
    dot_weight,
    refine_weight,
    refine_bias,
    edge_norm_eps: float,
    bond_norm_eps: float,
    precision: str = "fp32",
):
    """Launch on inputs validated by fastflow.ops.bond_head.check_inputs (shapes, dtype, device); the refinement
    block is all tensors or all None. precision: "fp32", or "tf32" / "bf16" (float32 tensors; checked by
    fastflow.ops.bond_head)."""
    dtype = edge_feats.dtype
    if dtype not in (torch.float32, torch.float64):
        raise TypeError(f"bond_head (triton): tensors must be float32 or float64, got {dtype}")
    B, N, _, E = edge_feats.shape
    G, K = head_weight1.size(0), head_weight2.size(0)
    out = torch.empty((B, N, N, K), dtype=dtype, device=edge_feats.device)
    if K == 0:
        return out
    refine = node_terms_i is not None
    F = node_terms_i.size(2) if refine else 0

    # The kernel indexes flat row-major tensors; these names keep the copies alive during the launch.
    head = (edge_feats, bond_norm_weight, bond_norm_bias, head_weight1, head_bias1, head_weight2, head_bias2)
    e, bn_w, bn_b, wh1, bh1, wh2, bh2 = (t.contiguous() for t in head)
    if refine:
        block = (node_terms_i, node_terms_j, coords, edge_norm_weight, edge_norm_bias, edge_weight)
        block += (dist_weight, dot_weight, refine_weight, refine_bias)
        a, c, x, en_w, en_b, we, wd, wo, w2, b2 = (t.contiguous() for t in block)
    else:
        a = c = x = en_w = en_b = we = wd = wo = w2 = b2 = (
            e  # never read (REFINE is False): any valid pointer
        )

    blocks = triton.cdiv(N, BLOCK_A)
    _bond_head_kernel[(B, blocks, blocks)](
        e,
        bn_w,
        bn_b,
        wh1,
        bh1,
        wh2,
        bh2,
        a,
        c,
        x,
        en_w,
        en_b,
        we,
        wd,
        wo,
        w2,
        b2,
        out,
        N,
        E,
        F,
        G,
        K,
        float(edge_norm_eps),
        float(bond_norm_eps),
        BLOCK_A=BLOCK_A,
        BLOCK_E=_dot_block(E),
        BLOCK_K=_dot_block(K),
        CHUNK_F=min(CHUNK[dtype], _dot_block(max(F, 1))),
        CHUNK_G=min(CHUNK[dtype], _dot_block(max(G, 1))),
        REFINE=refine,
        PRECISION="ieee" if precision == "fp32" else precision,
        **(LAUNCH_OPTIONS[dtype] if precision == "fp32" else DOT_LAUNCH_OPTIONS),
    )
    return out
