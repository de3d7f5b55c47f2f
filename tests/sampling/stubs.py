"""Small models with SemlaGenerator's call signature for sampler tests."""

from types import SimpleNamespace

import torch
from torch import nn

from fastflow.chem.vocab import N_ATOM_TYPES, N_BOND_TYPES, N_CHARGE_TYPES


class StubModel(nn.Module):
    """Predicts x̂₁ = a fixed per-atom target and logits that depend only on each atom's own inputs, so it is
    exactly batch-independent; records every call. ``nan_at_step`` makes the call of that step return NaN."""

    def __init__(self, self_cond=False, max_atoms=32, nan_at_step=None):
        super().__init__()
        self.config = SimpleNamespace(self_cond=self_cond, max_atoms=max_atoms, coord_std=2.0)
        self.weight = nn.Parameter(torch.linspace(-1.0, 1.0, N_ATOM_TYPES + 1))
        self.nan_at_step = nan_at_step
        self.calls = []

    @staticmethod
    def target(n_atoms, dtype=torch.float32):
        """x̂₁ ``[n_atoms, 3]`` predicted for every molecule (zero-CoM not needed by the sampler)."""
        return torch.arange(3 * n_atoms, dtype=dtype).view(n_atoms, 3).sin()

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
        self.calls.append(
            dict(
                coords=coords,
                inv_feats=inv_feats,
                edge_feats=edge_feats,
                cond_coords=cond_coords,
                cond_atomics=cond_atomics,
                cond_bonds=cond_bonds,
                atom_mask=atom_mask,
            )
        )
        B, N, _ = coords.shape
        mask = atom_mask.to(coords.dtype).unsqueeze(-1)
        pred_coords = self.target(N, coords.dtype).expand(B, N, 3) * mask
        score = inv_feats @ self.weight  # [B, N]
        type_logits = score.unsqueeze(-1) * torch.linspace(0, 2, N_ATOM_TYPES)
        bond_logits = edge_feats * 3.0 + score.unsqueeze(-1).unsqueeze(-1)
        charge_logits = torch.zeros(B, N, N_CHARGE_TYPES).index_fill(-1, torch.tensor([0]), 5.0)
        if len(self.calls) - 1 == self.nan_at_step:
            pred_coords = pred_coords * float("nan")
        return pred_coords, type_logits, bond_logits.expand(B, N, N, N_BOND_TYPES), charge_logits
