"""fastflow::bond_head: the pair-level tail of a Semla generator, from the last layer's edge output to bond logits.

After the last Semla layer writes its edge features e' ``[B, N, N, E]``, the generator runs BondRefine, the
dynamics' bond LayerNorm, the symmetrisation of Semla.forward and the edge output MLP (letters as in
fastflow.models.semla; F BondRefine's hidden width, G the head's hidden width, K bond classes):

    hid_ij   = W_e · LN_edge(e'_ij) + a_i + c_j + w_d ‖x_i − x_j‖² + w_o (x_i · x_j)      ∈ R^F
    r_ij     = LN_bond(W2 · silu(hid_ij) + b2)                                              ∈ R^E
    s_ij     = r_ij + r_ji                                                                   ∈ R^E
    logit_ij = Wh2 · silu(Wh1 · s_ij + bh1) + bh2                                           ∈ R^K

a_i = W_i m_i + b1 and c_j = W_j m_j (m = node_proj(node_norm(h))) are the per-atom blocks of BondRefine's first
linear over [m_i, m_j, ‖x_i − x_j‖², x_i · x_j, LN_edge(e'_ij)], computed outside as two per-atom GEMMs; x are
BondRefine's normalised coordinates (its CoordNorm, norm "none": centred over the real atoms, times the set
weight, zero on padding). Without BondRefine (a model built with bond_refine=False) r_ij = LN_bond(e'_ij): the
refinement arguments are then all None.

The reference materialises every line as a [B, N, N, ·] tensor. The fused kernel walks the pairs by block pairs,
an i-block × j-block (j-block ≥ i-block) of one molecule, several of them packed into a tile of ~512 ordered pairs:
it computes r for both directions (ij and ji) of the tile's pairs from their e' rows, sums them and runs the head
once per unordered pair, writing the logits at (i, j) and (j, i). The logits are therefore exactly symmetric, and no pair tensor but the [B, N, N, K] output is written.
Every pair is computed, padding included, as in the model: the op is pair-local (logit_ij reads only the inputs
of atoms i and j and the pairs ij, ji), so padding never changes a real pair's logits.

precision: "fp32" (default), or "tf32" / "bf16" (float32 inputs, Triton only): the kernel's four matrix products
(W_e · LN_edge, W2 · silu, Wh1 · s, Wh2 · silu) on tensor cores (TF32, or bf16 operands with float32
accumulation); LayerNorms, the distance and dot terms and the accumulators stay float32. The C++ kernel has no such
variant (a request for one raises).

Inference op: the fused kernel has no backward. Autograd through this op recomputes the reference and
differentiates it (memory of the reference path, exact gradients), so a patched model can still be trained.

Implementations (fastflow.ops.backends picks one):
    reference  bond_head_reference below
    cpp        torch.ops.fastflow.bond_head        schema csrc/registration.cpp, kernel csrc/bond_head.cpp
    triton     torch.ops.fastflow.bond_head_triton  custom op below, kernel triton_kernels/bond_head.py (a program
               per molecule × block pair of 4 × 4 atoms; the same exactly symmetric logits)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fastflow.ops.backends import (
    FLOAT_DTYPES,
    bind_cpp_ops,
    check_triton_precision,
    recompute_vjp,
    register_cpp_op,
    resolve_backend,
)

# Tensor arguments in schema order. The head block is always given; the refinement block (BondRefine) is all
# given or all None.
HEAD_ARGUMENTS = (
    "edge_feats",
    "bond_norm_weight",
    "bond_norm_bias",
    "head_weight1",
    "head_bias1",
    "head_weight2",
    "head_bias2",
)
REFINE_ARGUMENTS = (
    "node_terms_i",
    "node_terms_j",
    "coords",
    "edge_norm_weight",
    "edge_norm_bias",
    "edge_weight",
    "dist_weight",
    "dot_weight",
    "refine_weight",
    "refine_bias",
)
ARGUMENTS = HEAD_ARGUMENTS + REFINE_ARGUMENTS


def bond_head(
    edge_feats,
    bond_norm_weight,
    bond_norm_bias,
    head_weight1,
    head_bias1,
    head_weight2,
    head_bias2,
    node_terms_i=None,
    node_terms_j=None,
    coords=None,
    edge_norm_weight=None,
    edge_norm_bias=None,
    edge_weight=None,
    dist_weight=None,
    dot_weight=None,
    refine_weight=None,
    refine_bias=None,
    edge_norm_eps: float = 1e-5,
    bond_norm_eps: float = 1e-5,
    backend: str | None = None,
    precision: str = "fp32",
):
    """Fused bond head (see the module docstring for the math).

    Arguments (B molecules, N atoms, E edge channels, F BondRefine hidden, G head hidden, K bond classes):
        edge_feats: e' ``[B, N, N, E]``, the last layer's edge output.
        bond_norm_weight / bond_norm_bias: LN_bond ``[E]`` (the dynamics' bond_norm).
        head_weight1 Wh1 ``[G, E]``, head_bias1 bh1 ``[G]``, head_weight2 Wh2 ``[K, G]``, head_bias2 bh2 ``[K]``:
            the generator's edge_out_proj.
        Refinement block (BondRefine; all given, or all None for a model without it):
            node_terms_i a ``[B, N, F]`` (bias b1 included), node_terms_j c ``[B, N, F]``;
            coords x ``[B, N, 3]`` (BondRefine's normalised coordinates);
            edge_norm_weight / edge_norm_bias LN_edge ``[E]``; edge_weight W_e ``[F, E]``;
            dist_weight w_d ``[F]``, dot_weight w_o ``[F]`` (columns of the first linear);
            refine_weight W2 ``[E, F]``, refine_bias b2 ``[E]``.
        edge_norm_eps, bond_norm_eps: LayerNorm epsilons.
        backend: "auto" (default: cpp on CPU, triton on CUDA), "cpp", "triton" or "reference".
        precision: "fp32" (default), or "tf32" / "bf16" (Triton only; see the module docstring).
    Return:
        logits ``[B, N, N, K]``, contiguous, symmetric in (i, j).
    """
    inputs = (
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
    )
    check_inputs(*inputs)
    chosen = resolve_backend(backend, edge_feats.device)
    check_triton_precision("bond_head", precision, edge_feats.dtype, chosen)
    if chosen == "cpp":
        return _cpp_op()(*inputs, float(edge_norm_eps), float(bond_norm_eps))
    if chosen == "triton":
        return bond_head_triton(*inputs, float(edge_norm_eps), float(bond_norm_eps), precision)
    return bond_head_reference(*inputs, edge_norm_eps=edge_norm_eps, bond_norm_eps=bond_norm_eps)


def bond_head_reference(
    edge_feats,
    bond_norm_weight,
    bond_norm_bias,
    head_weight1,
    head_bias1,
    head_weight2,
    head_bias2,
    node_terms_i=None,
    node_terms_j=None,
    coords=None,
    edge_norm_weight=None,
    edge_norm_bias=None,
    edge_weight=None,
    dist_weight=None,
    dot_weight=None,
    refine_weight=None,
    refine_bias=None,
    edge_norm_eps: float = 1e-5,
    bond_norm_eps: float = 1e-5,
):
    """The definition, in plain PyTorch: every [B, N, N, ·] pair tensor is materialised."""
    E = edge_feats.size(-1)
    if node_terms_i is None:  # no BondRefine
        refined = edge_feats
    else:
        normed = F.layer_norm(edge_feats, (E,), edge_norm_weight, edge_norm_bias, edge_norm_eps)
        sq_dists = (
            (coords.unsqueeze(2) - coords.unsqueeze(1)).square().sum(dim=-1, keepdim=True)
        )  # ‖x_i − x_j‖²
        dots = (coords @ coords.transpose(1, 2)).unsqueeze(-1)  # x_i · x_j
        hidden = (
            normed @ edge_weight.T
            + node_terms_i.unsqueeze(2)
            + node_terms_j.unsqueeze(1)
            + sq_dists * dist_weight
            + dots * dot_weight
        )
        refined = F.silu(hidden) @ refine_weight.T + refine_bias
    r = F.layer_norm(refined, (E,), bond_norm_weight, bond_norm_bias, bond_norm_eps)
    s = r + r.transpose(1, 2)
    return (F.silu(s @ head_weight1.T + head_bias1) @ head_weight2.T + head_bias2).contiguous()


def check_inputs(
    edge_feats,
    bond_norm_weight,
    bond_norm_bias,
    head_weight1,
    head_bias1,
    head_weight2,
    head_bias2,
    node_terms_i=None,
    node_terms_j=None,
    coords=None,
    edge_norm_weight=None,
    edge_norm_bias=None,
    edge_weight=None,
    dist_weight=None,
    dot_weight=None,
    refine_weight=None,
    refine_bias=None,
):
    """Raise with a message naming the argument, the expectation and what arrived."""

    def check(name, tensor, shape):
        if (
            not torch.is_tensor(tensor)
            or tensor.dim() != len(shape)
            or any(want is not None and have != want for have, want in zip(tensor.shape, shape))
        ):
            got = f"shape {list(tensor.shape)}" if torch.is_tensor(tensor) else type(tensor).__name__
            expected = "[" + ", ".join("·" if want is None else str(want) for want in shape) + "]"
            raise ValueError(f"bond_head: {name} must have shape {expected}, got {got}")

    check("edge_feats", edge_feats, (None, None, None, None))
    B, N, N2, E = edge_feats.shape
    if B == 0 or N == 0:
        raise ValueError(f"bond_head: empty batch (edge_feats has shape {list(edge_feats.shape)})")
    check("edge_feats", edge_feats, (B, N, N, E))
    if E == 0:
        raise ValueError("bond_head: edge_feats has no channels (E = 0)")
    check("bond_norm_weight", bond_norm_weight, (E,))
    check("bond_norm_bias", bond_norm_bias, (E,))
    check("head_weight1", head_weight1, (None, E))
    G = head_weight1.size(0)
    check("head_bias1", head_bias1, (G,))
    check("head_weight2", head_weight2, (None, G))
    check("head_bias2", head_bias2, (head_weight2.size(0),))
    floats = [
        edge_feats,
        bond_norm_weight,
        bond_norm_bias,
        head_weight1,
        head_bias1,
        head_weight2,
        head_bias2,
    ]
    names = list(HEAD_ARGUMENTS)

    refine = (
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
    )
    missing = [name for name, t in zip(REFINE_ARGUMENTS, refine) if t is None]
    if missing and len(missing) < len(refine):
        raise ValueError(
            f"bond_head: the BondRefine arguments {list(REFINE_ARGUMENTS)} are given together or not "
            f"at all (None for a model without BondRefine); missing {missing}"
        )
    if not missing:
        check("node_terms_i", node_terms_i, (B, N, None))
        F_ = node_terms_i.size(2)
        check("node_terms_j", node_terms_j, (B, N, F_))
        check("coords", coords, (B, N, 3))
        check("edge_norm_weight", edge_norm_weight, (E,))
        check("edge_norm_bias", edge_norm_bias, (E,))
        check("edge_weight", edge_weight, (F_, E))
        check("dist_weight", dist_weight, (F_,))
        check("dot_weight", dot_weight, (F_,))
        check("refine_weight", refine_weight, (E, F_))
        check("refine_bias", refine_bias, (E,))
        floats += list(refine)
        names += list(REFINE_ARGUMENTS)

    dtype, device = edge_feats.dtype, edge_feats.device
    if dtype not in FLOAT_DTYPES:
        raise TypeError(f"bond_head: tensors must be float32 or float64, got {dtype}")
    for name, tensor in zip(names, floats):
        if tensor.dtype != dtype:
            raise TypeError(f"bond_head: {name} has dtype {tensor.dtype}, expected {dtype} like edge_feats")
        if tensor.device != device:
            raise ValueError(f"bond_head: {name} is on {tensor.device}, expected {device} like edge_feats")


def bond_head_flops(
    edge_feats_shape,
    bond_norm_weight_shape,
    bond_norm_bias_shape,
    head_weight1_shape,
    head_bias1_shape,
    head_weight2_shape,
    head_bias2_shape,
    node_terms_i_shape=None,
    *args,
    **kwargs,
) -> int:
    """Minimal FLOPs (2 per multiply-add) of the op, a torch.utils.flop_counter formula. Per ordered pair, the
    refinement's two linears (E·F + F·E) and its distance and dot terms (3 + 3 + 2F); per unordered pair (the head
    runs once per pair {i, j}, i = j included: N(N + 1)/2 per molecule) the head's two linears (E·G + G·K).
    LayerNorms, SiLU and the symmetrisation are not counted."""
    B, N, _, E = edge_feats_shape
    G, K = head_weight1_shape[0], head_weight2_shape[0]
    ordered = (
        0 if node_terms_i_shape is None else 2 * E * node_terms_i_shape[2] + 6 + 2 * node_terms_i_shape[2]
    )
    return 2 * B * (N * N * ordered + N * (N + 1) // 2 * (E * G + G * K))


def _bond_head_fake(
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
    edge_norm_eps,
    bond_norm_eps,
    precision="fp32",
):
    # Output shape, so torch.compile and torch.export can trace the op; the checks also run here because a
    # meta or fake input sends even the C++ op to this function instead of its kernel.
    check_inputs(
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
    )
    B, N, _, _ = edge_feats.shape
    return edge_feats.new_empty(B, N, N, head_weight2.size(0))


# Autograd by recomputation: the fused kernel only runs forward; the gradient is the reference's vector-Jacobian
# product, evaluated with torch.func so that it is itself traceable.
def _setup_context(ctx, inputs, output):
    ctx.inputs = inputs[: len(ARGUMENTS) + 2]  # the tensors and epsilons (not the Triton op's precision)
    ctx.n_inputs = len(inputs)


def _backward(ctx, grad):
    grads = recompute_vjp(bond_head_reference, ctx.inputs, len(ARGUMENTS), grad)
    return grads + (None,) * (ctx.n_inputs - len(grads))


def _cpp_op():
    """The C++ op, with fake and autograd registered once fastflow._C has defined it (schema in C++)."""
    return register_cpp_op("bond_head", _bond_head_fake, _backward, _setup_context)


bind_cpp_ops(_cpp_op)


# custom_op, not triton_op: see cache_forecast.py.
@torch.library.custom_op("fastflow::bond_head_triton", mutates_args=())
def bond_head_triton(
    edge_feats: torch.Tensor,
    bond_norm_weight: torch.Tensor,
    bond_norm_bias: torch.Tensor,
    head_weight1: torch.Tensor,
    head_bias1: torch.Tensor,
    head_weight2: torch.Tensor,
    head_bias2: torch.Tensor,
    node_terms_i: torch.Tensor | None,
    node_terms_j: torch.Tensor | None,
    coords: torch.Tensor | None,
    edge_norm_weight: torch.Tensor | None,
    edge_norm_bias: torch.Tensor | None,
    edge_weight: torch.Tensor | None,
    dist_weight: torch.Tensor | None,
    dot_weight: torch.Tensor | None,
    refine_weight: torch.Tensor | None,
    refine_bias: torch.Tensor | None,
    edge_norm_eps: float,
    bond_norm_eps: float,
    precision: str = "fp32",
) -> torch.Tensor:
    from fastflow.triton_kernels import bond_head as kernel  # lazy: importing fastflow never needs triton

    inputs = (
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
    )
    # Checked here too, not only in bond_head(): a kernel launched on wrong shapes reads out of bounds.
    check_inputs(*inputs)
    check_triton_precision("bond_head", precision, edge_feats.dtype, "triton")
    return kernel.bond_head(*inputs, edge_norm_eps, bond_norm_eps, precision)


bond_head_triton.register_fake(_bond_head_fake)
bond_head_triton.register_autograd(_backward, setup_context=_setup_context)
