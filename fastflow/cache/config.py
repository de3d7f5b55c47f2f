"""``CacheConfig``: what to forecast, when, and where."""

from __future__ import annotations

import math
from dataclasses import dataclass

from fastflow.cache.forecasters import Forecaster

DEFAULT_ORDER = {"reuse": 0, "taylor": 2, "ab": 3}  # the paper's headline orders


@dataclass(frozen=True)
class CacheConfig:
    """Predictive feature cache settings.

    forecaster: "reuse", "taylor" (order m, default 2) or "ab" (Adams–Bashforth order j, default 3).
    interval: D. Fixed policy: evaluate every D steps. Adaptive policy: at most D − 1 forecasts in a row.
    warmup, cooldown: steps evaluated at the start / end (the last step is always evaluated).
    tolerance: None for the fixed policy; a float for the adaptive per-molecule policy, which evaluates a
        molecule when its calibrated relative error estimate (‖F̂_order − F̂_order−1‖ / ‖F̂‖, times the
        ratio of true to estimated error at its last evaluation) exceeds it.
    block: None caches the whole generator's outputs; a module path (e.g. "dynamics.layers.5") caches that
        module's output and recomputes everything downstream (fixed policy only).
    skip_prefix: with a block inside an ``nn.ModuleList`` of Semla layers, also skip the layers before it on
        forecast steps (the paper's block-prefix variant: forecast the state after layers[:k]).
    """

    forecaster: str = "taylor"
    order: int | None = None
    interval: int = 2
    warmup: int = 0
    cooldown: int = 0
    tolerance: float | None = None
    block: str | None = None
    skip_prefix: bool = False

    def __post_init__(self):
        if self.order is None and self.forecaster in DEFAULT_ORDER:
            object.__setattr__(self, "order", DEFAULT_ORDER[self.forecaster])
        forecaster = Forecaster(self.forecaster, self.order)  # validates kind and order
        for name in ("interval", "warmup", "cooldown"):
            value = getattr(self, name)
            if (
                isinstance(value, bool)
                or not isinstance(value, int)
                or value < (1 if name == "interval" else 0)
            ):
                raise ValueError(
                    f"CacheConfig.{name} must be an integer >= {1 if name == 'interval' else 0}, "
                    f"got {value!r}"
                )
        if self.tolerance is not None:
            if (
                not isinstance(self.tolerance, (int, float))
                or not math.isfinite(self.tolerance)
                or self.tolerance <= 0
            ):
                raise ValueError(f"CacheConfig.tolerance must be a positive number, got {self.tolerance!r}")
            if forecaster.lower() is None:
                raise ValueError(
                    f"the adaptive policy compares orders {self.order} and {self.order} - 1 of "
                    f"{self.forecaster}; use an order with a lower companion (taylor >= 1, ab >= 2)"
                )
            if self.block is not None:
                raise ValueError(
                    "the adaptive policy caches the whole generator (block=None): per-molecule "
                    "decisions need the sampler's [B, N, ...] output layout"
                )
        if self.block is not None and (not isinstance(self.block, str) or not self.block):
            raise ValueError(
                f"CacheConfig.block must be a module path like 'dynamics.layers.5', got {self.block!r}"
            )
        if self.skip_prefix and self.block is None:
            raise ValueError("skip_prefix needs a block (the last layer of the prefix)")

    @property
    def adaptive(self) -> bool:
        return self.tolerance is not None
