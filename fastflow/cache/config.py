"""``CacheConfig``: what to forecast, when, and where."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from fastflow.cache.forecasters import CLOCKS, Forecaster
from fastflow.cache.policies import DEFAULT_COORD_REFERENCE, ERRORS, FixedInterval, forced

DEFAULT_ORDER = {"reuse": 0, "taylor": 2, "ab": 3}  # the paper's headline orders


@dataclass(frozen=True)
class CacheConfig:
    """Predictive feature cache settings.

    forecaster: "reuse", "taylor" (order m, default 2) or "ab" (Adams–Bashforth order j, default 3).
    interval: D. Fixed policy: evaluate every D steps. Adaptive policy: at most D − 1 forecasts in a row.
    warmup, cooldown: steps evaluated at the start / end (the last step is always evaluated).
    tolerance: None for the fixed policy; a float for the adaptive per-molecule policy, which evaluates a
        molecule when its calibrated error estimate exceeds it: the measure ``error`` of the difference between
        the forecasts of orders m and m − 1, times the ratio of the forecast's true error (the same measure
        against the evaluation) to its estimate at the molecule's last evaluation, clamped to [1/4, 4].
    error: the adaptive policy's measure (:mod:`fastflow.cache.policies`).
        "sample" (default): the error where it changes the sample, dimensionless — the larger of the x̂₁ RMS
        over the molecule's real atoms in Å divided by ``coord_reference`` (Å; x̂₁ in model units times the
        model's ``config.coord_std``, 1 without one), and the largest change of a type / bond / charge logit gap
        (top-1 minus another class, over real atoms and pairs) relative to that gap, which reaches 1 where an
        argmax flips. Tolerance 0.1 with the default reference: 0.01 Å, or a tenth of the way to a flip.
        "relative": the former measure, max over outputs of ‖ΔF̂‖ / ‖F̂‖ over all of the molecule's entries
        (kept for comparison; tolerances of the two measures are not comparable).
    coord_reference: Å of x̂₁ error that weighs as much as an argmax flip in ``error="sample"`` (default 0.1).
    block: None caches the whole generator's outputs; a module path (e.g. "dynamics.layers.5") caches that
        module's output and recomputes everything downstream (fixed policy only).
    skip_prefix: with a block inside an ``nn.ModuleList`` of Semla layers, also skip the layers before it on
        forecast steps (the paper's block-prefix variant: forecast the state after layers[:k]).
    clock: "time" (default) forecasts in real solver time t (Newton / variable-step AB, exact on polynomials in
        t); "steps" forecasts in solver-step index exactly as the paper's code (mol-cache) does: TaylorSeer's
        derivative ladder over the checkpoints' step indices, and the classical constant-step AB coefficients
        applied to the checkpoints (one forecast per refresh window). See :mod:`fastflow.cache.forecasters`.
        The adaptive policy takes clock="steps" with taylor (the ladder is defined for any step indices), not
        with ab: the classical coefficients ignore how far the forecast step is from the checkpoints, so the
        AB_j − AB_(j−1) error estimate is the same at every horizon and cannot tell when to refresh.
    """

    forecaster: str = "taylor"
    order: int | None = None
    interval: int = 2
    warmup: int = 0
    cooldown: int = 0
    tolerance: float | None = None
    block: str | None = None
    skip_prefix: bool = False
    clock: str = "time"
    error: str = "sample"
    coord_reference: float = DEFAULT_COORD_REFERENCE

    def __post_init__(self):
        if self.order is None and self.forecaster in DEFAULT_ORDER:
            object.__setattr__(self, "order", DEFAULT_ORDER[self.forecaster])
        if self.clock not in CLOCKS:
            raise ValueError(f"CacheConfig.clock must be one of {CLOCKS}, got {self.clock!r}")
        forecaster = Forecaster(self.forecaster, self.order, self.clock)  # validates kind and order
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
        if self.error not in ERRORS:
            raise ValueError(f"CacheConfig.error must be one of {ERRORS}, got {self.error!r}")
        if (
            isinstance(self.coord_reference, bool)
            or not isinstance(self.coord_reference, (int, float))
            or not math.isfinite(self.coord_reference)
            or self.coord_reference <= 0
        ):
            raise ValueError(
                f"CacheConfig.coord_reference must be a positive length in Å, got {self.coord_reference!r}"
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
            if self.clock == "steps" and self.forecaster == "ab":
                raise ValueError(
                    "the adaptive policy cannot use clock='steps' with ab: the classical Adams–Bashforth "
                    "coefficients ignore how far the forecast step is from the checkpoints, so the error "
                    "estimate (orders j and j - 1) is the same at every horizon; use taylor, or clock='time'"
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

    def __repr__(self) -> str:
        """The dataclass repr, leaving out the default clock, and the adaptive measure's fields without a tolerance
        (they do nothing there): labels of fixed-policy runs and of runs with clock="time" (CLI summaries,
        benchmark tables) read as they did before these options existed. Adaptive labels name their measure."""
        fields = [(f.name, getattr(self, f.name)) for f in dataclasses.fields(self)]
        shown = [
            (k, v)
            for k, v in fields
            if (k, v) != ("clock", "time")
            and (self.adaptive or k not in ("error", "coord_reference"))
            and not (k == "coord_reference" and self.error != "sample")
        ]
        return f"CacheConfig({', '.join(f'{k}={v!r}' for k, v in shown)})"

    @property
    def adaptive(self) -> bool:
        return self.tolerance is not None

    def reachable_order(self, n_steps: int) -> int | None:
        """The highest order the forecasts of an ``n_steps`` run can use (orders build up as evaluations are
        stored): a forecast at step s has only the evaluations of steps before s. Counted before the last step
        that may be forecast: the fixed policy's evaluations there, and for the adaptive policy every earlier
        step at most. Orders above it would never be used. None when no step is forecast (interval 1, or every step forced)."""
        if self.adaptive:
            # Its error estimate compares two orders: no forecast before two evaluations.
            may_forecast = [
                s for s in range(2, n_steps) if not forced(s, n_steps, self.warmup, self.cooldown)
            ]
            if self.interval == 1 or not may_forecast:
                return None
            evaluations = may_forecast[-1]
        else:
            policy = FixedInterval(self.interval, self.warmup, self.cooldown)
            evaluated = [policy.evaluate(s, n_steps) for s in range(n_steps)]
            if all(evaluated):
                return None
            last_forecast = n_steps - 1 - evaluated[::-1].index(False)
            evaluations = sum(evaluated[:last_forecast])
        return (
            evaluations if self.forecaster == "ab" else evaluations - 1
        )  # AB j needs j points, Taylor m + 1
