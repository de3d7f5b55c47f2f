"""``patch_model``: the one place that knows both models and kernels. It swaps fused modules in (none yet: they
arrive with issue 5) and installs the predictive feature cache (:mod:`fastflow.cache`).

The instance is mutated, never its class: hooks are instance attributes ``forward``, and ``unpatch()`` deletes
them again. Patching twice with the same arguments returns the same handle.
"""

from __future__ import annotations

import itertools

import torch
from torch import nn

from fastflow.cache import CacheConfig, CacheHook
from fastflow.ops.backends import resolve_backend

KERNELS = ("auto", "reference")
FUSED_KERNELS = ("cpp", "triton", "fused")  # arrive with the fused-kernels issue
_ATTRIBUTE = "_fastflow_patch"


class PatchHandle:
    """What ``patch_model`` did to one model instance; ``unpatch()`` undoes it."""

    def __init__(self, model: nn.Module, kernels: str, cache: CacheConfig | None):
        self.model, self.kernels, self.cache = model, kernels, cache
        self._hook = None if cache is None else CacheHook(model, cache, backend=kernels)
        self.active = False

    def _install(self) -> None:
        if self._hook is not None:
            self._hook.install()
        setattr(self.model, _ATTRIBUTE, self)
        self.active = True

    def unpatch(self) -> None:
        """Restore the model exactly (its instance ``forward`` attributes as before); a second call is a no-op."""
        if not self.active:
            return
        if self._hook is not None:
            self._hook.remove()
        delattr(self.model, _ATTRIBUTE)
        self.active = False

    def reset(self) -> None:
        """Forget the current trajectory and the statistics (new trajectories are also detected on their own)."""
        if self._hook is not None:
            self._hook.reset()

    def stats(self) -> dict:
        """Cache counters since the patch or ``reset()``: evaluations and forecasts (molecules × calls of the cached
        module), hit rate, trajectories, evaluations per molecule, and the adaptive policy's error estimates and
        calibration ratios (count, mean, p50, p95, max). Empty without a cache."""
        return {} if self._hook is None else self._hook.stats.summary()

    def report(self) -> dict:
        """What was swapped, which backend the cache's op uses, and what is cached where."""
        report = {
            "active": self.active,
            "kernels": {
                "requested": self.kernels,
                "swapped": [],
                "note": "no fused Semla modules yet (issue 5): every module runs its reference path",
            },
        }
        if self.cache is not None:
            hook = self._hook
            report["cache"] = {
                "forecaster": self.cache.forecaster,
                "order": self.cache.order,
                "policy": (
                    f"adaptive per molecule, tolerance {self.cache.tolerance}, at most "
                    f"{self.cache.interval - 1} forecasts in a row"
                )
                if self.cache.adaptive
                else f"fixed interval {self.cache.interval}",
                "warmup": self.cache.warmup,
                "cooldown": self.cache.cooldown,
                "where": "whole model" if self.cache.block is None else self.cache.block,
                "skipped_prefix": [
                    name for name, m in self.model.named_modules() if any(m is p for p in hook.prefix)
                ],
                "history": "float32 (float64 for float64 models), stored by value",
                "cache_forecast_backend": resolve_backend(self.kernels, _device(self.model)),
            }
        return report

    def __repr__(self) -> str:
        return f"PatchHandle(kernels={self.kernels!r}, cache={self.cache!r}, active={self.active})"


def patch_model(model: nn.Module, kernels: str = "auto", cache: CacheConfig | None = None) -> PatchHandle:
    """Speed up ``model`` in place and return the handle that undoes it.

    kernels: "auto" (fused modules where available — none yet — and the fastest backend for the cache's op) or
        "reference" (no swaps, PyTorch reference op). "cpp", "triton", "fused" arrive with issue 5.
    cache: None, or a :class:`~fastflow.cache.CacheConfig`.

    With ``cache=None`` (or interval 1) the outputs equal the unpatched model's bit for bit.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"patch_model needs a torch.nn.Module, got {type(model).__name__}")
    if kernels in FUSED_KERNELS:
        raise NotImplementedError(
            f"kernels={kernels!r}: the fused Semla kernels arrive with issue 5; use "
            f"kernels='auto' or 'reference' for now"
        )
    if kernels not in KERNELS:
        raise ValueError(f"unknown kernels={kernels!r}; expected one of {KERNELS}")
    if cache is not None and not isinstance(cache, CacheConfig):
        raise TypeError(
            f"cache must be a fastflow.CacheConfig or None, got {type(cache).__name__}"
            + (" (use CacheConfig(**options))" if isinstance(cache, dict) else "")
        )
    existing = model.__dict__.get(_ATTRIBUTE)
    if existing is not None:
        if (existing.kernels, existing.cache) == (kernels, cache):
            return existing
        raise RuntimeError(
            f"model is already patched ({existing!r}); call handle.unpatch() before patching it "
            "with other options"
        )
    handle = PatchHandle(model, kernels, cache)
    handle._install()
    return handle


def _device(model: nn.Module) -> torch.device:
    return next(itertools.chain(model.parameters(), model.buffers()), torch.zeros(())).device
