"""CacheConfig(clock="steps"): the paper code's (mol-cache's) forecasts in step index.

Expected values are written out by hand from the formulas in fastflow/cache/forecasters.py (TaylorSeer's derivative
ladder; classical constant-step Adams–Bashforth on the checkpoints).
"""

import math

import numpy as np
import pytest
import torch

from fastflow import CacheConfig, SemlaConfig, patch_model, sample
from fastflow.cache import (
    Forecaster,
    classical_ab_coefficients,
    lagrange_coefficients,
    taylorseer_coefficients,
)
from fastflow.cache.hook import _zero_padding
from fastflow.cli import build_parser, cache_config, main
from fastflow.ops import cache_forecast
from fastflow.sampling import time_grid
from tests.models.conftest import random_inputs

TINY = SemlaConfig.preset("tiny")
REQUEST = dict(n_molecules=4, steps=8, seed=1, sizes=[3, 5, 4, 7], batch_size=4)


def steps_forecast(kind, order, history, steps, step):
    """The forecast through the op: history newest first at step indices ``steps``."""
    f = Forecaster(kind, order, "steps")
    c = f.coefficients(steps, step, step + 1)
    return cache_forecast(history[: f.points], c.tolist(), backend="reference")


# -- by hand ---------------------------------------------------------------------------------------------------


def test_taylor_by_hand_from_checkpoints_at_steps_0_2_4():
    F0, F2, F4 = 1.0, 4.0, 2.0  # outputs at steps 0, 2, 4
    # The ladder at step 4: d0 = F4; d1 = (F4 − F2)/2 = −1; the ladder at step 2 had d1 = (F2 − F0)/2 = 1.5;
    # d2 = (d1(4) − d1(2))/2 = (−1 − 1.5)/2 = −1.25 (each rung divided by the latest gap, 2).
    # Step 5 (x = 1): 2 + (−1)·1 + (−1.25)·1/2 = 0.375.  Step 6 (x = 2): 2 + (−1)·2 + (−1.25)·4/2 = −2.5.
    history = [
        torch.tensor([F4], dtype=torch.float64),
        torch.tensor([F2]).double(),
        torch.tensor([F0]).double(),
    ]
    assert steps_forecast("taylor", 2, history, [4, 2, 0], 5).item() == pytest.approx(0.375, abs=1e-15)
    assert steps_forecast("taylor", 2, history, [4, 2, 0], 6).item() == pytest.approx(-2.5, abs=1e-15)
    # The same as coefficients on (F4, F2, F0): step 5 (13/8, −6/8, 1/8), step 6 (5/2, −2, 1/2).
    np.testing.assert_allclose(
        taylorseer_coefficients([4, 2, 0], 5), [13 / 8, -6 / 8, 1 / 8], rtol=0, atol=1e-15
    )
    np.testing.assert_allclose(taylorseer_coefficients([4, 2, 0], 6), [5 / 2, -2, 1 / 2], rtol=0, atol=1e-15)
    # Newton through the same three points (the time clock on a uniform grid) gives 3F4 − 3F2 + F0 at step 6.
    np.testing.assert_allclose(lagrange_coefficients([4, 2, 0], 6), [3, -3, 1], atol=1e-14)
    # Order 1 uses the two newest: F4 + (F4 − F2)/2 · x → steps 5, 6: 1.0, 0.0.
    assert steps_forecast("taylor", 1, history, [4, 2, 0], 5).item() == pytest.approx(1.0, abs=1e-15)
    assert steps_forecast("taylor", 1, history, [4, 2, 0], 6).item() == pytest.approx(0.0, abs=1e-15)


def test_taylor_ladder_divides_every_rung_by_the_latest_gap():
    """Uneven checkpoints (warm-up 0, 1, then every 2: steps 1, 3): d1(3) = (F3 − F1)/2, d1(1) = (F1 − F0)/1,
    d2(3) = (d1(3) − d1(1))/2 — by the latest gap 2, not by 3 − 0 as a divided difference would."""
    F0, F1, F3 = 0.5, 2.0, -1.0
    d1_3, d1_1 = (F3 - F1) / 2, (F1 - F0) / 1  # −1.5, 1.5
    d2 = (d1_3 - d1_1) / 2  # −1.5
    x = 4 - 3
    expected = F3 + d1_3 * x + d2 * x**2 / 2  # −1 − 1.5 − 0.75 = −3.25
    assert expected == -3.25
    history = [torch.tensor([v], dtype=torch.float64) for v in (F3, F1, F0)]
    assert steps_forecast("taylor", 2, history, [3, 1, 0], 4).item() == pytest.approx(expected, abs=1e-15)


def test_taylor_tensors_by_hand():
    g = torch.Generator().manual_seed(0)
    F0, F2, F4 = (torch.randn(3, 5, 3, generator=g, dtype=torch.float64) for _ in range(3))
    d1, d1_old = (F4 - F2) / 2, (F2 - F0) / 2
    d2 = (d1 - d1_old) / 2
    for step in (5, 6, 7):
        x = step - 4
        expected = F4 + d1 * x + d2 * x**2 / 2
        torch.testing.assert_close(steps_forecast("taylor", 2, [F4, F2, F0], [4, 2, 0], step), expected)


def test_adams_bashforth_by_hand():
    F0, F2, F4 = 1.0, 4.0, 2.0
    history = [torch.tensor([v], dtype=torch.float64) for v in (F4, F2, F0)]
    # AB-2: 3/2·F4 − 1/2·F2 = 3 − 2 = 1.  AB-3: 23/12·2 − 16/12·4 + 5/12·1 = (46 − 64 + 5)/12 = −13/12.
    for step in (5, 6):  # the same forecast at every skipped step of the window
        assert steps_forecast("ab", 2, history, [4, 2, 0], step).item() == pytest.approx(1.0, abs=1e-15)
        assert steps_forecast("ab", 3, history, [4, 2, 0], step).item() == pytest.approx(-13 / 12, abs=1e-15)


def test_classical_coefficients_are_mol_caches_doubles():
    """Bit for bit the float literals of the classical table (what mol-cache's ABCache applies)."""
    table = {
        1: [1.0],
        2: [3 / 2, -1 / 2],
        3: [23 / 12, -16 / 12, 5 / 12],
        4: [55 / 24, -59 / 24, 37 / 24, -9 / 24],
        5: [1901 / 720, -2774 / 720, 2616 / 720, -1274 / 720, 251 / 720],
        6: [4277 / 1440, -7923 / 1440, 9982 / 1440, -7298 / 1440, 2877 / 1440, -475 / 1440],
    }
    for order, coeffs in table.items():
        assert classical_ab_coefficients(order).tolist() == coeffs
        # Independent of the checkpoints' steps and of the forecast step.
        assert (
            Forecaster("ab", order, "steps").coefficients(list(range(40, 0, -7)), 99, 100).tolist() == coeffs
        )
    with pytest.raises(ValueError):
        classical_ab_coefficients(0)


def test_orders_build_up_like_mol_cache():
    """One checkpoint: reuse; two: Taylor 1 / AB-2 (Forecaster.with_points keeps the clock)."""
    f = Forecaster("taylor", 3, "steps")
    assert f.with_points(2) == Forecaster("taylor", 1, "steps") and f.lower().clock == "steps"
    np.testing.assert_allclose(f.with_points(2).coefficients([4, 2], 5, 6), [3 / 2, -1 / 2])
    assert Forecaster("ab", 3, "steps").with_points(2).coefficients([4, 2], 7, 8).tolist() == [3 / 2, -1 / 2]
    assert Forecaster("taylor", 2, "steps").with_points(1).coefficients([4], 5, 6).tolist() == [1.0]


def reference_ladder(checkpoints, step, max_order):
    """The TaylorSeer / mol-cache procedure run literally: a ladder of tensors rebuilt at each checkpoint
    (oldest first), then Σ d_i x^i / i!. Independent of the coefficient form under test."""
    ladder, last = {}, None
    for s, F in checkpoints:
        new = {0: F}
        for i in range(max_order):
            if i not in ladder:
                break
            new[i + 1] = (new[i] - ladder[i]) / (s - last)
        ladder, last = new, s
    x = step - last
    return sum(d * x**i / math.factorial(i) for i, d in ladder.items())


@pytest.mark.parametrize("order", [1, 2, 3, 4])
def test_coefficients_equal_the_literal_ladder_on_uneven_checkpoints(order):
    g = torch.Generator().manual_seed(order)
    steps = [0, 1, 2, 4, 7, 9, 12]  # warm-up, then uneven gaps (an adaptive molecule's)
    outputs = [torch.randn(4, 3, generator=g, dtype=torch.float64) for _ in steps]
    for n in range(1, len(steps) + 1):
        checkpoints = list(zip(steps[:n], outputs[:n]))
        newest_first = [F for _, F in reversed(checkpoints)]
        stored = [s for s, _ in reversed(checkpoints)]
        for step in (steps[n - 1] + 1, steps[n - 1] + 3):
            f = Forecaster("taylor", order, "steps").with_points(n)
            c = f.coefficients(stored, step, step + 1)
            forecast = cache_forecast(newest_first[: f.points], c.tolist(), backend="reference")
            expected = reference_ladder(checkpoints, step, order)
            torch.testing.assert_close(forecast, expected, rtol=1e-12, atol=1e-12)


# -- polynomials in step index ---------------------------------------------------------------------------------


def poly(coeffs, s):
    return sum(c * s**i for i, c in enumerate(coeffs))


@pytest.mark.parametrize("order", [1, 2, 3, 4])
def test_taylor_is_exact_on_lines_and_its_top_rung_on_degree_m(order):
    g = torch.Generator().manual_seed(order)
    coeffs = torch.randn(order + 1, 2, 3, generator=g, dtype=torch.float64)
    uneven = [17, 12, 10, 9, 5][: order + 1]
    # Exact on polynomials of degree 1, whatever the spacing.
    history = [poly(coeffs[:2], s) for s in uneven]
    for step in (18, 20):
        torch.testing.assert_close(
            steps_forecast("taylor", order, history, uneven, step), poly(coeffs[:2], step)
        )
    # Uniform spacing D = 3: for a degree-m polynomial the top rung is its m-th derivative, so the order-m and
    # order-(m − 1) forecasts differ by exactly a_m·x^m.
    D, s0 = 3, 21
    steps = [s0 - D * k for k in range(order + 1)]
    history = [poly(coeffs, s) for s in steps]
    for x in (1, 2):
        top = steps_forecast("taylor", order, history, steps, s0 + x)
        below = steps_forecast("taylor", order - 1, history, steps, s0 + x)
        torch.testing.assert_close(top - below, coeffs[order] * x**order, rtol=1e-9, atol=1e-9)


def test_taylor_2_is_not_the_interpolating_quadratic():
    """F = a·s²: TaylorSeer's ladder at spacing D misses by −a·D·x (the term Newton's x(x + D) weight keeps)."""
    a, D = 0.7, 2
    steps = [4, 2, 0]
    history = [torch.tensor([a * s * s], dtype=torch.float64) for s in steps]
    for x in (1, 2):
        forecast = steps_forecast("taylor", 2, history, steps, 4 + x).item()
        assert forecast == pytest.approx(a * (4 + x) ** 2 - a * D * x, abs=1e-12)


@pytest.mark.parametrize("order", [1, 2, 3, 4])
def test_adams_bashforth_is_the_window_mean_of_degree_j_minus_1(order):
    """Uniform checkpoints every D: Σ b_i F_i = (1/D) ∫_{s0}^{s0+D} p for p of degree ≤ j − 1, not degree j."""
    g = torch.Generator().manual_seed(order)
    coeffs = torch.randn(order + 1, 3, generator=g, dtype=torch.float64)
    D, s0 = 3, 12
    steps = [s0 - D * k for k in range(order)]

    def window_mean(c):
        return sum(ci * ((s0 + D) ** (i + 1) - s0 ** (i + 1)) / ((i + 1) * D) for i, ci in enumerate(c))

    exact = steps_forecast("ab", order, [poly(coeffs[:order], s) for s in steps], steps, s0 + 1)
    torch.testing.assert_close(exact, window_mean(coeffs[:order]), rtol=1e-12, atol=1e-10)
    higher = steps_forecast("ab", order, [poly(coeffs, s) for s in steps], steps, s0 + 1)
    assert (higher - window_mean(coeffs)).abs().max() > 1e-6


# -- against clock="time" --------------------------------------------------------------------------------------


def test_default_clock_is_time_and_labels_are_unchanged():
    assert CacheConfig().clock == "time" and CacheConfig() == CacheConfig(clock="time")
    assert CacheConfig() != CacheConfig(clock="steps")
    assert "clock" not in repr(CacheConfig(forecaster="ab", interval=3))
    assert repr(CacheConfig(clock="steps")).endswith("skip_prefix=False, clock='steps')")
    assert Forecaster("taylor", 2) == Forecaster("taylor", 2, "time")


@pytest.mark.parametrize(
    "kind,order,same_on_linear",
    [
        ("reuse", 0, True),
        ("taylor", 0, True),
        ("taylor", 1, True),
        ("ab", 1, True),
        ("taylor", 2, False),
        ("taylor", 3, False),
        ("ab", 2, False),
        ("ab", 3, False),
    ],
)
def test_steps_equal_time_where_the_math_says(kind, order, same_on_linear):
    """Checkpoints every 2 steps, forecasting the step after the newest. On the linear grid t = s/N: lines in t
    are lines in s, so reuse and Taylor ≤ 1 agree; Taylor ≥ 2 (ladder ≠ interpolating polynomial) and AB ≥ 2
    (window mean over [s0, s0 + D] vs step mean over [s, s + 1]) do not. On the log grid only reuse agrees."""
    N = 20
    steps = [10, 8, 6, 4]
    f_steps, f_time = Forecaster(kind, order, "steps"), Forecaster(kind, order, "time")
    for schedule in ("linear", "log"):
        grid = time_grid(schedule, N).numpy()
        c_steps = f_steps.coefficients(steps, 11, 12)
        c_time = f_time.coefficients(grid[steps], grid[11], grid[12])
        same = np.allclose(c_steps, c_time, rtol=0, atol=1e-12)
        assert same == (f_steps.points == 1 or (schedule == "linear" and same_on_linear)), (schedule, c_steps)


# -- equivariance ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind,order", [("taylor", 1), ("taylor", 2), ("taylor", 4), ("ab", 2), ("ab", 3)])
def test_forecasts_rotate_and_translate_with_the_history(kind, order):
    g = torch.Generator().manual_seed(order)
    rotation = torch.linalg.qr(torch.randn(3, 3, generator=g, dtype=torch.float64))[0]
    shift = torch.randn(3, generator=g, dtype=torch.float64)
    steps = [9, 7, 4, 3, 0]
    history = [torch.randn(2, 5, 3, generator=g, dtype=torch.float64) for _ in steps]
    plain = steps_forecast(kind, order, history, steps, 11)
    rotated = steps_forecast(kind, order, [x @ rotation.T + shift for x in history], steps, 11)
    torch.testing.assert_close(rotated, plain @ rotation.T + shift)
    assert abs(Forecaster(kind, order, "steps").coefficients(steps, 11, 12).sum() - 1) < 1e-12


# -- the hook --------------------------------------------------------------------------------------------------


def record(model):
    """Every call's (mask, outputs) as the sampler sees them (after the cache hook), zero padded."""
    calls = []

    def hook(module, args, kwargs, output):
        mask = kwargs["atom_mask"].bool()
        calls.append([_zero_padding(o.detach().clone(), mask) for o in output])

    return calls, model.register_forward_hook(hook, with_kwargs=True)


@pytest.mark.parametrize("kind,order", [("taylor", 2), ("ab", 3)])
def test_sample_forecasts_the_mol_cache_formulas(model64, kind, order):
    """A whole fastflow.sample run, 8 steps, D = 2: evaluated 0, 2, 4, 6 and the forced last step 7; the
    forecasts at steps 1, 3 and 5 are the formulas applied to the evaluations at the sampler's step indices."""
    calls, handle_hook = record(model64)
    handle = patch_model(
        model64, kernels="reference", cache=CacheConfig(kind, order, interval=2, clock="steps")
    )
    try:
        result = sample(model64, **REQUEST)
        stats = handle.stats()
    finally:
        handle.unpatch()
        handle_hook.remove()
    assert len(calls) == 8 and result.stats["nfe"] == 4 * 5 and stats["forecasts"] == 4 * 3
    F = {s: calls[s] for s in (0, 2, 4, 6)}
    for i in range(4):  # coords, type, bond, charge
        F0, F2, F4 = F[0][i], F[2][i], F[4][i]
        if kind == "taylor":
            d1_2 = (F2 - F0) / 2
            d1_4, d2_4 = (F4 - F2) / 2, ((F4 - F2) / 2 - d1_2) / 2
            expected = {1: F0, 3: F2 + d1_2 * 1, 5: F4 + d1_4 * 1 + d2_4 * 1 / 2}
        else:
            expected = {1: F0, 3: 3 / 2 * F2 - 1 / 2 * F0, 5: 23 / 12 * F4 - 16 / 12 * F2 + 5 / 12 * F0}
        for step, value in expected.items():
            torch.testing.assert_close(calls[step][i], value, rtol=1e-12, atol=1e-12)
    assert all(torch.isfinite(c).all() for c in result.coords)


def test_sample_on_the_linear_grid_taylor_1_steps_equals_time(model64):
    """Whole runs, 12 steps, D = 3 (evaluated 0, 3, 6, 9, 11): Taylor-1 forecasts agree between the clocks on the
    linear grid (float64 rounding apart) and differ on the log grid; Taylor-2 (full order from step 7) differs."""
    request = dict(REQUEST, steps=12)

    def run(schedule, order, clock):
        cache = CacheConfig("taylor", order, interval=3, clock=clock)
        handle = patch_model(model64, kernels="reference", cache=cache)
        try:
            return sample(model64, schedule=schedule, **request)
        finally:
            handle.unpatch()

    def same(a, b):
        return all(torch.allclose(x, y, rtol=0, atol=1e-9) for x, y in zip(a.coords, b.coords))

    assert same(run("linear", 1, "steps"), run("linear", 1, "time"))
    assert not same(run("log", 1, "steps"), run("log", 1, "time"))
    assert not same(run("linear", 2, "steps"), run("linear", 2, "time"))


def test_direct_calls_count_steps_and_ignore_times(model64):
    """No sampler: the step index is the hook's call count. Calls at uneven times 0.1 … 0.4 are steps 0 … 3;
    the 4th (forecast) call is the ladder over steps 2, 1, 0 at step 3, whatever the times."""
    handle = patch_model(model64, cache=CacheConfig(interval=100, warmup=2, clock="steps"))
    inputs = random_inputs(TINY, [4, 6], dtype=torch.float64)
    mask = inputs["atom_mask"].bool()
    outputs = []
    for t in [0.1, 0.25, 0.33, 0.4]:
        inputs["inv_feats"][..., 0] = t
        outputs.append([_zero_padding(o, mask) for o in model64(**inputs)])
    handle.unpatch()
    assert handle.stats()["forecasts"] == 2
    for i in range(4):
        F0, F1, F2 = outputs[0][i], outputs[1][i], outputs[2][i]
        d1, d1_old = F2 - F1, F1 - F0
        expected = F2 + d1 + (d1 - d1_old) / 2  # x = 1, every gap 1: the ladder F2 + ∇F2 + ∇²F2/2
        torch.testing.assert_close(outputs[3][i], expected, rtol=1e-12, atol=1e-12)


def test_block_cache_with_step_clock(model):
    base = sample(model, **REQUEST)
    handle = patch_model(
        model,
        kernels="reference",
        cache=CacheConfig("ab", 2, interval=2, block="dynamics.layers.1", clock="steps"),
    )
    try:
        result = sample(model, **REQUEST)
        stats = handle.stats()
    finally:
        handle.unpatch()
    assert stats["forecasts"] == 4 * 3 and result.stats["nfe"] == base.stats["nfe"]  # the model still runs
    assert all(torch.isfinite(c).all() for c in result.coords)


def test_adaptive_taylor_takes_the_step_clock_and_ab_is_refused(model64):
    """Per-molecule step-index histories; the estimate (error="relative") is ‖d_m x^m / m!‖ / ‖F̂‖, growing with
    the horizon x."""
    cache = CacheConfig(interval=5, tolerance=1.0, clock="steps", error="relative")
    handle = patch_model(model64, kernels="reference", cache=cache)
    try:
        result = sample(model64, **dict(REQUEST, steps=12))
        stats = handle.stats()
    finally:
        handle.unpatch()
    assert 0 < stats["forecasts"] and result.stats["nfe"] == stats["evaluations"] < 4 * 12
    assert stats["error_estimates"]["count"] > 0
    with pytest.raises(ValueError, match="clock='steps' with ab"):
        CacheConfig("ab", 3, interval=4, tolerance=0.1, clock="steps")
    CacheConfig("ab", 3, interval=4, tolerance=0.1)  # the time clock still takes it


@pytest.mark.parametrize("bad", [dict(clock="index"), dict(clock=None), dict(clock="Steps")])
def test_unknown_clocks_are_refused(bad):
    with pytest.raises(ValueError, match="clock"):
        CacheConfig(**bad)
    with pytest.raises(ValueError, match="clock"):
        Forecaster("taylor", 1, bad["clock"])


# -- command line ----------------------------------------------------------------------------------------------


def parse(*argv):
    return cache_config(build_parser().parse_args(["sample", *argv]))


def test_cli_clock():
    assert parse("--cache", "taylor") == CacheConfig("taylor", interval=2)
    assert parse("--cache", "ab", "--clock", "steps") == CacheConfig("ab", interval=2, clock="steps")
    assert parse("--cache", "taylor", "--clock", "time").clock == "time"
    assert parse("--cache", "adaptive", "--tolerance", "0.1", "--clock", "steps").clock == "steps"
    with pytest.raises(ValueError, match="need --cache"):
        parse("--clock", "steps")
    assert parse() is None


def test_cli_refuses_clock_without_cache(capsys):
    assert main(["sample", "--n", "1", "--config", "tiny", "--clock", "steps"]) == 2
    assert "--clock need --cache" in capsys.readouterr().err
