"""Time grids of the sampler (as SemlaFlow's ``_generate``).

A grid has ``steps + 1`` points t_0 = 0 < … < t_steps; the model is evaluated at t_0 … t_{steps-1} and the
state is moved from t_k to t_{k+1}. The grid is built in float64 so that step sizes t_{k+1} − t_k are exact.
"""

from __future__ import annotations

import numpy as np
import torch

SCHEDULES = ("linear", "log")


def time_grid(schedule: str, steps: int) -> torch.Tensor:
    """Float64 tensor ``[steps + 1]`` of solver times.

    ``linear``: linspace(0, 1, steps + 1).
    ``log``: reverse(1 − geomspace(0.01, 1, steps + 1)) — runs 0 → 0.99 with steps shrinking towards the data
    end (upstream's default; it never reaches t = 1, the last prediction x̂₁ is the sample).
    """
    if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or steps < 1:
        raise ValueError(f"steps must be an integer >= 1, got {steps!r}")
    if schedule == "linear":
        grid = np.linspace(0.0, 1.0, steps + 1)
    elif schedule == "log":
        grid = (1.0 - np.geomspace(0.01, 1.0, steps + 1))[::-1].copy()
    else:
        raise ValueError(f"unknown schedule {schedule!r}; expected one of {SCHEDULES}")
    return torch.from_numpy(grid)
