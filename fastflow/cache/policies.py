"""Policies: when to evaluate the network and when to forecast its output.

Both policies evaluate during ``warmup`` steps, during the last ``cooldown`` steps and always at the last step:
SemlaFlow's sample *is* the last prediction, so it must be a real one. Step counts come from the sampler
(``FlowState.step`` / ``n_steps``); without a sampler the step is the call count and cool-down and the forced
last step need n_steps, which is then unknown.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def forced(step: int, n_steps: int | None, warmup: int, cooldown: int) -> bool:
    """Evaluate regardless of forecasts: warm-up, cool-down, last step."""
    return step < warmup or (n_steps is not None and step >= n_steps - max(cooldown, 1))


@dataclass(frozen=True)
class FixedInterval:
    """Evaluate every ``interval`` steps (D) after warm-up, forecast in between: with 100 steps and no warm-up,
    D = 2, 3, 4, 5 evaluate 51, 34, 26, 21 times (the paper's counts)."""

    interval: int
    warmup: int = 0
    cooldown: int = 0

    def evaluate(self, step: int, n_steps: int | None) -> bool:
        return forced(step, n_steps, self.warmup, self.cooldown) or (step - self.warmup) % self.interval == 0


@dataclass(frozen=True)
class AdaptiveTolerance:
    """Per molecule: forecast while the calibrated error estimate stays within ``tolerance`` and fewer than
    ``interval`` − 1 forecasts ran in a row; evaluate otherwise (a NaN estimate evaluates too)."""

    tolerance: float
    interval: int
    warmup: int = 0
    cooldown: int = 0

    def evaluate(
        self, step: int, n_steps: int | None, forecasts_in_a_row: torch.Tensor, estimate: torch.Tensor
    ) -> torch.Tensor:
        """Bool ``[B]``: which molecules to evaluate. forecasts_in_a_row ``[B]``; estimate ``[B]`` float64."""
        if forced(step, n_steps, self.warmup, self.cooldown):
            return torch.ones_like(forecasts_in_a_row, dtype=torch.bool)
        return (forecasts_in_a_row + 1 >= self.interval) | ~(estimate <= self.tolerance)


def relative_error(a: list[torch.Tensor], b: list[torch.Tensor]) -> torch.Tensor:
    """Per molecule ``[B]`` float64: max over outputs of ‖a − b‖ / ‖b‖ over the molecule's entries (padding
    is zero in both, so batch-mates and padding never enter)."""
    errors = [
        (x - y).flatten(1).norm(dim=1) / y.flatten(1).norm(dim=1).clamp_min(1e-12) for x, y in zip(a, b)
    ]
    return torch.stack(errors).amax(0).double().cpu()


def calibration_ratio(actual: torch.Tensor, estimated: torch.Tensor) -> torch.Tensor:
    """actual / estimated error at a refresh, clamped to [1/4, 4]: one lucky refresh must not switch the
    estimator off, one unlucky one must not pin the molecule to full evaluation."""
    return (actual / estimated.clamp_min(1e-12)).clamp(0.25, 4.0)
