import numpy as np
import pytest
import torch

from fastflow.sampling import time_grid


@pytest.mark.parametrize("steps", [1, 2, 20, 100])
def test_linear_is_linspace(steps):
    grid = time_grid("linear", steps)
    assert grid.dtype == torch.float64 and grid.shape == (steps + 1,)
    np.testing.assert_array_equal(grid.numpy(), np.linspace(0, 1, steps + 1))


@pytest.mark.parametrize("steps", [1, 2, 20, 100])
def test_log_is_reversed_one_minus_geomspace(steps):
    grid = time_grid("log", steps).numpy()
    expected = [1 - x for x in np.geomspace(0.01, 1.0, steps + 1)][::-1]
    np.testing.assert_allclose(grid, expected, rtol=0, atol=1e-15)
    assert grid[0] == 0.0 and grid[-1] == pytest.approx(0.99)
    assert (np.diff(grid) > 0).all() and (np.diff(np.diff(grid)) < 0).all()  # steps shrink towards t = 1


@pytest.mark.parametrize(
    "schedule, steps, message",
    [
        ("cosine", 10, "unknown schedule"),
        ("log", 0, "steps must be"),
        ("linear", -3, "steps must be"),
        ("log", 2.5, "steps must be"),
        ("log", True, "steps must be"),
    ],
)
def test_bad_arguments(schedule, steps, message):
    with pytest.raises(ValueError, match=message):
        time_grid(schedule, steps)
