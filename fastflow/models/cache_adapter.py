"""Semla's side of the cache contract (:class:`fastflow.cache.adapter.ModelAdapter`): where a call of a
SemlaGenerator-style model keeps what the cache reads. ``patch_model`` passes it to the cache hook.

The call is the sampler's (``fastflow.sampling.model_step``): ``model(coords [B, N, 3], inv_feats [B, N, 1 + F]
with the solver time in channel 0, ..., atom_mask [B, N])``. Upstream's SemlaGenerator and any model with that
signature fit; ``skip_prefix`` needs fastflow's Semla layers.
"""

from __future__ import annotations

import inspect

import torch
from torch import nn

from fastflow.models.semla import EquiMessagePassingLayer


class SemlaCacheAdapter:
    """The cache's view of a SemlaGenerator-style call (see the module docstring)."""

    def read_call(self, bound: inspect.BoundArguments) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        coords, inv_feats = list(bound.arguments.values())[:2]
        if not torch.is_tensor(coords) or coords.dim() != 3 or coords.size(-1) != 3:
            raise ValueError(f"fastflow cache: coords must be a [B, N, 3] tensor, got {_describe(coords)}")
        B, N, _ = coords.shape
        if B == 0 or N == 0:
            raise ValueError(f"fastflow cache: empty batch (coords has shape {list(coords.shape)})")
        if (
            not torch.is_tensor(inv_feats)
            or inv_feats.dim() != 3
            or inv_feats.shape[:2] != (B, N)
            or inv_feats.size(-1) == 0
        ):
            raise ValueError(
                f"fastflow cache: inv_feats must be a [{B}, {N}, 1 + features] tensor with the solver "
                f"time in channel 0, got {_describe(inv_feats)}"
            )
        for name, tensor in (("coords", coords), ("inv_feats", inv_feats)):
            if not tensor.is_floating_point() or not bool(torch.isfinite(tensor).all()):
                raise ValueError(
                    f"fastflow cache: {name} must be finite floating point, got {tensor.dtype}"
                    + (" with NaN or inf values" if tensor.is_floating_point() else "")
                )
        t = inv_feats[:, 0, 0].to("cpu", torch.float64, copy=True)
        mask = bound.arguments.get("atom_mask")
        if mask is None:
            return coords, t, torch.ones(B, N, dtype=torch.bool, device=coords.device)
        if not torch.is_tensor(mask) or mask.shape != (B, N):
            raise ValueError(f"fastflow cache: atom_mask must have shape [{B}, {N}], got {_describe(mask)}")
        mask = mask.bool()
        if not bool(mask.any(1).all()):
            raise ValueError("fastflow cache: a molecule of the batch has no real atoms (all-padding row)")
        return coords, t, mask

    def coord_scale(self, model: nn.Module) -> float:
        return float(getattr(getattr(model, "config", None), "coord_std", 1.0))

    def prefix_layers(self, model: nn.Module, block: str) -> list[nn.Module]:
        parent_path, _, index = block.rpartition(".")
        parent = model.get_submodule(parent_path)
        if (
            not isinstance(parent, nn.ModuleList)
            or not index.isdigit()
            or not all(isinstance(m, EquiMessagePassingLayer) for m in parent[: int(index) + 1])
        ):
            raise ValueError(
                f"skip_prefix needs a block inside an nn.ModuleList of Semla layers "
                f"(e.g. 'dynamics.layers.5'), got {block!r}"
            )
        return list(parent[: int(index)])

    def bypass(self, args: tuple, kwargs: dict):
        coords, node_feats = args[
            :2
        ]  # a Semla layer's forward(coords, node_feats, adj_matrix, node_mask, ...)
        return coords, node_feats


def _describe(value) -> str:
    return f"shape {list(value.shape)} ({value.dtype})" if torch.is_tensor(value) else type(value).__name__
