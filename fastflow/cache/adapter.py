"""What the cache must know about a model family, and nothing more: the cache imports no model.

Each call of the model is one solver step. The hook caches whatever the model's ``forward`` returns (a tensor or
a tuple of tensors, per molecule along dim 0, per atom or pair along dims 1–2; ``CacheConfig.error="sample"``
needs x̂₁ ``[B, N, 3]`` first), and learns the rest from an adapter. Semla's —
SemlaGenerator's call signature, which the sampler uses — is
:class:`fastflow.models.cache_adapter.SemlaCacheAdapter`, which ``patch_model`` passes.
"""

from __future__ import annotations

import inspect
from typing import Protocol

import torch
from torch import nn


class ModelAdapter(Protocol):
    """Where one model family keeps what the cache reads."""

    def read_call(self, bound: inspect.BoundArguments) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """From one call's arguments: coords ``[B, N, 3]`` (the batch's shape, dtype and device), the solver time
        t ``[B]`` (a float64 host copy: callers may reuse their tensors) and the atom mask ``[B, N]`` bool. Raises
        ValueError, naming the argument, where the call is malformed: a forecast step never runs the model."""

    def coord_scale(self, model: nn.Module) -> float:
        """Å per coordinate unit of the model (the adaptive ``error="sample"`` measure is in Å)."""

    def prefix_layers(self, model: nn.Module, block: str) -> list[nn.Module]:
        """The layers before the cached block ``block`` that ``skip_prefix`` may pass through; ValueError if the
        block is not one of a stack of such layers."""

    def bypass(self, args: tuple, kwargs: dict):
        """What a skipped prefix layer returns when called with ``args, kwargs``: its inputs passed through."""
