"""Fused stand-ins for the Semla layer and feed-forward, reading the parameters of the modules they replace.

A fused module adopts the original module's children under the same names, so the model's ``state_dict`` keys
and parameter objects do not change when ``patch_model`` swaps it in, and training the patched model trains the
original parameters. It works for fastflow's Semla modules and for upstream SemlaFlow's classes of the same
names and structure (``EquiMessagePassingLayer``, ``NodeFeedForward``): only parameters are read, never their
``forward`` code.

- ``FusedNodeFeedForward``: CoordNorm, the invariant MLP on [h, |X_s|], and the equivariant MLP in rank-1 form
  (Σ_p W_sp a_p(h) · Σ_q Y_q, the sum upstream forms as a [B, 3, N, P, P] outer product).
- ``FusedSemlaLayer``: the feed-forward above, then one ``fastflow::semla_attention`` call for the pair messages
  and both attentions; only per-atom GEMMs stay in PyTorch.
- ``FusedBondRefine``: the bond-refinement MLP with its first linear split into per-atom GEMMs plus the per-pair
  distance, dot-product and edge terms (a [pairs, 2M + 2 + E] concatenation and product avoided).
- ``fused_semla_forward``: fastflow's generator forward with the whole pair tail (refinement, bond LayerNorm,
  symmetrisation, bond head) as one ``fastflow::bond_head`` call.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from fastflow.models.semla import length, zero_com
from fastflow.nn.precision import MatmulPrecision
from fastflow.ops.bond_head import bond_head
from fastflow.ops.semla_attention import semla_attention

LAYER_CHILDREN = ("node_ff", "message_ff", "coord_attn", "node_attn")
FEED_FORWARD_CHILDREN = ("node_norm", "coord_norm", "invariant_mlp", "equivariant_mlp")
BOND_REFINE_CHILDREN = ("coord_norm", "node_norm", "edge_norm", "node_proj", "message_mlp")


def coord_norm(module: nn.Module, coord_sets: torch.Tensor, node_mask: torch.Tensor) -> torch.Tensor:
    """CoordNorm's math from its parameters (``norm``, ``eps``, ``set_weights``), with sqrt(Σx²) lengths (upstream's
    ``vector_norm`` is several times slower on these short axes)."""
    mask = node_mask.unsqueeze(-1)
    coord_sets = zero_com(coord_sets, node_mask) * mask
    norm = module.norm or "none"
    if norm == "length":
        mean_length = length(coord_sets).sum(dim=-1, keepdim=True) / node_mask.sum(dim=-1, keepdim=True)
        coord_sets = coord_sets * module.set_weights / (mean_length.unsqueeze(-1) + module.eps)
    elif norm == "gvp":
        lengths = length(coord_sets, keepdim=True)
        coord_sets = (
            coord_sets * module.set_weights / ((lengths + module.eps) / math.sqrt(module.n_coord_sets))
        )
    else:
        coord_sets = coord_sets * module.set_weights
    return coord_sets * mask


def _adopt(fused: nn.Module, original: nn.Module, names: tuple[str, ...]) -> None:
    for name, child in original.named_children():
        fused.add_module(name, child)  # same objects, same names (extra children such as edge_feat_norm too)
    missing = [name for name in names if not hasattr(fused, name)]
    if missing:
        raise TypeError(f"{type(original).__name__} lacks the children {missing} of a Semla module")


class FusedNodeFeedForward(nn.Module):
    """``NodeFeedForward`` (returns the updates ΔX, Δh) from the original's parameters."""

    def __init__(self, original: nn.Module, precision: str = "fp32"):
        super().__init__()
        _adopt(self, original, FEED_FORWARD_CHILDREN)
        self.matmul = MatmulPrecision(precision)

    def forward(self, coord_sets, node_feats, node_mask):
        node_feats = self.node_norm(node_feats)
        coord_sets = coord_norm(self.coord_norm, coord_sets, node_mask)
        lengths = length(coord_sets).movedim(1, -1)  # [B, N, S]
        node_update = self.matmul(torch.cat((node_feats, lengths), dim=-1), self.invariant_mlp.node_ff)
        equi = self.equivariant_mlp
        a = equi.node_proj(node_feats)  # [B, N, P]
        u = torch.einsum("bsnk,s->bnk", coord_sets, equi.coord_proj.weight.sum(dim=0))  # Σ_q Y_q: [B, N, 3]
        coord_update = torch.einsum("bnp,bnk,sp->bsnk", a, u, equi.attn_proj.weight)
        return coord_update, node_update


class FusedSemlaLayer(nn.Module):
    """``EquiMessagePassingLayer`` with its pair work in one ``fastflow::semla_attention`` call."""

    def __init__(self, original: nn.Module, backend: str = "auto", precision: str = "fp32"):
        super().__init__()
        _adopt(self, original, LAYER_CHILDREN)
        self.node_ff = FusedNodeFeedForward(original.node_ff, precision)
        self.backend = backend
        self.matmul = MatmulPrecision(precision)
        self.d_edge_in = original.d_edge_in
        self.d_edge_out = original.d_edge_out
        self.n_attn_heads = original.n_attn_heads
        self.d_coord_message = original.d_coord_message
        self.d_message = original.message_ff.node_proj.out_features
        self._edge_embedding = ()  # (the generator's edge_in_proj,) once embed_edges_with() is called

    def embed_edges_with(self, embedding: nn.Sequential) -> None:
        """Take the raw edge input and embed it inside the op with ``embedding`` (Linear → SiLU → Linear): the
        [B, N, N, E] embedding is never materialised. Held outside the module tree: its parameters belong to the
        generator, and the state_dict must not list them twice."""
        if self.d_edge_in is None or self.d_edge_out is not None:
            raise ValueError("only an edge-reading layer that writes no edges can embed its edge input")
        self._edge_embedding = (embedding,)

    @property
    def embeds_edges(self) -> bool:
        return bool(self._edge_embedding)

    def forward(self, coords, node_feats, adj_matrix, node_mask, edge_feats=None):
        if (edge_feats is None) != (self.d_edge_in is None):
            raise ValueError(
                f"layer built with d_edge_in={self.d_edge_in} but edge_feats "
                f"{'missing' if edge_feats is None else 'given'}"
            )
        coord_update, node_update = self.node_ff(coords, node_feats, node_mask)
        coords = coords + coord_update
        node_feats = node_feats + node_update

        messages, node_attn, coord_attn = self.message_ff, self.node_attn, self.coord_attn
        M, S = self.d_message, coords.size(1)
        first, second = messages.message_mlp[0], messages.message_mlp[2]
        matmul = self.matmul
        m = matmul(messages.node_norm(node_feats), messages.node_proj)
        first_weight = matmul.weight(first.weight)  # the [m_i | m_j] column blocks feed two per-atom GEMMs
        node_terms_i = matmul.linear(m, first_weight[:, :M], matmul.weight(first.bias))
        node_terms_j = matmul.linear(m, first_weight[:, M : 2 * M])
        gram_coords = coord_norm(messages.coord_norm, coords, node_mask)
        values = matmul(node_attn.feat_norm(node_feats), node_attn.in_proj).unflatten(
            -1, (self.n_attn_heads, -1)
        )
        attn_coords = coord_attn.coord_proj(
            coord_norm(coord_attn.coord_norm, coords, node_mask).transpose(1, -1)
        )
        edge_args = (None,) * 8
        if edge_feats is not None:
            embed = (None,) * 4
            if self._edge_embedding:
                linear_a, linear_b = self._edge_embedding[0][0], self._edge_embedding[0][2]
                if edge_feats.size(-1) != linear_a.in_features:
                    raise ValueError(
                        f"this layer embeds its edge input: expected {linear_a.in_features} raw edge channels, "
                        f"got {edge_feats.size(-1)}"
                    )
                embed = (linear_a.weight, linear_a.bias, linear_b.weight, linear_b.bias)
            edge_args = (
                edge_feats,
                messages.edge_norm.weight,
                messages.edge_norm.bias,
                first.weight[:, 2 * M + S :],
                *embed,
            )
        node_agg, coord_agg, edge_out = semla_attention(
            node_terms_i,
            node_terms_j,
            gram_coords,
            first.weight[:, 2 * M : 2 * M + S],
            second.weight,
            second.bias,
            values,
            attn_coords.transpose(1, -1).contiguous(),
            adj_matrix != 0,
            *edge_args,
            edge_norm_eps=messages.edge_norm.eps if edge_feats is not None else 1e-5,
            coord_eps=coord_attn.eps,
            precision=matmul.precision,
            backend=self.backend,
        )
        node_feats = node_feats + matmul(node_agg, node_attn.out_proj)
        coords = coords + coord_attn.attn_proj(coord_agg.transpose(-1, -2)).permute(0, 3, 1, 2)

        if self.d_edge_out is None:
            return coords, node_feats
        return coords, node_feats, edge_out if edge_feats is None else edge_feats + edge_out

    def extra_repr(self) -> str:
        return f"backend={self.backend!r}, precision={self.matmul.precision!r}"


class FusedBondRefine(nn.Module):
    """``BondRefine``: MLP([m_i, m_j, |x_i − x_j|², x_i·x_j, LN(e_ij)]) with the first linear split by input block."""

    def __init__(self, original: nn.Module):
        super().__init__()
        _adopt(self, original, BOND_REFINE_CHILDREN)

    def forward(self, coords, node_feats, node_mask, edge_feats):
        if coords.dim() != 3:
            raise ValueError(
                f"BondRefine expects one coordinate set [B, N, 3], got shape {tuple(coords.shape)}"
            )
        coords = coord_norm(self.coord_norm, coords.unsqueeze(1), node_mask.unsqueeze(1)).squeeze(1)
        first, second = self.message_mlp[0], self.message_mlp[2]
        M = self.node_proj.out_features
        W_i, W_j, w_dist, w_dot, W_e = first.weight.split([M, M, 1, 1, first.in_features - 2 * M - 2], dim=1)
        m = self.node_proj(self.node_norm(node_feats))
        dots = coords @ coords.transpose(1, 2)
        sq_dists = (coords.unsqueeze(2) - coords.unsqueeze(1)).square().sum(dim=-1)
        # In place into one [B, N, N, hidden] buffer: the per-atom and per-pair terms broadcast into it, so the
        # pair-sized temporaries are the LayerNorm output and this buffer (the peak of a sampling forward).
        hidden = F.linear(self.edge_norm(edge_feats), W_e, first.bias)
        hidden += F.linear(m, W_i).unsqueeze(2)
        hidden += F.linear(m, W_j).unsqueeze(1)
        hidden.addcmul_(sq_dists.unsqueeze(-1), w_dist.squeeze(1))
        hidden.addcmul_(dots.unsqueeze(-1), w_dot.squeeze(1))
        return second(F.silu(hidden, inplace=not hidden.requires_grad))  # silu's backward needs its input


def fused_semla_forward(
    self,
    coords,
    inv_feats,
    edge_feats=None,
    cond_coords=None,
    cond_atomics=None,
    cond_bonds=None,
    atom_mask=None,
):
    """``Semla.forward`` with the pair tail fused, bound by ``patch_model`` to a fastflow ``Semla`` instance as its
    ``forward`` (a bound method: deepcopy rebinds it to the copy, torch.export reads its code): the generator's own
    embeddings and the dynamics' trunk (whose layers are the fused modules), then bond refinement, the bond
    LayerNorm, the symmetrisation and the bond head as one ``fastflow::bond_head`` call that writes only the
    ``[B, N, N, K]`` bond logits (the unfused tail holds about seven ``[B, N, N, E]`` tensors)."""
    atom_mask = self.check_inputs(
        coords, inv_feats, edge_feats, cond_coords, cond_atomics, cond_bonds, atom_mask
    )
    first_layer = self.dynamics.layers[0]
    inputs = self.dynamics_inputs(
        coords,
        inv_feats,
        edge_feats,
        cond_coords,
        cond_atomics,
        cond_bonds,
        atom_mask,
        embed_edges=not getattr(first_layer, "embeds_edges", False),
    )
    out_coords, feats, edges = self.dynamics.trunk(**inputs)
    # The backend and precision of the patched layers (patch_model plans this forward for cpp and triton only);
    # bond_head's tf32 / bf16 variants are Triton's, on CPUs the pair tail stays float32.
    layer = next((layer for layer in self.dynamics.layers if isinstance(layer, FusedSemlaLayer)), None)
    backend = "auto" if layer is None else layer.backend
    precision = layer.matmul.precision if backend == "triton" else "fp32"
    bond_logits = fused_bond_logits(
        self.dynamics,
        self.edge_out_proj,
        out_coords,
        feats,
        inputs["atom_mask"],
        edges,
        backend=backend,
        precision=precision,
    )
    return self.outputs(out_coords, self.dynamics.feat_norm(feats), bond_logits, inputs["atom_mask"])


def fused_bond_logits(
    dynamics: nn.Module,
    head: nn.Sequential,
    coords: torch.Tensor,
    feats: torch.Tensor,
    atom_mask: torch.Tensor,
    edge_feats: torch.Tensor,
    backend: str = "cpp",
    precision: str = "fp32",
) -> torch.Tensor:
    """Bond logits ``[B, N, N, K]`` = head(r_ij + r_ji), r = bond_norm(refine(e')), from the modules' parameters:
    the refinement's first linear split into per-atom GEMMs (a_i, c_j) and its distance, dot and edge columns."""
    first_head, second_head = head[0], head[2]
    args = dict(
        bond_norm_weight=dynamics.bond_norm.weight,
        bond_norm_bias=dynamics.bond_norm.bias,
        head_weight1=first_head.weight,
        head_bias1=first_head.bias,
        head_weight2=second_head.weight,
        head_bias2=second_head.bias,
        bond_norm_eps=dynamics.bond_norm.eps,
    )
    if dynamics.bond_refine:
        refine = dynamics.refine_layer
        first, second = refine.message_mlp[0], refine.message_mlp[2]
        M = refine.node_proj.out_features
        W_i, W_j, w_dist, w_dot, W_e = first.weight.split([M, M, 1, 1, first.in_features - 2 * M - 2], dim=1)
        m = refine.node_proj(refine.node_norm(feats))
        x = coord_norm(refine.coord_norm, coords.unsqueeze(1), atom_mask.unsqueeze(1)).squeeze(1)
        args.update(
            node_terms_i=F.linear(m, W_i, first.bias),
            node_terms_j=F.linear(m, W_j),
            coords=x,
            edge_norm_weight=refine.edge_norm.weight,
            edge_norm_bias=refine.edge_norm.bias,
            edge_weight=W_e,
            dist_weight=w_dist.squeeze(1),
            dot_weight=w_dot.squeeze(1),
            refine_weight=second.weight,
            refine_bias=second.bias,
            edge_norm_eps=refine.edge_norm.eps,
        )
    return bond_head(edge_feats, **args, backend=backend, precision=precision)
