"""Policies: when to evaluate the network and when to forecast its output.

Both policies evaluate during ``warmup`` steps, during the last ``cooldown`` steps and always at the last step:
SemlaFlow's sample *is* the last prediction, so it must be a real one. Step counts come from the sampler
(``FlowState.step`` / ``n_steps``); without a sampler the step is the call count and cool-down and the forced
last step need n_steps, which is then unknown.

The adaptive policy's error estimate compares two forecasts of the network's outputs (orders m and m − 1) per
molecule, with one of two measures (``CacheConfig.error``):

- ``"sample"`` (default, :func:`sample_error`): the error where it changes the sample. Coordinates: the RMS over
  the molecule's real atoms of the difference of the two forecasts of x̂₁, in Å, divided by a reference length
  (``CacheConfig.coord_reference``, default 0.1 Å). Atom types, bonds, charges (every further output: logits):
  over the molecule's real atoms (pairs of distinct real atoms), the largest change of a logit gap
  z_top − z_c relative to that gap (1: enough to flip the argmax). The score is the larger of the two parts.
- ``"relative"`` (:func:`relative_error`): the largest over outputs of ‖a − b‖ / ‖b‖ over all of the molecule's
  entries. Dominated by the many no-bond pairs of the bond logits, it admits errors that change bonds.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

ERRORS = ("sample", "relative")
DEFAULT_COORD_REFERENCE = 0.1  # Å of x̂₁ error that scores 1, as much as a logit change that flips an argmax


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
    ``interval`` − 1 forecasts ran in a row; evaluate otherwise (a NaN estimate evaluates too). The estimate's
    measure (:func:`sample_error` or :func:`relative_error`) is the hook's; the policy only compares."""

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


def sample_error(
    a: list[torch.Tensor],
    b: list[torch.Tensor],
    mask: torch.Tensor,
    coord_scale: float = 1.0,
    coord_reference: float = DEFAULT_COORD_REFERENCE,
) -> torch.Tensor:
    """Per molecule ``[B]`` float64: how far outputs ``a`` are from the reference ``b`` where it changes the
    sample — the largest of the parts of :func:`sample_error_parts`, with the coordinate RMS (Å) divided by
    ``coord_reference`` (Å). A tolerance τ on it therefore admits τ · coord_reference Å of x̂₁ error and logit
    gaps changed by τ of their size (τ < 1: no argmax flips).

    a, b: the outputs in the sampler's layout, x̂₁ ``[B, N, 3]`` (model units) first, then logits ``[B, N, K]``
    (atoms) or ``[B, N, N, K]`` (pairs). mask ``[B, N]`` bool: real atoms. coord_scale: Å per model unit (the
    sampler's ``coord_std``)."""
    parts = sample_error_parts(a, b, mask, coord_scale)
    return torch.stack([parts["coords"] / coord_reference, *parts["logits"]]).amax(0)


def sample_error_parts(
    a: list[torch.Tensor], b: list[torch.Tensor], mask: torch.Tensor, coord_scale: float = 1.0
) -> dict:
    """The parts of :func:`sample_error`, per molecule ``[B]`` float64 on the host:

    - ``"coords"``: the RMS over the molecule's real atoms of a[0] − b[0], in Å (model units × coord_scale).
      Only the difference's length enters: invariant under rotations and translations applied to both.
    - ``"logits"``: one ``[B]`` per further output (atom types, bonds, charges). For each real atom (each pair
      of distinct real atoms) with reference logits z = b, argmax c* and the other classes c: the largest
      |Δ(z_c* − z_c)| / (z_c* − z_c), Δ = b − a. Under 1 no argmax differs between a and b; an argmax that
      differs scores above 1 (an exact tie in b counts as a gap of 1e-12). A shift of all of an element's logits
      scores 0. The molecule's value is the largest over its atoms (pairs); padding atoms and pairs, and the
      diagonal of pair outputs, never count.
    """
    mask = mask.to(a[0].device, torch.bool)
    squared = (a[0] - b[0]).to(torch.float64).square().sum(-1)  # [B, N]
    coords = (torch.where(mask, squared, 0.0).sum(1) / mask.sum(1).clamp_min(1)).sqrt() * coord_scale
    logits = [_flip_score(x, y, _real_elements(y, mask)).cpu() for x, y in zip(a[1:], b[1:])]
    return {"coords": coords.cpu(), "logits": logits}


def _real_elements(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Bool over x's elements (every dim but the last, the classes): real atoms of ``[B, N, K]``, pairs of
    distinct real atoms of ``[B, N, N, K]``, everything of other layouts (``[B, K]``: per molecule)."""
    N = mask.size(1)
    if x.dim() == 4 and x.size(1) == N and x.size(2) == N:
        distinct = ~torch.eye(N, dtype=torch.bool, device=mask.device)
        return mask.unsqueeze(-1) & mask.unsqueeze(-2) & distinct
    if x.dim() == 3 and x.size(1) == N:
        return mask
    return torch.ones(x.shape[:-1], dtype=torch.bool, device=x.device)


def _flip_score(a: torch.Tensor, b: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """``[B]`` float64: the largest over kept elements of max_c |Δ gap_c| / gap_c (:func:`sample_error_parts`)."""
    a, b = a.to(torch.float64), b.to(torch.float64)
    top = b.argmax(-1, keepdim=True)
    gap = b.gather(-1, top) - b  # ≥ 0; 0 at the argmax itself
    change = (a.gather(-1, top) - a) - gap  # 0 at the argmax itself
    score = (change.abs() / gap.clamp_min(1e-12)).amax(-1)
    score = torch.where(keep, score, 0.0)  # where, not *: NaN or inf in padding does not survive
    return score.flatten(1).amax(1) if score.dim() > 1 else score


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
