"""The Semla architecture (SemlaFlow's generator), written from the mathematics in the notes.

Module names, parameter names and shapes — and each module's ``forward`` signature — are those of upstream
``semlaflow/models/semla.py``, so the EMA weights of a SemlaFlow checkpoint load unchanged, and a fused module
(``fastflow.nn``) can stand in for either implementation.

Letters: B batch, N atoms (padded), D d_model, M d_message, E d_edge, S coordinate sets, H heads, P projected
sets, V atom vocabulary. Coordinate sets are laid out ``[B, S, N, 3]`` (sets before atoms). Masks are 1 for real
atoms, 0 for padding; the graph is fully connected within a molecule, without self-loops.
"""

from __future__ import annotations

import copy
import math

import torch
from torch import nn

from fastflow.models.config import SemlaConfig

N_CHARGE_CLASSES = 7  # fixed upstream: {0, +1, +2, +3, -1, -2, -3}


# ---------------------------------------------------------------------------------------------------------------
# Functional helpers
# ---------------------------------------------------------------------------------------------------------------


def zero_com(coords: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Subtract the centre of mass over real atoms. coords ``[..., N, 3]``, mask ``[..., N]``."""
    n_atoms = mask.sum(dim=-1)
    com = (coords * mask.unsqueeze(-1)).sum(dim=-2) / n_atoms.unsqueeze(-1)
    return coords - com.unsqueeze(-2)


def adjacency_from_mask(atom_mask: torch.Tensor) -> torch.Tensor:
    """Fully connected graph between real atoms, no self-loops: ``[B, N, N]`` (long, 0/1)."""
    mask = atom_mask.float()
    adjacency = (mask.unsqueeze(2) * mask.unsqueeze(1)).long()
    adjacency.diagonal(dim1=1, dim2=2).zero_()
    return adjacency


def attention_mask(adj_matrix: torch.Tensor) -> torch.Tensor:
    """Additive mask: 0 on edges, -inf elsewhere; rows without any edge (padding atoms) stay 0 so that their
    softmax is finite (its values are discarded)."""
    mask = torch.zeros_like(adj_matrix, dtype=torch.get_default_dtype())
    mask = mask.masked_fill(adj_matrix == 0, float("-inf"))
    isolated = adj_matrix.sum(dim=-1) == 0
    return mask.masked_fill(isolated.unsqueeze(-1), 0.0)


def length(vectors: torch.Tensor, dim: int = -1, keepdim: bool = False) -> torch.Tensor:
    """Euclidean length along ``dim`` (3 components). sqrt(Σx²) rather than ``linalg.vector_norm``, which is
    several times slower on CPU for these short, often strided, axes.

    Under autograd, zero vectors (padding atoms, i = j differences) get a zero gradient, as with
    ``vector_norm``: the plain sqrt'(0) = inf would turn 0 · inf into NaN gradients."""
    squared = vectors.square().sum(dim=dim, keepdim=keepdim)
    if not squared.requires_grad:
        return squared.sqrt()
    return torch.where(squared > 0, squared.clamp_min(torch.finfo(squared.dtype).tiny).sqrt(), 0.0)


def mlp(d_in: int, d_hidden: int, d_out: int) -> nn.Sequential:
    """Linear → SiLU → Linear (upstream's indices 0 and 2 hold the weights)."""
    return nn.Sequential(nn.Linear(d_in, d_hidden), nn.SiLU(), nn.Linear(d_hidden, d_out))


def set_linear(coord_sets: torch.Tensor, linear: nn.Linear) -> torch.Tensor:
    """Bias-free linear map across coordinate sets: ``[B, S, N, 3] -> [B, S', N, 3]`` (equivariant)."""
    return linear(coord_sets.transpose(1, -1)).transpose(1, -1)


# ---------------------------------------------------------------------------------------------------------------
# Building blocks
# ---------------------------------------------------------------------------------------------------------------


class CoordNorm(nn.Module):
    """Per-molecule, per-set coordinate normalisation.

    Centre over real atoms, then ``"length"``: divide by the mean length over real atoms (+eps); ``"gvp"``: divide
    each vector by its own length / sqrt(S); ``"none"``: no division. Finally scale by a learned weight per set.
    """

    def __init__(self, n_coord_sets: int, norm: str = "length", eps: float = 1e-6):
        super().__init__()
        norm = "none" if norm is None else norm
        if norm not in ("none", "gvp", "length"):
            raise ValueError(f"unknown coordinate normalisation {norm!r}; expected 'none', 'gvp' or 'length'")
        self.n_coord_sets = n_coord_sets
        self.norm = norm
        self.eps = eps
        self.set_weights = nn.Parameter(torch.ones(1, n_coord_sets, 1, 1))

    def forward(self, coord_sets: torch.Tensor, node_mask: torch.Tensor) -> torch.Tensor:
        """coord_sets ``[B, S, N, 3]``, node_mask ``[B, S, N]`` → ``[B, S, N, 3]``."""
        mask = node_mask.unsqueeze(-1)
        coord_sets = zero_com(coord_sets, node_mask) * mask
        if self.norm == "length":
            mean_length = length(coord_sets, dim=-1).sum(dim=-1, keepdim=True)
            mean_length = mean_length / node_mask.sum(dim=-1, keepdim=True)
            coord_sets = coord_sets * self.set_weights / (mean_length.unsqueeze(-1) + self.eps)
        elif self.norm == "gvp":
            lengths = length(coord_sets, dim=-1, keepdim=True)
            coord_sets = coord_sets * self.set_weights / ((lengths + self.eps) / math.sqrt(self.n_coord_sets))
        else:
            coord_sets = coord_sets * self.set_weights
        return coord_sets * mask


class EdgeMessages(nn.Module):
    """Pair messages: MLP over [m_i, m_j, G_ij (, LN(e_ij))] with m = W·LN(h) and G_ij the per-set Gram entries.

    Channels of the output: [0:H] node-attention logits, [H:H+S] coordinate-attention logits, the rest
    (out layer only) edge features. There is no query·key product: the logits come from this MLP.
    """

    def __init__(self, d_model, d_message, d_out, n_coord_sets, d_ff=None, d_edge=None, eps=1e-6):
        super().__init__()
        d_ff = d_out if d_ff is None else d_ff
        d_pair = 2 * d_message + n_coord_sets + (0 if d_edge is None else d_edge)
        self.n_coord_sets = n_coord_sets
        self.d_edge = d_edge
        self.eps = eps
        self.coord_norm = CoordNorm(n_coord_sets, norm="none")
        self.node_norm = nn.LayerNorm(d_model)
        self.edge_norm = nn.LayerNorm(d_edge) if d_edge is not None else None
        self.node_proj = nn.Linear(d_model, d_message)
        self.message_mlp = mlp(d_pair, d_ff, d_out)

    def forward(self, coords, node_feats, node_mask, edge_feats=None):
        """coords ``[B,S,N,3]``, node_feats ``[B,N,D]``, node_mask ``[B,S,N]``, edge_feats ``[B,N,N,E]`` →
        messages ``[B,N,N,d_out]``."""
        if (edge_feats is None) != (self.d_edge is None):
            raise ValueError(
                f"EdgeMessages built with d_edge={self.d_edge} but edge_feats "
                f"{'missing' if edge_feats is None else 'given'}"
            )
        B, N, _ = node_feats.shape
        coords = self.coord_norm(coords, node_mask)
        gram = (coords @ coords.transpose(-1, -2)).movedim(1, -1)  # G_ij per set: [B, N, N, S]
        m = self.node_proj(self.node_norm(node_feats))
        pair = [m.unsqueeze(2).expand(B, N, N, -1), m.unsqueeze(1).expand(B, N, N, -1), gram]
        if edge_feats is not None:
            pair.append(self.edge_norm(edge_feats))
        return self.message_mlp(torch.cat(pair, dim=-1))


class NodeAttention(nn.Module):
    """o_i^h = sqrt(Σ_j α_ij^h²) · Σ_j α_ij^h v_j^h with α = softmax_j(logits + mask), v = W·LN(h); then a linear.

    The sqrt(Σα²) factor is the GNN-VPA variance-preserving rescale.
    """

    def __init__(self, d_model, n_attn_heads, d_attn=None):
        super().__init__()
        d_attn = d_model if d_attn is None else d_attn
        if d_attn % n_attn_heads:
            raise ValueError(f"n_attn_heads={n_attn_heads} must divide d_attn={d_attn}")
        self.d_model = d_model
        self.d_attn = d_attn
        self.n_attn_heads = n_attn_heads
        self.d_head = d_model // n_attn_heads
        self.feat_norm = nn.LayerNorm(d_model)
        self.in_proj = nn.Linear(d_model, d_attn)
        self.out_proj = nn.Linear(d_attn, d_model)

    def forward(self, node_feats, messages, adj_matrix):
        """node_feats ``[B,N,D]``, messages ``[B,N,N,H]`` (logits), adj_matrix ``[B,N,N]`` → update ``[B,N,D]``."""
        alpha = torch.softmax(messages + attention_mask(adj_matrix).unsqueeze(-1), dim=2)  # over j
        values = self.in_proj(self.feat_norm(node_feats)).unflatten(-1, (self.n_attn_heads, self.d_head))
        out = torch.einsum("bijh,bjhd->bihd", alpha, values)
        out = out * alpha.square().sum(dim=2).sqrt().unsqueeze(-1)
        return self.out_proj(out.flatten(2))


class CoordAttention(nn.Module):
    """ΔX_s = mix(sqrt(Σ_j β_ij,s²) · Σ_j β_ij,s · d̂_ij,s), d̂ the unit difference of set-mixed normalised coords.

    β = softmax_j(logits + mask) per coordinate set; only invariant weights times unit vectors, and bias-free
    set mixing, so the update is equivariant.
    """

    def __init__(self, n_coord_sets, proj_sets=None, coord_norm="length", eps=1e-6):
        super().__init__()
        proj_sets = n_coord_sets if proj_sets is None else proj_sets
        self.eps = eps
        self.coord_norm = CoordNorm(n_coord_sets, norm=coord_norm)
        self.coord_proj = nn.Linear(n_coord_sets, proj_sets, bias=False)
        self.attn_proj = nn.Linear(proj_sets, n_coord_sets, bias=False)

    def forward(self, coord_sets, messages, adj_matrix, node_mask):
        """coord_sets ``[B,S,N,3]``, messages ``[B,N,N,P]``, adj ``[B,N,N]``, node_mask ``[B,S,N]`` → ``[B,S,N,3]``."""
        proj = self.coord_proj(self.coord_norm(coord_sets, node_mask).transpose(1, -1))  # [B, 3, N, P]
        diffs = proj.unsqueeze(3) - proj.unsqueeze(2)  # x_i - x_j: [B, 3, N, N, P]
        unit_diffs = diffs / (length(diffs, dim=1, keepdim=True) + self.eps)
        beta = torch.softmax(messages + attention_mask(adj_matrix).unsqueeze(-1), dim=2)  # [B, N, N, P]
        update = (unit_diffs * beta.unsqueeze(1)).sum(dim=3)
        update = update * beta.square().sum(dim=2).sqrt().unsqueeze(1)
        return self.attn_proj(update).transpose(1, -1)


class LengthsMLP(nn.Module):
    """Invariant feed-forward: Δh = MLP([h, ‖X_s‖ for each set s]) (inputs already normalised)."""

    def __init__(self, d_model, n_coord_sets, d_ff=None):
        super().__init__()
        d_ff = 4 * d_model if d_ff is None else d_ff
        self.node_ff = mlp(d_model + n_coord_sets, d_ff, d_model)

    def forward(self, coord_sets, node_feats):
        lengths = length(coord_sets, dim=-1).movedim(1, -1)  # [B, N, S]
        return self.node_ff(torch.cat((node_feats, lengths), dim=-1))


class EquivariantMLP(nn.Module):
    """Equivariant feed-forward: ΔX_s,i = Σ_p W_sp a_p(h_i) · u_i with u_i = Σ_q Y_q,i, Y = coord_proj(X).

    Upstream forms the outer product a ⊗ Y ``[B,3,N,P,P]`` and sums its last axis; that sum is the rank-1
    a_p · Σ_q Y_q, computed here directly. Σ_q Y_q = Σ_s (Σ_q W_qs) X_s needs only the column sums of W.
    """

    def __init__(self, d_model, n_coord_sets, proj_sets=None):
        super().__init__()
        proj_sets = n_coord_sets if proj_sets is None else proj_sets
        self.node_proj = mlp(d_model, proj_sets, proj_sets)
        self.coord_proj = nn.Linear(n_coord_sets, proj_sets, bias=False)
        self.attn_proj = nn.Linear(proj_sets, n_coord_sets, bias=False)

    def forward(self, coord_sets, node_feats):
        a = self.node_proj(node_feats)  # [B, N, P]
        u = coord_sets.transpose(1, -1) @ self.coord_proj.weight.sum(dim=0)  # Σ_q Y_q: [B, 3, N]
        return self.attn_proj(a.unsqueeze(1) * u.unsqueeze(-1)).transpose(1, -1)


class NodeFeedForward(nn.Module):
    """Pre-norm feed-forward on both streams; returns the updates (ΔX, Δh)."""

    def __init__(self, d_model, n_coord_sets, d_ff=None, proj_sets=None, coord_norm="length"):
        super().__init__()
        self.node_norm = nn.LayerNorm(d_model)
        self.coord_norm = CoordNorm(n_coord_sets, norm=coord_norm)
        self.invariant_mlp = LengthsMLP(d_model, n_coord_sets, d_ff=d_ff)
        self.equivariant_mlp = EquivariantMLP(d_model, n_coord_sets, proj_sets=proj_sets)

    def forward(self, coord_sets, node_feats, node_mask):
        node_feats = self.node_norm(node_feats)
        coord_sets = self.coord_norm(coord_sets, node_mask)
        return self.equivariant_mlp(coord_sets, node_feats), self.invariant_mlp(coord_sets, node_feats)


class BondRefine(nn.Module):
    """Bond-only message layer on the final single coordinate set: MLP([m_i, m_j, ‖x_i−x_j‖², x_i·x_j, LN(e_ij)])."""

    def __init__(self, d_model, d_message, d_edge, d_ff=None):
        super().__init__()
        d_ff = d_message if d_ff is None else d_ff
        self.coord_norm = CoordNorm(1, norm="none")
        self.node_norm = nn.LayerNorm(d_model)
        self.edge_norm = nn.LayerNorm(d_edge)
        self.node_proj = nn.Linear(d_model, d_message)
        self.message_mlp = mlp(2 * d_message + 2 + d_edge, d_ff, d_edge)

    def forward(self, coords, node_feats, node_mask, edge_feats):
        """coords ``[B,N,3]``, node_feats ``[B,N,D]``, node_mask ``[B,N]``, edge_feats ``[B,N,N,E]`` → ``[B,N,N,E]``."""
        if coords.dim() != 3:
            raise ValueError(
                f"BondRefine expects one coordinate set [B, N, 3], got shape {tuple(coords.shape)}"
            )
        B, N, _ = node_feats.shape
        coords = self.coord_norm(coords.unsqueeze(1), node_mask.unsqueeze(1)).squeeze(1)
        diffs = coords.unsqueeze(2) - coords.unsqueeze(1)
        sq_dists = (diffs * diffs).sum(dim=-1, keepdim=True)
        dots = (coords @ coords.transpose(1, 2)).unsqueeze(-1)
        m = self.node_proj(self.node_norm(node_feats))
        pair = (
            m.unsqueeze(2).expand(B, N, N, -1),
            m.unsqueeze(1).expand(B, N, N, -1),
            sq_dists,
            dots,
            self.edge_norm(edge_feats),
        )
        return self.message_mlp(torch.cat(pair, dim=-1))


# ---------------------------------------------------------------------------------------------------------------
# The Semla layer and the stack
# ---------------------------------------------------------------------------------------------------------------


class EquiMessagePassingLayer(nn.Module):
    """One Semla layer: feed-forward → edge messages (on the updated X, h) → node and coordinate attention.

    ``d_edge_in``: the layer reads edge features in its message MLP (first layer). ``d_edge_out``: the message
    MLP also emits E edge channels, returned as a third output (last layer).
    """

    def __init__(
        self,
        d_model,
        d_message,
        n_coord_sets,
        n_attn_heads=None,
        d_message_hidden=None,
        d_edge_in=None,
        d_edge_out=None,
        coord_norm="length",
        eps=1e-6,
    ):
        super().__init__()
        n_attn_heads = d_message if n_attn_heads is None else n_attn_heads
        if d_model % n_attn_heads:
            raise ValueError(f"n_attn_heads={n_attn_heads} must divide d_model={d_model}")
        self.d_model = d_model
        self.d_message = d_message
        self.n_coord_sets = n_coord_sets
        self.n_attn_heads = n_attn_heads
        self.d_message_hidden = d_message_hidden
        self.d_edge_in = d_edge_in
        self.d_edge_out = d_edge_out
        self.d_coord_message = n_coord_sets
        self.eps = eps

        d_message_out = n_attn_heads + n_coord_sets + (d_edge_out or 0)
        if d_edge_in is not None:
            # Unused in forward, as upstream (EdgeMessages has its own edge_norm); kept so checkpoints load.
            self.edge_feat_norm = nn.LayerNorm(d_edge_in)
        self.node_ff = NodeFeedForward(
            d_model, n_coord_sets, d_ff=4 * d_model, proj_sets=d_message, coord_norm=coord_norm
        )
        self.message_ff = EdgeMessages(
            d_model, d_message, d_message_out, n_coord_sets, d_ff=d_message_hidden, d_edge=d_edge_in, eps=eps
        )
        self.coord_attn = CoordAttention(n_coord_sets, n_coord_sets, coord_norm=coord_norm, eps=eps)
        self.node_attn = NodeAttention(d_model, n_attn_heads, d_attn=d_model)

    def forward(self, coords, node_feats, adj_matrix, node_mask, edge_feats=None):
        """coords ``[B,S,N,3]``, node_feats ``[B,N,D]``, adj ``[B,N,N]``, node_mask ``[B,S,N]``, edge_feats
        ``[B,N,N,E]`` → (coords, node_feats) or, with ``d_edge_out``, (coords, node_feats, edge_out)."""
        if (edge_feats is None) != (self.d_edge_in is None):
            raise ValueError(
                f"layer built with d_edge_in={self.d_edge_in} but edge_feats "
                f"{'missing' if edge_feats is None else 'given'}"
            )
        coord_update, node_update = self.node_ff(coords, node_feats, node_mask)
        coords = coords + coord_update
        node_feats = node_feats + node_update

        messages = self.message_ff(coords, node_feats, node_mask, edge_feats=edge_feats)
        H, S = self.n_attn_heads, self.d_coord_message
        node_feats = node_feats + self.node_attn(node_feats, messages[..., :H], adj_matrix)
        coords = coords + self.coord_attn(coords, messages[..., H : H + S], adj_matrix, node_mask)

        if self.d_edge_out is None:
            return coords, node_feats
        edge_out = messages[..., H + S :]
        return coords, node_feats, edge_out if edge_feats is None else edge_feats + edge_out


class EquiInvDynamics(nn.Module):
    """The layer stack: [in layer (reads edges)] + core layers + [out layer (writes edges)], a final feed-forward
    that *replaces* both streams, a coordinate head S→1 and BondRefine on the resulting single set."""

    def __init__(
        self,
        d_model,
        d_message,
        n_coord_sets,
        n_layers,
        n_attn_heads=None,
        d_message_hidden=None,
        d_edge=None,
        bond_refine=True,
        self_cond=False,
        coord_norm="length",
        eps=1e-6,
    ):
        super().__init__()
        if d_edge is None:
            raise ValueError("d_edge=None (a Semla stack without bond features) is not supported by fastflow")
        if n_layers < 2:
            raise ValueError(
                f"n_layers={n_layers} is too small: the stack needs an edge-in and an edge-out layer"
            )
        self.d_model = d_model
        self.n_coord_sets = n_coord_sets
        self.d_edge = d_edge
        self.bond_refine = bond_refine
        self.self_cond = self_cond

        def layer(**edges):
            return EquiMessagePassingLayer(
                d_model,
                d_message,
                n_coord_sets,
                n_attn_heads=n_attn_heads,
                coord_norm=coord_norm,
                eps=eps,
                **edges,
            )

        core = layer(d_message_hidden=d_message_hidden)
        # In/out layers get d_message_hidden=None: their hidden width is their output width (upstream).
        layers = [layer(d_edge_in=d_edge)] + [copy.deepcopy(core) for _ in range(n_layers - 2)]
        self.layers = nn.ModuleList(layers + [layer(d_edge_out=d_edge)])

        self.final_ff_block = NodeFeedForward(d_model, n_coord_sets, coord_norm=coord_norm)
        self.coord_norm = CoordNorm(n_coord_sets, norm=coord_norm)
        self.feat_norm = nn.LayerNorm(d_model)
        self.coord_proj = nn.Linear(2 if self_cond else 1, n_coord_sets, bias=False)
        self.coord_head = nn.Linear(n_coord_sets, 1, bias=False)
        self.bond_norm = nn.LayerNorm(d_edge)
        if bond_refine:
            self.refine_layer = BondRefine(d_model, d_message, d_edge)

    def forward(self, coords, inv_feats, adj_matrix, atom_mask=None, edge_feats=None, cond_coords=None):
        """coords ``[B,N,3]``, inv_feats ``[B,N,D]``, adj ``[B,N,N]``, atom_mask ``[B,N]``, edge_feats
        ``[B,N,N,E]``, cond_coords ``[B,N,3]`` → (coords ``[B,N,3]``, feats ``[B,N,D]``, edges ``[B,N,N,E]``)."""
        out_coords, inv_feats, edge_feats = self.trunk(
            coords, inv_feats, adj_matrix, atom_mask, edge_feats, cond_coords
        )
        if self.bond_refine:
            edge_feats = self.refine_layer(out_coords, inv_feats, atom_mask, edge_feats)
        return out_coords, self.feat_norm(inv_feats), self.bond_norm(edge_feats)

    def trunk(self, coords, inv_feats, adj_matrix, atom_mask=None, edge_feats=None, cond_coords=None):
        """Everything but the pair tail (bond refinement and the bond LayerNorm): (coords ``[B,N,3]``, features
        ``[B,N,D]`` before the final LayerNorm, the last layer's edge features ``[B,N,N,E]``). A fused tail
        (``fastflow.nn.semla.FusedSemlaForward``) continues from here."""
        if (cond_coords is None) == self.self_cond:
            raise ValueError(
                f"dynamics built with self_cond={self.self_cond} but cond_coords "
                f"{'missing' if cond_coords is None else 'given'}"
            )
        # Bias-free mix of (x_t, x̂₁ of the previous step) into S equivariant coordinate sets.
        stacked = coords.unsqueeze(-1) if cond_coords is None else torch.stack((coords, cond_coords), dim=-1)
        node_mask = atom_mask.unsqueeze(1).expand(-1, self.n_coord_sets, -1)
        coord_sets = self.coord_proj(stacked).movedim(-1, 1) * node_mask.unsqueeze(-1)

        for layer in self.layers:
            out = layer(coord_sets, inv_feats, adj_matrix, node_mask, edge_feats=edge_feats)
            coord_sets, inv_feats = out[:2]
            edge_feats = out[2] if len(out) == 3 else None  # edges skip the core layers

        coord_sets, inv_feats = self.final_ff_block(coord_sets, inv_feats, node_mask)
        out_coords = set_linear(self.coord_norm(coord_sets, node_mask), self.coord_head).squeeze(1)
        return out_coords, inv_feats, edge_feats


# ---------------------------------------------------------------------------------------------------------------
# The generator
# ---------------------------------------------------------------------------------------------------------------


class Semla(nn.Module):
    """SemlaFlow's generator (upstream ``SemlaGenerator``): embeddings, the Semla stack and the output heads.

    ``forward`` has upstream's signature and returns ``(coords x̂₁ [B,N,3], type_logits [B,N,V],
    bond_logits [B,N,N,K_b], charge_logits [B,N,7])``. Inputs (coordinates scaled by ``config.coord_std``):

    - coords ``[B,N,3]``; inv_feats ``[B,N,1+V]`` = (t, one-hot atom type); edge_feats ``[B,N,N,K_b]`` one-hot
      bond types for all pairs;
    - self-conditioning (when ``config.self_cond``): cond_coords ``[B,N,3]``, cond_atomics ``[B,N,V]`` and
      cond_bonds ``[B,N,N,K_b]`` probabilities of the previous step (zeros at the first step);
    - atom_mask ``[B,N]``: 1 for real atoms (bool, int or float).
    """

    def __init__(self, config: SemlaConfig | None = None):
        super().__init__()
        config = SemlaConfig.preset("semlaflow") if config is None else config
        self.config = config
        self.self_cond = config.self_cond
        V, E, K = config.vocab_size, config.d_edge, config.n_edge_types

        self.edge_in_proj = mlp(2 * K if config.self_cond else K, E, E)
        self.edge_out_proj = mlp(E, E, K)
        self.size_emb = nn.Embedding(config.max_atoms, config.size_emb)
        d_atom_in = config.n_atom_feats + config.size_emb + (V if config.self_cond else 0)
        self.feat_proj = mlp(d_atom_in, config.d_model, config.d_model)
        self.dynamics = EquiInvDynamics(
            config.d_model,
            config.d_message,
            config.n_coord_sets,
            config.n_layers,
            n_attn_heads=config.n_attn_heads,
            d_message_hidden=config.d_message_hidden,
            d_edge=E,
            bond_refine=config.bond_refine,
            self_cond=config.self_cond,
            coord_norm=config.coord_norm,
            eps=config.eps,
        )
        self.atom_classifier_head = mlp(config.d_model, config.d_model, V)
        self.charge_classifier_head = mlp(config.d_model, config.d_model, N_CHARGE_CLASSES)
        self.reset_parameters()

    def reset_parameters(self):
        """Upstream's initialisation: default PyTorch init, then Xavier-uniform on every parameter with more than
        one dimension (embeddings and the per-set CoordNorm weights included)."""
        for parameter in self.parameters():
            if parameter.dim() > 1:
                nn.init.xavier_uniform_(parameter)

    def forward(
        self,
        coords,
        inv_feats,
        edge_feats=None,
        cond_coords=None,
        cond_atomics=None,
        cond_bonds=None,
        atom_mask=None,
    ):
        atom_mask = self.check_inputs(
            coords, inv_feats, edge_feats, cond_coords, cond_atomics, cond_bonds, atom_mask
        )
        dynamics_inputs = self.dynamics_inputs(
            coords, inv_feats, edge_feats, cond_coords, cond_atomics, cond_bonds, atom_mask
        )
        pred_coords, pred_feats, pred_edges = self.dynamics(**dynamics_inputs)
        # Symmetrise the pair features so that bond (i, j) and (j, i) get the same logits.
        bond_logits = self.edge_out_proj(pred_edges + pred_edges.transpose(1, 2))
        return self.outputs(pred_coords, pred_feats, bond_logits, dynamics_inputs["atom_mask"])

    def dynamics_inputs(
        self,
        coords,
        inv_feats,
        edge_feats,
        cond_coords,
        cond_atomics,
        cond_bonds,
        atom_mask,
        embed_edges=True,
    ) -> dict:
        """The embeddings the dynamics read (checked inputs, ``atom_mask`` as returned by :meth:`check_inputs`):
        keyword arguments of ``self.dynamics`` (and of its ``trunk``). ``embed_edges=False`` leaves the edge input
        raw ([bonds | self-conditioning bonds], not through ``edge_in_proj``), for a first layer that embeds it
        itself (``fastflow.nn.semla.FusedSemlaLayer``)."""
        n_atoms = atom_mask.sum(dim=-1).long()
        size_emb = self.size_emb(n_atoms).unsqueeze(1).expand(-1, coords.size(1), -1)
        atom_in = [inv_feats, size_emb] + ([cond_atomics] if self.self_cond else [])
        atom_feats = self.feat_proj(torch.cat(atom_in, dim=-1))
        edge_in = torch.cat(
            [edge_feats.to(atom_feats.dtype)] + ([cond_bonds] if self.self_cond else []), dim=-1
        )
        return {
            "coords": coords,
            "inv_feats": atom_feats,
            "adj_matrix": adjacency_from_mask(atom_mask),
            "atom_mask": atom_mask.to(coords.dtype),
            "edge_feats": self.edge_in_proj(edge_in) if embed_edges else edge_in,
            "cond_coords": cond_coords if self.self_cond else None,
        }

    def outputs(self, pred_coords, pred_feats, bond_logits, mask):
        """(x̂₁ with zero centre of mass over real atoms, type logits, bond logits, charge logits)."""
        pred_coords = zero_com(pred_coords, mask) * mask.unsqueeze(-1)
        return (
            pred_coords,
            self.atom_classifier_head(pred_feats),
            bond_logits,
            self.charge_classifier_head(pred_feats),
        )

    def check_inputs(
        self,
        coords,
        inv_feats,
        edge_feats=None,
        cond_coords=None,
        cond_atomics=None,
        cond_bonds=None,
        atom_mask=None,
    ):
        """Clear errors for malformed inputs (``forward``'s signature); returns the atom mask (all ones when not
        given). Public so that wrappers that may not run ``forward`` (the cache on a forecast step) check the
        same things."""
        config = self.config
        if not torch.is_tensor(coords) or coords.dim() != 3 or coords.size(-1) != 3:
            raise ValueError(f"coords must be a [B, N, 3] tensor, got {_describe(coords)}")
        B, N, _ = coords.shape
        if B == 0 or N == 0:
            raise ValueError(f"empty batch: coords has shape {tuple(coords.shape)}")
        if not coords.is_floating_point():
            raise TypeError(f"coords must be floating point, got {coords.dtype}")
        param = self.feat_proj[0].weight
        expected = {
            "inv_feats": (inv_feats, (B, N, config.n_atom_feats)),
            "edge_feats": (edge_feats, (B, N, N, config.n_edge_types)),
        }
        if self.self_cond:
            expected.update(
                {
                    "cond_coords": (cond_coords, (B, N, 3)),
                    "cond_atomics": (cond_atomics, (B, N, config.vocab_size)),
                    "cond_bonds": (cond_bonds, (B, N, N, config.n_edge_types)),
                }
            )
        else:
            given = [
                name
                for name, t in (
                    ("cond_coords", cond_coords),
                    ("cond_atomics", cond_atomics),
                    ("cond_bonds", cond_bonds),
                )
                if t is not None
            ]
            if given:
                raise ValueError(f"{given} given but the model was built with self_cond=False")
        for name, (tensor, shape) in expected.items():
            if tensor is None:
                raise ValueError(f"{name} is required (expected shape {list(shape)})")
            if tuple(tensor.shape) != shape:
                raise ValueError(f"{name} must have shape {list(shape)}, got {list(tensor.shape)}")
        for name, tensor in [("coords", coords)] + [(k, v[0]) for k, v in expected.items()]:
            if tensor.device != param.device:
                raise ValueError(f"{name} is on {tensor.device} but the model is on {param.device}")
            if tensor.is_floating_point() and tensor.dtype != param.dtype:
                raise TypeError(
                    f"{name} has dtype {tensor.dtype} but the model's parameters are {param.dtype}"
                )
            if tensor.is_floating_point():
                _require(torch.isfinite(tensor).all(), f"{name} contains NaN or inf values")

        if atom_mask is None:
            return torch.ones(B, N, dtype=coords.dtype, device=coords.device)
        if tuple(atom_mask.shape) != (B, N):
            raise ValueError(f"atom_mask must have shape {[B, N]}, got {list(atom_mask.shape)}")
        if atom_mask.device != param.device:
            raise ValueError(f"atom_mask is on {atom_mask.device} but the model is on {param.device}")
        _require(
            ((atom_mask == 0) | (atom_mask == 1)).all(), "atom_mask must contain only 0/1 (or False/True)"
        )
        n_atoms = atom_mask.sum(dim=-1)
        _require(
            (n_atoms > 0).all(),
            lambda: (
                f"molecules {torch.nonzero(n_atoms == 0).flatten().tolist()} of "
                "the batch have no real atoms (all-padding rows)"
            ),
        )
        _require(
            (n_atoms < config.max_atoms).all(),
            lambda: (
                f"a molecule has {int(n_atoms.max())} atoms; this model embeds sizes up to max_atoms-1 = "
                f"{config.max_atoms - 1}"
            ),
        )
        return atom_mask


def _require(condition: torch.Tensor, message) -> None:
    """A check of the input values (``condition``: a bool tensor; ``message``: a string, or a function making it
    from the data). Eager: a ValueError. Under torch.compile / torch.export: an assertion inside the graph
    (``torch._assert_async``) instead of a data-dependent branch, so a compiled or exported model keeps the
    check without a graph break (it raises a RuntimeError with the message; on CUDA, a device-side assert)."""
    if torch.compiler.is_compiling():
        torch._assert_async(condition, message if isinstance(message, str) else "invalid model input")
    elif not bool(condition):
        raise ValueError(message if isinstance(message, str) else message())


def _describe(value) -> str:
    if torch.is_tensor(value):
        return f"tensor of shape {list(value.shape)} ({value.dtype})"
    return type(value).__name__
