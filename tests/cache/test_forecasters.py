import numpy as np
import pytest
import torch

from fastflow.cache import CacheConfig, FixedInterval, Forecaster
from fastflow.ops import cache_forecast
from fastflow.sampling import time_grid

LOG_TIMES = time_grid("log", 100).numpy()
# Newest first, unevenly spaced on the log grid, as a cache with interval 3 and a refresh late by one sees them.
TIMES = LOG_TIMES[[70, 67, 64, 60]]
T, T_NEXT = LOG_TIMES[72], LOG_TIMES[73]


def polynomial(degree, t, coeffs):
    """Σ_i coeffs[i] t^i with tensor coefficients coeffs ``[degree + 1, ...]``."""
    return sum(c * t**i for i, c in enumerate(coeffs[: degree + 1]))


def step_mean(degree, a, b, coeffs):
    """(1 / (b − a)) ∫_a^b of the polynomial."""
    return sum(
        c * (b ** (i + 1) - a ** (i + 1)) / ((i + 1) * (b - a)) for i, c in enumerate(coeffs[: degree + 1])
    )


@pytest.mark.parametrize(
    "kind,order",
    [("reuse", 0), ("taylor", 1), ("taylor", 2), ("taylor", 3), ("ab", 1), ("ab", 2), ("ab", 3), ("ab", 4)],
)
def test_exact_for_polynomials_of_their_order_in_real_time(kind, order):
    forecaster = Forecaster(kind, order)
    degree = order if kind != "ab" else order - 1
    coeffs = torch.randn(5, 4, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(order))
    history = [polynomial(degree, t, coeffs) for t in TIMES[: forecaster.points]]
    c = forecaster.coefficients(TIMES, T, T_NEXT)
    forecast = cache_forecast(history, c.tolist(), backend="reference")
    expected = step_mean(degree, T, T_NEXT, coeffs) if kind == "ab" else polynomial(degree, T, coeffs)
    torch.testing.assert_close(forecast, expected, rtol=0, atol=1e-12)
    assert abs(c.sum() - 1) < 1e-9  # affine: positions forecast translation-covariantly
    # One degree more is not reproduced: the order is what it says.
    history = [polynomial(degree + 1, t, coeffs) for t in TIMES[: forecaster.points]]
    expected = step_mean(degree + 1, T, T_NEXT, coeffs) if kind == "ab" else polynomial(degree + 1, T, coeffs)
    assert (cache_forecast(history, c.tolist(), backend="reference") - expected).abs().max() > 1e-10


def test_classical_adams_bashforth_on_a_uniform_grid():
    times, h = [0.0, -1.0, -2.0, -3.0], 1.0
    np.testing.assert_allclose(Forecaster("ab", 2).coefficients(times, 0.0, h), [3 / 2, -1 / 2])
    np.testing.assert_allclose(Forecaster("ab", 3).coefficients(times, 0.0, h), [23 / 12, -16 / 12, 5 / 12])
    np.testing.assert_allclose(
        Forecaster("ab", 4).coefficients(times, 0.0, h), [55 / 24, -59 / 24, 37 / 24, -9 / 24]
    )


def test_orders_build_up_and_companions():
    assert Forecaster("taylor", 2).with_points(1) == Forecaster("taylor", 0)
    assert Forecaster("ab", 3).with_points(2) == Forecaster("ab", 2)
    assert Forecaster("taylor", 2).lower() == Forecaster("taylor", 1)
    assert Forecaster("reuse", 0).lower() is None and Forecaster("ab", 1).lower() is None


def test_forecasts_rotate_with_the_trajectory():
    """Rotate every stored output → the forecast rotates (scalar coefficients commute with rotations)."""
    g = torch.Generator().manual_seed(0)
    rotation = torch.linalg.qr(torch.randn(3, 3, generator=g, dtype=torch.float64))[0]
    history = [torch.randn(2, 5, 3, generator=g, dtype=torch.float64) for _ in range(3)]
    for kind, order in [("taylor", 2), ("ab", 3)]:
        c = Forecaster(kind, order).coefficients(TIMES, T, T_NEXT).tolist()
        rotated = cache_forecast([x @ rotation.T for x in history], c, backend="reference")
        torch.testing.assert_close(rotated, cache_forecast(history, c, backend="reference") @ rotation.T)


@pytest.mark.parametrize("interval,evaluations", [(1, 100), (2, 51), (3, 34), (4, 26), (5, 21)])
def test_fixed_interval_counts_match_the_paper(interval, evaluations):
    policy = FixedInterval(interval)
    assert sum(policy.evaluate(k, 100) for k in range(100)) == evaluations
    assert policy.evaluate(99, 100)  # the last prediction is the sample


def test_warmup_and_cooldown():
    policy = FixedInterval(4, warmup=3, cooldown=2)
    assert [k for k in range(12) if policy.evaluate(k, 12)] == [0, 1, 2, 3, 7, 10, 11]


@pytest.mark.parametrize(
    "bad",
    [
        dict(forecaster="magic"),
        dict(forecaster="reuse", order=1),
        dict(order=-1),
        dict(interval=0),
        dict(warmup=-1),
        dict(interval=2.5),
        dict(tolerance=-1.0),
        dict(forecaster="reuse", tolerance=0.1),
        dict(forecaster="ab", order=1, tolerance=0.1),
        dict(tolerance=0.1, block="dynamics.layers.0"),
        dict(skip_prefix=True),
    ],
)
def test_bad_configs_are_refused(bad):
    with pytest.raises(ValueError):
        CacheConfig(**bad)


def test_unknown_option_is_refused():
    with pytest.raises(TypeError):
        CacheConfig(intervall=2)


def test_repeated_times_are_refused():
    with pytest.raises(ValueError, match="distinct"):
        Forecaster("taylor", 1).coefficients([0.5, 0.5], 0.6, 0.7)
