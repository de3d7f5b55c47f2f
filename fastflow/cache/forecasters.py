"""Forecasters: the output F(t) at solver time t as a linear combination Σ_k c_k F(t_k) of stored evaluations.

Pure math over times (float64, on the host); the tensors are combined by the op ``fastflow::cache_forecast``.
Times are real solver times, not step indices: the ``log`` schedule is far from uniform. Scalar coefficients
commute with rotations, and they sum to 1 (an affine combination), so forecasts of equivariant outputs are
equivariant and forecasts of positions are translation-covariant.

- reuse (order 0): F(t_0).
- Taylor of order m: the Newton divided-difference polynomial through the m + 1 newest points, evaluated at t
  (written in Lagrange form, which is the same polynomial as one linear combination); exact when F is a
  polynomial of degree ≤ m.
- Adams–Bashforth of order j: the mean over the coming step [t, t_next] of the polynomial through the j newest
  points, so that the Euler update x + Δt·F̂ integrates that polynomial exactly, as variable-step AB does; exact
  for the step-mean of a polynomial of degree ≤ j − 1. On a uniform grid with t one step after t_0 it gives
  the classical coefficients (3/2, −1/2), (23/12, −16/12, 5/12), …
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

KINDS = ("reuse", "taylor", "ab")


def lagrange_coefficients(times: Sequence[float], t: float) -> np.ndarray:
    """c_k = Π_{j≠k} (t − t_j) / (t_k − t_j): p(t) = Σ c_k F_k for the polynomial p through (t_k, F_k)."""
    times = np.asarray(times, dtype=np.float64)
    if len(np.unique(times)) != len(times):
        raise ValueError(f"forecast times must be distinct, got {times.tolist()}")
    coeffs = np.ones(len(times))
    for k, t_k in enumerate(times):
        others = np.delete(times, k)
        coeffs[k] = np.prod((t - others) / (t_k - others))
    return coeffs


def step_mean_coefficients(times: Sequence[float], t: float, t_next: float) -> np.ndarray:
    """Coefficients of (1 / (t_next − t)) ∫_t^t_next p(s) ds for the polynomial p through (t_k, F_k); Gauss–
    Legendre with len(times) nodes is exact for p's degree len(times) − 1."""
    nodes, weights = np.polynomial.legendre.leggauss(len(times))
    s = t + (t_next - t) * (nodes + 1) / 2
    return sum(w / 2 * lagrange_coefficients(times, s_q) for w, s_q in zip(weights, s))


@dataclass(frozen=True)
class Forecaster:
    """A forecaster kind ("reuse", "taylor", "ab") and order (Taylor m ≥ 0; AB j ≥ 1; reuse 0)."""

    kind: str
    order: int

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"unknown forecaster {self.kind!r}; expected one of {KINDS}")
        lowest = {"reuse": 0, "taylor": 0, "ab": 1}[self.kind]
        if self.kind == "reuse" and self.order != 0:
            raise ValueError(f"reuse has order 0, got order={self.order}")
        if not isinstance(self.order, int) or self.order < lowest:
            raise ValueError(f"{self.kind} needs an integer order >= {lowest}, got {self.order!r}")

    @property
    def points(self) -> int:
        """Stored evaluations the full order needs."""
        return self.order if self.kind == "ab" else self.order + 1

    def with_points(self, n: int) -> Forecaster:
        """The same kind at the highest order that n stored evaluations allow (orders build up at the start)."""
        n = min(n, self.points)
        return Forecaster(self.kind, n if self.kind == "ab" else n - 1)

    def lower(self) -> Forecaster | None:
        """The companion of order one less, for error estimates (None for the lowest order)."""
        return None if self.points == 1 else Forecaster(self.kind, self.order - 1)

    def coefficients(self, times: Sequence[float], t: float, t_next: float) -> np.ndarray:
        """Coefficients for the ``points`` newest times (newest first), forecasting at t (AB: over [t, t_next])."""
        times = list(times)[: self.points]
        if len(times) < self.points:
            raise ValueError(f"{self} needs {self.points} stored evaluations, got {len(times)}")
        if self.kind == "ab":
            return step_mean_coefficients(times, t, t_next)
        return lagrange_coefficients(times, t)
