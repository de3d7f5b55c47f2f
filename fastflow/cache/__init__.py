"""Predictive feature caching across solver steps: skip network evaluations and forecast their outputs.

- :mod:`.forecasters` — the math: reuse, Taylor (Newton) and variable-step Adams–Bashforth coefficients from
  real solver times, or (``clock="steps"``) the paper code's TaylorSeer ladder and classical AB in step index;
- :mod:`.policies` — when to evaluate: fixed interval D, or adaptive per molecule against a tolerance;
- :mod:`.state` — one trajectory's per-molecule history;
- :mod:`.hook` — where: the whole generator's ``forward`` or one block, installed by ``fastflow.patch_model``.
- :mod:`.adapter` — what the hook reads from a model family (its time, coordinates, mask); the model brings
  its adapter, the cache imports no model and no sampler (the step comes as a ``fastflow.step_record``).
"""

from fastflow.cache.config import CacheConfig
from fastflow.cache.forecasters import (
    Forecaster,
    classical_ab_coefficients,
    lagrange_coefficients,
    step_mean_coefficients,
    taylorseer_coefficients,
)
from fastflow.cache.hook import CacheHook
from fastflow.cache.policies import AdaptiveTolerance, FixedInterval

__all__ = [
    "AdaptiveTolerance",
    "CacheConfig",
    "CacheHook",
    "FixedInterval",
    "Forecaster",
    "classical_ab_coefficients",
    "lagrange_coefficients",
    "step_mean_coefficients",
    "taylorseer_coefficients",
]
