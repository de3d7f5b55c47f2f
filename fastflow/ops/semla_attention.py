"""fastflow::semla_attention: one Semla layer's pair messages, node attention and coordinate attention.

For every ordered pair (i, j) of atoms in a molecule (letters as in fastflow.models.semla; F the message MLP's
hidden width, P the coordinate-attention sets, E_in / E_out the edge channels read / written):

    G_ij,s  = <X_s,i, X_s,j>                                       Gram entry per coordinate set s
    z_ij    = W2 · silu(a_i + c_j + Wg · G_ij [+ We · LN(e_ij)]) + b2  ∈ R^(H + P + E_out)
    α_ij,h  = softmax_j(z_ij,h)            over the edges of i        node-attention weights, head h
    β_ij,p  = softmax_j(z_ij,H+p)          over the edges of i        coordinate-attention weights, set p
    o_i,h   = sqrt(Σ_j α_ij,h²) · Σ_j α_ij,h v_j,h                    [H, d_head]
    u_i,p   = sqrt(Σ_j β_ij,p²) · Σ_j β_ij,p (Y_p,i − Y_p,j) / (‖Y_p,i − Y_p,j‖ + eps)     [P, 3]
    e'_ij   = z_ij[H + P:]                                             edge features out (last layer only)

First layer, optionally: the edge features are the generator's embedding of its raw edge input x_ij (bond
one-hots and self-conditioning bond probabilities), e_ij = W_eb · silu(W_ea x_ij + b_ea) + b_eb, made inside the
op (embed_* arguments) so that the [B, N, N, E_in] embedding is not materialised either.

a_i = W1[:, :M] m_i + b1 and c_j = W1[:, M:2M] m_j are the per-atom halves of the message MLP's first linear
over [m_i, m_j, G_ij, LN(e_ij)]: splitting it turns a [pairs, 2M + S + E] × [2M + S + E, F] product into two
per-atom GEMMs plus the small per-pair Gram term. sqrt(Σα²) is the variance-preserving rescale. A row i with no
edge at all (a padding atom, a single-atom molecule) takes its softmax over every j, as the reference layer's
additive mask does; its values are never used downstream.

The fused kernels evaluate this flash-attention style: per row i they compute z_i· tile by tile, keep a running
max, Σexp and Σexp² per head and per set, and accumulate values and unit vectors; no [B, N, N, ·] tensor is
written except e'. The reference below materialises every pair tensor and reads like the math.

precision="bf16" (float32 inputs): the product z = W2 · silu(·) takes bfloat16 operands with float32
accumulation; the reference rounds silu(hidden) and W2 to bfloat16 and multiplies in float32, so it defines
the same numbers (the fused kernels match it to float32 summation order). Everything else stays float32.
precision="tf32" (Triton only): the products of both linears in TF32.

Inference op: the fused kernels have no backward. Autograd through this op recomputes the reference and
differentiates it (memory of the reference path, exact gradients), so a patched model can still be trained.

Implementations (fastflow.ops.backends picks one):
    reference  semla_attention_reference below
    cpp        torch.ops.fastflow.semla_attention         schema csrc/registration.cpp, kernel csrc/semla_attention.cpp
    triton     torch.ops.fastflow.semla_attention_triton  kernel triton_kernels/semla_attention.py (CUDA)
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from fastflow.ops.backends import (
    FLOAT_DTYPES,
    BackendUnavailable,
    bind_cpp_ops,
    check_precision,
    recompute_vjp,
    register_cpp_op,
    resolve_backend,
)

# Tensor arguments in schema order; the optional edge-input block is all given or all None, and so is the
# optional edge-embedding block (which needs the edge-input block: edge_feats is then its raw input).
ARGUMENTS = (
    "node_terms_i",
    "node_terms_j",
    "gram_coords",
    "gram_weight",
    "out_weight",
    "out_bias",
    "values",
    "attn_coords",
    "adjacency",
    "edge_feats",
    "edge_norm_weight",
    "edge_norm_bias",
    "edge_weight",
    "embed_weight1",
    "embed_bias1",
    "embed_weight2",
    "embed_bias2",
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
    edge_feats=None,
    edge_norm_weight=None,
    edge_norm_bias=None,
    edge_weight=None,
    embed_weight1=None,
    embed_bias1=None,
    embed_weight2=None,
    embed_bias2=None,
    edge_norm_eps: float = 1e-5,
    coord_eps: float = 1e-6,
    precision: str = "fp32",
    backend: str | None = None,
):
    """Fused Semla attention (see the module docstring for the math).

    Arguments (B molecules, N atoms, F hidden, S Gram sets, H heads, P coordinate sets, E_in edge channels):
        node_terms_i: a ``[B, N, F]`` (bias b1 included); node_terms_j: c ``[B, N, F]``.
        gram_coords: X ``[B, S, N, 3]``; gram_weight: Wg ``[F, S]``.
        out_weight: W2 ``[H + P + E_out, F]``; out_bias: b2 ``[H + P + E_out]``.
        values: v ``[B, N, H, d_head]``; attn_coords: Y ``[B, P, N, 3]``.
        adjacency: ``[B, N, N]`` bool, True on edges.
        edge_feats ``[B, N, N, E_in]``, edge_norm_weight / edge_norm_bias ``[E_in]`` (LayerNorm), edge_weight
            We ``[F, E_in]``: all given (first layer) or all None.
        embed_weight1 W_ea ``[E_h, X]``, embed_bias1 ``[E_h]``, embed_weight2 W_eb ``[E_in, E_h]``, embed_bias2
            ``[E_in]``: all given or all None; given, edge_feats is the raw edge input x ``[B, N, N, X]`` and the
            edge features are its embedding.
        edge_norm_eps: LayerNorm epsilon; coord_eps: added to the length of a difference vector.
        precision: "fp32", "bf16" or "tf32" (Triton only) for the matrix products (see the module docstring).
        backend: "auto" (default), "cpp", "triton" or "reference".
    Return:
        node_agg ``[B, N, H * d_head]``, coord_agg ``[B, N, P, 3]``, edge_out ``[B, N, N, E_out]`` (E_out may be 0).
    """
    inputs = (
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
        embed_weight1,
        embed_bias1,
        embed_weight2,
        embed_bias2,
    )
    check_inputs(*inputs)
    check_precision("semla_attention", precision, node_terms_i.dtype)
    chosen = resolve_backend(backend, node_terms_i.device)
    if precision == "tf32" and chosen != "triton":
        raise ValueError(f"semla_attention: precision 'tf32' runs on the triton backend only, not {chosen!r}")
    eps = (float(edge_norm_eps), float(coord_eps), precision)
    if chosen == "cpp":
        return _cpp_op()(*inputs, *eps)
    if chosen == "triton":
        return semla_attention_triton(*inputs, *eps)
    return semla_attention_reference(*inputs, *eps)


def semla_attention_reference(
    node_terms_i,
    node_terms_j,
    gram_coords,
    gram_weight,
    out_weight,
    out_bias,
    values,
    attn_coords,
    adjacency,
    edge_feats=None,
    edge_norm_weight=None,
    edge_norm_bias=None,
    edge_weight=None,
    embed_weight1=None,
    embed_bias1=None,
    embed_weight2=None,
    embed_bias2=None,
    edge_norm_eps: float = 1e-5,
    coord_eps: float = 1e-6,
    precision: str = "fp32",
):
    """The definition, in plain PyTorch: every [B, N, N, ·] pair tensor is materialised. precision "bf16" rounds
    the operands of z's product to bfloat16 (tf32 is not modelled: it is the fp32 definition)."""
    H, P = values.size(2), attn_coords.size(1)
    gram = torch.einsum("bsik,bsjk->bijs", gram_coords, gram_coords)  # G_ij,s
    hidden = node_terms_i.unsqueeze(2) + node_terms_j.unsqueeze(1) + gram @ gram_weight.T
    if embed_weight1 is not None:
        edge_feats = embed_edges(edge_feats, embed_weight1, embed_bias1, embed_weight2, embed_bias2)
    if edge_feats is not None:
        normed = F.layer_norm(
            edge_feats, edge_feats.shape[-1:], edge_norm_weight, edge_norm_bias, edge_norm_eps
        )
        hidden = hidden + normed @ edge_weight.T
    activated = F.silu(hidden)
    if precision == "bf16":
        activated, out_weight = (t.bfloat16().to(t.dtype) for t in (activated, out_weight))
    z = activated @ out_weight.T + out_bias
    node_logits, coord_logits, edge_out = z.split([H, P, z.size(-1) - H - P], dim=-1)

    # Softmax over the edges of each row; a row without edges takes it over every j.
    no_edge = ~adjacency & adjacency.any(dim=-1, keepdim=True)
    alpha = torch.softmax(node_logits.masked_fill(no_edge.unsqueeze(-1), float("-inf")), dim=2)
    beta = torch.softmax(coord_logits.masked_fill(no_edge.unsqueeze(-1), float("-inf")), dim=2)

    node_agg = torch.einsum("bijh,bjhd->bihd", alpha, values) * alpha.square().sum(dim=2).sqrt().unsqueeze(-1)
    diffs = attn_coords.unsqueeze(3) - attn_coords.unsqueeze(2)  # Y_p,i − Y_p,j: [B, P, N, N, 3]
    unit = diffs / (torch.linalg.vector_norm(diffs, dim=-1, keepdim=True) + coord_eps)  # finite grad at i = j
    coord_agg = torch.einsum("bijp,bpijk->bipk", beta, unit) * beta.square().sum(dim=2).sqrt().unsqueeze(-1)
    return node_agg.flatten(2), coord_agg, edge_out.contiguous()


def embed_edges(edge_input, weight1, bias1, weight2, bias2):
    """The generator's edge embedding e = W_eb · silu(W_ea x + b_ea) + b_eb, materialised (reference, Triton)."""
    return F.linear(F.silu(F.linear(edge_input, weight1, bias1)), weight2, bias2)


def check_inputs(
    node_terms_i,
    node_terms_j,
    gram_coords,
    gram_weight,
    out_weight,
    out_bias,
    values,
    attn_coords,
    adjacency,
    edge_feats=None,
    edge_norm_weight=None,
    edge_norm_bias=None,
    edge_weight=None,
    embed_weight1=None,
    embed_bias1=None,
    embed_weight2=None,
    embed_bias2=None,
):
    """Raise with a message naming the argument, the expectation and what arrived."""

    def fail(name, expected, tensor):
        got = f"shape {list(tensor.shape)}" if torch.is_tensor(tensor) else type(tensor).__name__
        raise ValueError(f"semla_attention: {name} must have shape {expected}, got {got}")

    def check(name, tensor, shape):
        if (
            not torch.is_tensor(tensor)
            or tensor.dim() != len(shape)
            or any(want is not None and have != want for have, want in zip(tensor.shape, shape))
        ):
            fail(name, "[" + ", ".join("·" if want is None else str(want) for want in shape) + "]", tensor)

    check("node_terms_i", node_terms_i, (None, None, None))
    B, N, F_ = node_terms_i.shape
    if B == 0 or N == 0:
        raise ValueError(f"semla_attention: empty batch (node_terms_i has shape {list(node_terms_i.shape)})")
    check("node_terms_j", node_terms_j, (B, N, F_))
    check("gram_coords", gram_coords, (B, None, N, 3))
    S = gram_coords.size(1)
    check("gram_weight", gram_weight, (F_, S))
    check("values", values, (B, N, None, None))
    H = values.size(2)
    check("attn_coords", attn_coords, (B, None, N, 3))
    P = attn_coords.size(1)
    check("out_weight", out_weight, (None, F_))
    if out_weight.size(0) < H + P:
        raise ValueError(
            f"semla_attention: out_weight must have at least H + P = {H + P} rows (node and "
            f"coordinate logits), got {out_weight.size(0)}"
        )
    check("out_bias", out_bias, (out_weight.size(0),))
    check("adjacency", adjacency, (B, N, N))
    if adjacency.dtype != torch.bool:
        raise TypeError(f"semla_attention: adjacency must be a bool tensor, got {adjacency.dtype}")
    edge_block = (edge_feats, edge_norm_weight, edge_norm_bias, edge_weight)
    if any(t is None for t in edge_block) and any(t is not None for t in edge_block):
        raise ValueError(
            "semla_attention: edge_feats, edge_norm_weight, edge_norm_bias and edge_weight are "
            "given together or not at all"
        )
    embed_block = (embed_weight1, embed_bias1, embed_weight2, embed_bias2)
    if any(t is None for t in embed_block) and any(t is not None for t in embed_block):
        raise ValueError(
            "semla_attention: embed_weight1, embed_bias1, embed_weight2 and embed_bias2 are given together "
            "or not at all"
        )
    if embed_weight1 is not None and edge_feats is None:
        raise ValueError("semla_attention: an edge embedding (embed_*) needs the edge-input block")
    floats = [node_terms_i, node_terms_j, gram_coords, gram_weight, out_weight, out_bias, values, attn_coords]
    names = list(ARGUMENTS[:8])
    if edge_feats is not None:
        check("edge_feats", edge_feats, (B, N, N, None))
        E = edge_feats.size(-1)
        if embed_weight1 is not None:  # edge_feats is the raw input x; E becomes the embedding's width
            check("embed_weight1", embed_weight1, (None, E))
            check("embed_bias1", embed_bias1, (embed_weight1.size(0),))
            check("embed_weight2", embed_weight2, (None, embed_weight1.size(0)))
            E = embed_weight2.size(0)
            check("embed_bias2", embed_bias2, (E,))
            floats += list(embed_block)
            names += list(ARGUMENTS[13:])
        check("edge_norm_weight", edge_norm_weight, (E,))
        check("edge_norm_bias", edge_norm_bias, (E,))
        check("edge_weight", edge_weight, (F_, E))
        floats += [edge_feats, edge_norm_weight, edge_norm_bias, edge_weight]
        names += list(ARGUMENTS[9:13])
    dtype, device = node_terms_i.dtype, node_terms_i.device
    if dtype not in FLOAT_DTYPES:
        raise TypeError(f"semla_attention: tensors must be float32 or float64, got {dtype}")
    for name, tensor in zip(names, floats):
        if tensor.dtype != dtype:
            raise TypeError(
                f"semla_attention: {name} has dtype {tensor.dtype}, expected {dtype} like node_terms_i"
            )
    for name, tensor in zip(names + ["adjacency"], floats + [adjacency]):
        if tensor.device != device:
            raise ValueError(
                f"semla_attention: {name} is on {tensor.device}, expected {device} like node_terms_i"
            )


def semla_attention_flops(
    node_terms_i_shape,
    node_terms_j_shape,
    gram_coords_shape,
    gram_weight_shape,
    out_weight_shape,
    out_bias_shape,
    values_shape,
    attn_coords_shape,
    adjacency_shape,
    edge_feats_shape=None,
    *args,
    **kwargs,
) -> int:
    """Minimal FLOPs (2 per multiply-add) of the op, a torch.utils.flop_counter formula registered by
    fastflow.benchmarks.kernels (importing flop_counter imports triton, which must stay lazy). Per pair: the Gram
    entries (3S), the Gram and edge terms of the hidden layer (S·F, E_in·F), the output linear (F·(H + P + E_out)), the
    value and unit-vector accumulations (H·d_head, 3P). Softmax, SiLU, LayerNorm and lengths are not counted."""
    B, N, F_ = node_terms_i_shape
    S, (_, _, H, d_head), P = gram_coords_shape[1], values_shape, attn_coords_shape[1]
    E_in = 0 if edge_feats_shape is None else edge_feats_shape[-1]
    per_pair = 3 * S + S * F_ + E_in * F_ + F_ * out_weight_shape[0] + H * d_head + 3 * P
    return 2 * B * N * N * per_pair


def _semla_attention_fake(
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
    embed_weight1,
    embed_bias1,
    embed_weight2,
    embed_bias2,
    edge_norm_eps,
    coord_eps,
    precision="fp32",
):
    # Output shapes, so torch.compile and torch.export can trace the op; the checks also run here because a
    # meta or fake input sends even the C++ op to this function instead of its kernel.
    check_inputs(
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
        embed_weight1,
        embed_bias1,
        embed_weight2,
        embed_bias2,
    )
    check_precision("semla_attention", precision, node_terms_i.dtype)
    B, N, _ = node_terms_i.shape
    H, d_head, P = values.size(2), values.size(3), attn_coords.size(1)
    E_out = out_weight.size(0) - H - P
    new = node_terms_i.new_empty
    return new(B, N, H * d_head), new(B, N, P, 3), new(B, N, N, E_out)


# Autograd by recomputation: the fused kernels only run forward; the gradient is the reference's vector-Jacobian
# product, evaluated with torch.func so that it is itself traceable.
def _setup_context(ctx, inputs, output):
    ctx.inputs = inputs


def _backward(ctx, grad_node, grad_coord, grad_edge):
    return recompute_vjp(
        semla_attention_reference,
        ctx.inputs,
        len(ARGUMENTS),
        (grad_node, grad_coord, grad_edge),
        skip=(ARGUMENTS.index("adjacency"),),
    )


def _cpp_op():
    """The C++ op, with fake and autograd registered once fastflow._C has defined it (schema in C++)."""
    return register_cpp_op("semla_attention", _semla_attention_fake, _backward, _setup_context)


bind_cpp_ops(_cpp_op)


# custom_op, not triton_op: see cache_forecast.py.
@torch.library.custom_op("fastflow::semla_attention_triton", mutates_args=())
def semla_attention_triton(
    node_terms_i: torch.Tensor,
    node_terms_j: torch.Tensor,
    gram_coords: torch.Tensor,
    gram_weight: torch.Tensor,
    out_weight: torch.Tensor,
    out_bias: torch.Tensor,
    values: torch.Tensor,
    attn_coords: torch.Tensor,
    adjacency: torch.Tensor,
    edge_feats: torch.Tensor | None,
    edge_norm_weight: torch.Tensor | None,
    edge_norm_bias: torch.Tensor | None,
    edge_weight: torch.Tensor | None,
    embed_weight1: torch.Tensor | None,
    embed_bias1: torch.Tensor | None,
    embed_weight2: torch.Tensor | None,
    embed_bias2: torch.Tensor | None,
    edge_norm_eps: float,
    coord_eps: float,
    precision: str = "fp32",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    from fastflow.triton_kernels import (
        semla_attention as kernel,  # lazy: importing fastflow never needs triton
    )

    # Checked here too, not only in semla_attention(): a kernel launched on wrong shapes reads out of bounds.
    check_inputs(
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
        embed_weight1,
        embed_bias1,
        embed_weight2,
        embed_bias2,
    )
    check_precision("semla_attention", precision, node_terms_i.dtype)
    if precision == "bf16" and os.environ.get("TRITON_INTERPRET") == "1":
        # Triton's interpreter (3.9) returns garbage for bf16 tl.dot: refuse rather than mislead.
        raise BackendUnavailable(
            "semla_attention (triton): precision 'bf16' cannot run under TRITON_INTERPRET=1 (the interpreter "
            "computes bf16 dots wrongly); it runs on a GPU, or use backend='cpp' on CPU"
        )
    if embed_weight1 is not None:  # the Triton kernel reads embedded edges: made here, in PyTorch
        edge_feats = embed_edges(edge_feats, embed_weight1, embed_bias1, embed_weight2, embed_bias2)
    return kernel.semla_attention(
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
        edge_norm_eps,
        coord_eps,
        precision=precision,
    )


semla_attention_triton.register_fake(_semla_attention_fake)
semla_attention_triton.register_autograd(_backward, setup_context=_setup_context)
