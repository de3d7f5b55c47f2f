"""Forecasters: the output F at the current step as a linear combination Σ_k c_k F_k of stored evaluations.

Pure math over a clock (float64, on the host); the tensors are combined by the op ``fastflow::cache_forecast``.
Scalar coefficients commute with rotations, and they sum to 1 (an affine combination), so forecasts of equivariant
outputs are equivariant and forecasts of positions are translation-covariant. Two clocks (``CacheConfig.clock``):

``clock="time"`` (the default): the clock is real solver time t, not the step index; the ``log`` schedule is
far from uniform.

- reuse (order 0): F(t_0).
- Taylor of order m: the Newton divided-difference polynomial through the m + 1 newest points, evaluated at t
  (written in Lagrange form, which is the same polynomial as one linear combination); exact when F is a
  polynomial of degree ≤ m.
- Adams–Bashforth of order j: the mean over the coming step [t, t_next] of the polynomial through the j newest
  points, so that the Euler update x + Δt·F̂ integrates that polynomial exactly, as variable-step AB does; exact
  for the step-mean of a polynomial of degree ≤ j − 1. On a uniform grid with t = t_0 and t_next one step later
  it gives the classical coefficients (3/2, −1/2), (23/12, −16/12, 5/12), …

``clock="steps"``: the forecasts of the paper's own code, mol-cache (PrunaAI/caching-for-molecule-generation at
c0a85368: ``mol_cache/cache/taylor_cache.py`` ``TaylorCache.put/get``, ``mol_cache/cache/ab_cache.py``
``ABCache``; its Taylor rule is TaylorSeer's ``derivative_approximation`` / ``taylor_formula``, Shenyi-Z/
TaylorSeer). The clock is the solver-step index s (0, 1, …, n_steps − 1) whatever the time grid. Stored
evaluations ("checkpoints") at steps s_0 > s_1 > … (newest first), F_k = F(s_k):

- Taylor of order m, TaylorSeer's derivative ladder. Each full evaluation, at step s_k, rebuilds the ladder from
  the previous checkpoint's:

      d_0^(k) = F_k,      d_{i+1}^(k) = (d_i^(k) − d_i^(k+1)) / (s_k − s_{k+1}),      i + 1 ≤ m,

  every rung divided by the *latest* gap s_k − s_{k+1} (a divided difference would divide rung i + 1 by
  s_k − s_{k+1+i}); a rung exists only where the previous ladder had the rung below it, so the order builds up
  over the first m + 1 checkpoints. A skipped step s is forecast as

      F̂(s) = Σ_{i=0..m} d_i^(0) · x^i / i!,      x = s − s_0.

  With checkpoints every D steps, d_i^(0) = ∇^i F_0 / D^i (∇: backward difference across checkpoints), the
  paper's F + Σ_i ∇^i F / (i!·D^i) · x^i. Exact on polynomials of degree ≤ 1 in s. For m ≥ 2 it is not the
  interpolating polynomial (Newton weights ∇²F_0 by x(x + D)/(2D²), TaylorSeer by x²/(2D²)): at uniform spacing D
  a quadratic a·s² is forecast with error −a·D·x; the top rung d_m is the exact m-th derivative of a degree-m
  polynomial at uniform spacing. Reuse is the m = 0 ladder.
- Adams–Bashforth of order j: the classical constant-step coefficients b_{j,i} (newest first: (1), (3/2, −1/2),
  (23/12, −16/12, 5/12), (55/24, −59/24, 37/24, −9/24), …), computed exactly as ∫_0^1 ℓ_i(u) du for the Lagrange
  basis ℓ_i on the nodes 0, −1, …, −(j − 1) and rounded once to float64 (the same doubles as mol-cache's
  literals), applied to the j newest checkpoints: F̂ = Σ_i b_{j,i} F_i, whatever their steps and whatever the
  skipped step, so every skipped step of a refresh window gets the same forecast (mol-cache's ``get`` ignores
  the step). At uniform checkpoint spacing D it is the mean over the window [s_0, s_0 + D] of the polynomial
  through the checkpoints (exact for polynomials of degree ≤ j − 1). With fewer than j checkpoints the order
  drops to what they allow, as mol-cache's does.

mol-cache sums the rungs (resp. the products) one tensor at a time in the model's dtype; here the same
combination is one ``cache_forecast`` call with host-computed coefficients, so the two agree up to float
rounding, not bit for bit.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from fractions import Fraction
from functools import cache
from math import factorial

import numpy as np

KINDS = ("reuse", "taylor", "ab")
CLOCKS = ("time", "steps")


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


def taylorseer_coefficients(steps: Sequence[float], step: float) -> np.ndarray:
    """TaylorSeer's / mol-cache's Taylor forecast at ``step`` from checkpoints at ``steps`` (newest first) as
    coefficients of the stored outputs: Σ_{i<len(steps)} d_i x^i / i! with the ladder d_{i+1}^(k) = (d_i^(k) −
    d_i^(k+1)) / (s_k − s_{k+1}) and x = step − s_0 (see the module docstring). Each rung is tracked as its
    coefficient vector over the checkpoints."""
    steps = np.asarray(steps, dtype=np.float64)
    n = len(steps)
    if len(np.unique(steps)) != n:
        raise ValueError(f"forecast steps must be distinct, got {steps.tolist()}")
    rungs = list(np.eye(n))  # rung 0 of checkpoint k is F_k
    x = step - steps[0]
    coeffs = rungs[0].copy()
    for i in range(1, n):
        # Rung i of checkpoints 0 … n − 1 − i from rung i − 1 of each and of the one before it.
        rungs = [(rungs[k] - rungs[k + 1]) / (steps[k] - steps[k + 1]) for k in range(n - i)]
        coeffs += rungs[0] * (x**i / factorial(i))
    return coeffs


@cache
def _classical_ab(order: int) -> tuple[float, ...]:
    coeffs = []
    for i in range(order):
        # ℓ_i(u) = Π_{k≠i} (u + k) / (k − i): ascending polynomial coefficients, exact.
        poly, denominator = [Fraction(1)], Fraction(1)
        for k in range(order):
            if k != i:
                shifted = [Fraction(0)] + poly  # u · ℓ
                poly = [shifted[p] + (k * poly[p] if p < len(poly) else 0) for p in range(len(shifted))]
                denominator *= k - i
        coeffs.append(float(sum(c / (p + 1) for p, c in enumerate(poly)) / denominator))
    return tuple(coeffs)


def classical_ab_coefficients(order: int) -> np.ndarray:
    """The constant-step Adams–Bashforth coefficients of ``order``, newest first: ∫_0^1 ℓ_i(u) du on the nodes
    0, −1, …, −(order − 1), exact rationals rounded once to float64 ((3/2, −1/2), (23/12, −16/12, 5/12), …)."""
    if isinstance(order, bool) or not isinstance(order, int) or order < 1:
        raise ValueError(f"Adams–Bashforth needs an integer order >= 1, got {order!r}")
    return np.array(_classical_ab(order))


@dataclass(frozen=True)
class Forecaster:
    """A forecaster kind ("reuse", "taylor", "ab"), order (Taylor m ≥ 0; AB j ≥ 1; reuse 0) and clock ("time":
    solver time; "steps": step index, mol-cache's forecasts)."""

    kind: str
    order: int
    clock: str = "time"

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"unknown forecaster {self.kind!r}; expected one of {KINDS}")
        if self.clock not in CLOCKS:
            raise ValueError(f"unknown clock {self.clock!r}; expected one of {CLOCKS}")
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
        return Forecaster(self.kind, n if self.kind == "ab" else n - 1, self.clock)

    def lower(self) -> Forecaster | None:
        """The companion of order one less, for error estimates (None for the lowest order)."""
        return None if self.points == 1 else Forecaster(self.kind, self.order - 1, self.clock)

    def coefficients(self, times: Sequence[float], t: float, t_next: float) -> np.ndarray:
        """Coefficients for the ``points`` newest clock values (newest first), forecasting at t (time-clock AB:
        over [t, t_next]). With clock="steps", times and t are step indices and t_next is not used."""
        times = list(times)[: self.points]
        if len(times) < self.points:
            raise ValueError(f"{self} needs {self.points} stored evaluations, got {len(times)}")
        if self.clock == "steps":
            if self.kind == "ab":
                return classical_ab_coefficients(self.points)
            return taylorseer_coefficients(times, t)
        if self.kind == "ab":
            return step_mean_coefficients(times, t, t_next)
        return lagrange_coefficients(times, t)
