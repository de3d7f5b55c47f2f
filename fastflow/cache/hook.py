"""The cache hook: wraps one model instance's ``forward`` (and, for block caching, one submodule's).

Each call of the model is one solver step. The hook reads the batch, the solver time and the atom mask from the
call through the model's adapter (:mod:`fastflow.cache.adapter`), the step and molecule identities from the
:class:`~fastflow.step_record.StepRecord` a sampler publishes (:func:`~fastflow.step_record.current_step`) when
present, starts a new trajectory when the batch changes or time does not move forward, then evaluates or
forecasts:

- whole generator (default): on a forecast step the model does not run at all; under the adaptive policy only
  the molecules above tolerance run, as a sub-batch cropped to their largest size, so a molecule's decisions
  and outputs do not depend on its batch-mates (up to fp32 rounding of the forward). The adaptive error measure
  (``CacheConfig.error``, :mod:`fastflow.cache.policies`) is per molecule over its real atoms, and sees the
  coordinates only through a rotation-invariant RMS; ``error="sample"`` takes the Å per model unit from the
  adapter;
- block: the model runs and the block's output is forecast; downstream modules recompute. With
  ``skip_prefix`` the layers before the block (the adapter's ``prefix_layers``) are skipped too (they pass their
  inputs through and the block's forecast replaces their result).

The forecaster's clock is the solver time t (``CacheConfig.clock="time"``) or the step index
(``clock="steps"``, mol-cache's forecasts): the published ``StepRecord.step``, or without a sampler the hook's
own count of calls since the trajectory started. Evaluations are stored with their clock value, and the
forecast asks for the current step's.
"""

from __future__ import annotations

import functools
import inspect
from collections import defaultdict

import torch
from torch import nn

from fastflow.cache.adapter import ModelAdapter
from fastflow.cache.config import CacheConfig
from fastflow.cache.forecasters import Forecaster
from fastflow.cache.policies import (
    AdaptiveTolerance,
    FixedInterval,
    calibration_ratio,
    relative_error,
    sample_error,
)
from fastflow.cache.state import TrajectoryState
from fastflow.ops.cache_forecast import cache_forecast
from fastflow.step_record import StepRecord, current_step


class CacheStats:
    """Counters since the patch or the last reset(); molecules keyed by request index (batch row without the
    sampler). Evaluations and forecasts count molecules × calls of the cached module."""

    def __init__(self):
        self.evaluations = defaultdict(int)
        self.forecasts = defaultdict(int)
        self.estimates: list[torch.Tensor] = []
        self.calibration: list[torch.Tensor] = []
        self.trajectories = 0

    def count(self, mol_index: torch.Tensor, evaluated: torch.Tensor) -> None:
        for i, e in zip(mol_index.tolist(), evaluated.tolist()):
            (self.evaluations if e else self.forecasts)[i] += 1

    def summary(self) -> dict:
        evaluations, forecasts = sum(self.evaluations.values()), sum(self.forecasts.values())
        molecules = sorted(set(self.evaluations) | set(self.forecasts))
        return {
            "evaluations": evaluations,
            "forecasts": forecasts,
            "hit_rate": forecasts / max(evaluations + forecasts, 1),
            "trajectories": self.trajectories,
            "evaluations_per_molecule": {i: self.evaluations[i] for i in molecules},
            "error_estimates": _quantiles(self.estimates),
            "calibration_ratios": _quantiles(self.calibration),
        }


def _quantiles(values: list[torch.Tensor]) -> dict:
    values = torch.cat(values) if values else torch.zeros(0, dtype=torch.float64)
    values = values[torch.isfinite(values)]
    if not len(values):
        return {"count": 0}
    q = torch.quantile(values, torch.tensor([0.5, 0.95], dtype=values.dtype)).tolist()
    return {
        "count": len(values),
        "mean": values.mean().item(),
        "p50": q[0],
        "p95": q[1],
        "max": values.max().item(),
    }


def resolve_module(model: nn.Module, path: str) -> nn.Module:
    """The submodule at ``path`` ("dynamics.layers.5"), or a clear error naming what exists."""
    names = dict(model.named_modules())
    if path not in names:
        close = [name for name in names if name and name.split(".")[-1] == path.split(".")[-1]][:8]
        raise ValueError(
            f"no module at path {path!r} in {type(model).__name__}"
            + (f"; modules with that name: {close}" if close else "")
        )
    return names[path]


class CacheHook:
    """Installs the cache on ``model``, read through ``adapter`` (see the module docstring); ``remove()`` restores
    the instance."""

    def __init__(self, model: nn.Module, config: CacheConfig, backend: str, adapter: ModelAdapter):
        self.model, self.config, self.backend, self.adapter = model, config, backend, adapter
        self.forecaster = Forecaster(config.forecaster, config.order, config.clock)
        self.coord_scale = adapter.coord_scale(model)
        if config.adaptive:
            self.policy = AdaptiveTolerance(config.tolerance, config.interval, config.warmup, config.cooldown)
        else:
            self.policy = FixedInterval(config.interval, config.warmup, config.cooldown)
        self.block = None if config.block is None else resolve_module(model, config.block)
        self.prefix = adapter.prefix_layers(model, config.block) if config.skip_prefix else []
        self.signature = inspect.signature(model.forward)
        self.trajectory: TrajectoryState | None = None
        self.stats = CacheStats()
        # (trajectory, t, t_next, evaluate, clock, clock_next) during a model call in block mode
        self._call = None
        self._block_calls = 0
        self._saved: list[tuple[nn.Module, object]] = []

    # -- installation ------------------------------------------------------------------------------------------

    def install(self) -> None:
        self._wrap(self.model, self._model_forward)
        if self.block is not None:
            self._wrap(self.block, self._block_forward)
        for layer in self.prefix:
            self._wrap(layer, self._bypass_forward)

    def remove(self) -> None:
        for module, saved in reversed(self._saved):
            if saved is None:
                del module.forward  # back to the class's forward
            else:
                module.forward = saved
        self._saved = []

    def reset(self) -> None:
        self.trajectory, self.stats = None, CacheStats()

    def _wrap(self, module: nn.Module, handler) -> None:
        """Set the instance's ``forward`` (never the class's) to ``handler(original, *args, **kwargs)``."""
        self._saved.append((module, module.__dict__.get("forward")))
        module.forward = _HookedForward(handler, module.forward)

    # -- the model call ----------------------------------------------------------------------------------------

    def _model_forward(self, original, *args, **kwargs):
        bound = self.signature.bind(*args, **kwargs)
        coords, t, mask = self._read_call(bound)
        record = current_step()
        trajectory = self._trajectory(coords, mask, t, record)
        step = record.step if record is not None else trajectory.calls
        n_steps = record.n_steps if record is not None else None
        t_next = self._t_next(record, trajectory, t)
        clock, clock_next = self._clock(step, t, t_next)
        trajectory.calls, trajectory.last_t = trajectory.calls + 1, t

        if self.block is not None:
            evaluate = bool(trajectory.n_stored.min() == 0) or self.policy.evaluate(step, n_steps)
            self._call, self._block_calls = (trajectory, t, t_next, evaluate, clock, clock_next), 0
            try:
                output = original(*args, **kwargs)
            finally:
                self._call = None
            if self._block_calls != 1:
                raise RuntimeError(
                    f"the cached block {self.config.block!r} ran {self._block_calls} times in one "
                    "model call; a block cache needs a module that runs exactly once per call"
                )
            self.stats.count(trajectory.mol_index, torch.full_like(trajectory.n_stored, int(evaluate)))
            return output

        evaluate, forecast, pending = self._plan(trajectory, step, n_steps, clock, clock_next)
        rows = evaluate.nonzero().flatten()
        if len(rows) == len(evaluate):
            output = original(*args, **kwargs)
            fresh = _flatten(output)
            trajectory.structure = None if torch.is_tensor(output) else len(output)
        else:
            merged = forecast
            if len(rows):
                fresh = self._evaluate_rows(original, bound, rows, mask)
                # Out of place: the adaptive policy calibrates against the pure forecast below.
                merged = [f.index_put((rows,), computed.to(f.dtype)) for f, computed in zip(forecast, fresh)]
            output = _unflatten([m.to(coords.dtype) for m in merged], trajectory.structure)
        if len(rows):
            fresh = [_zero_padding(f, mask[rows]) for f in fresh]
            self._store(trajectory, rows, fresh, t, step, pending, clock)
        trajectory.forecasts_in_a_row[~evaluate] += 1
        self.stats.count(trajectory.mol_index, evaluate)
        if record is not None:
            record.nfe = len(rows)
        return output

    def _read_call(self, bound) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Every call, forecast steps too: the model's own ``check_inputs`` (same signature as its forward) where
        it has one, then the adapter's reading, which checks what the hook uses. Returns coords, the solver time
        ``[B]`` (float64, host) and the bool atom mask."""
        check = getattr(self.model, "check_inputs", None)
        if callable(check):
            check(*bound.args, **bound.kwargs)
        return self.adapter.read_call(bound)

    def _trajectory(self, coords, mask, t, record: StepRecord | None) -> TrajectoryState:
        signature = (tuple(coords.shape[:2]), coords.dtype, coords.device)
        mol_index = record.mol_index.to("cpu", copy=True) if record is not None else torch.arange(len(t))
        trajectory = self.trajectory
        if (
            trajectory is None
            or (record is not None and record.step == 0)
            or not trajectory.continues(signature, mask, mol_index, t)
        ):
            trajectory = self.trajectory = TrajectoryState(signature, mask, mol_index, self.forecaster.points)
            self.stats.trajectories += 1
        return trajectory

    @staticmethod
    def _t_next(record, trajectory, t) -> torch.Tensor:
        """The end of this step: from the sampler, else assume the step just taken repeats."""
        if record is not None and record.t_next is not None:
            return record.t_next.double().cpu()
        return t if trajectory.last_t is None else 2 * t - trajectory.last_t

    def _clock(self, step, t, t_next) -> tuple[torch.Tensor, torch.Tensor]:
        """The forecaster's clock ``[B]`` float64 now and at the end of the step: t and t_next themselves for
        clock="time"; the step index and the next one for clock="steps"."""
        if self.config.clock == "time":
            return t, t_next
        now = torch.full_like(t, float(step))
        return now, now + 1

    def _plan(self, trajectory, step, n_steps, t, t_next):
        """Which molecules to evaluate (bool ``[B]``), the forecast of all outputs (None if not needed) and, for
        the adaptive policy, (forecast, raw estimate) to calibrate against the evaluations. t, t_next: clock
        values (:meth:`_clock`)."""
        B = len(t)
        if trajectory.n_stored.min() == 0 or (
            not self.config.adaptive and self.policy.evaluate(step, n_steps)
        ):
            return torch.ones(B, dtype=torch.bool), None, None
        if not self.config.adaptive:
            return torch.zeros(B, dtype=torch.bool), self._forecast(trajectory, t, t_next), None
        high = self._forecast(trajectory, t, t_next)
        low = self._forecast(trajectory, t, t_next, lower=True)
        raw = self._error(low, high, trajectory.mask)
        raw[trajectory.n_stored < 2] = float("nan")  # one evaluation: no second order to compare
        estimate = raw * trajectory.calibration
        evaluate = self.policy.evaluate(step, n_steps, trajectory.forecasts_in_a_row, estimate)
        self.stats.estimates.append(estimate[~evaluate])
        return evaluate, high, (high, raw)

    def _error(self, a: list[torch.Tensor], b: list[torch.Tensor], mask: torch.Tensor) -> torch.Tensor:
        """The adaptive policy's measure (``CacheConfig.error``) of outputs a against the reference b, per molecule
        ``[B]`` float64 on the host. mask ``[B, N]`` bool: real atoms."""
        if self.config.error == "relative":
            return relative_error(a, b)
        if a[0].dim() != 3 or a[0].size(-1) != 3 or a[0].shape[:2] != mask.shape:
            raise ValueError(
                f"fastflow cache: error='sample' needs the sampler's outputs, x̂₁ [B, N, 3] first, got "
                f"{_describe(a[0])}; use error='relative' for other models"
            )
        return sample_error(a, b, mask, self.coord_scale, self.config.coord_reference)

    def _forecast(self, trajectory, t, t_next, lower=False) -> list[torch.Tensor]:
        """Forecasts ``[B, ...]`` of every output at clock values t (t_next: end of the step) at the highest order
        each molecule's history allows (``lower``: one order less, the error estimator's companion; zeros where
        there is none). When every molecule shares its clock values (the fixed policy), one ``cache_forecast``
        op call per output; otherwise (the adaptive policy) each molecule has its own coefficients, applied as
        one per-row combination per output."""
        groups = defaultdict(list)
        for b in range(len(t)):
            n = min(int(trajectory.n_stored[b]), self.forecaster.points)
            groups[(n, tuple(trajectory.times[:n, b].tolist()), float(t[b]), float(t_next[b]))].append(b)
        coeffs = torch.zeros(self.forecaster.points, len(t), dtype=torch.float64)  # [K, B]; 0: no forecast
        for (n, times, t_b, t_next_b), rows in groups.items():
            forecaster = self.forecaster.with_points(n)
            forecaster = forecaster.lower() if lower else forecaster
            if forecaster is None:
                continue
            n, c = forecaster.points, forecaster.coefficients(times, t_b, t_next_b)
            if len(groups) == 1:
                return [
                    cache_forecast(list(h[:n]), c.tolist(), backend=self.backend) for h in trajectory.history
                ]
            coeffs[:n, rows] = torch.from_numpy(c).unsqueeze(1)
        return [_combine_rows(h, coeffs) for h in trajectory.history]

    def _evaluate_rows(self, original, bound, rows, mask) -> list[torch.Tensor]:
        """The model on molecules ``rows`` only, cropped to their largest size; outputs padded back to N."""
        N = mask.size(1)
        n = int(mask[rows].any(0).nonzero().max()) + 1
        sub = self.signature.bind(*bound.args, **bound.kwargs)
        for name, value in sub.arguments.items():
            if torch.is_tensor(value):
                sub.arguments[name] = _crop(value, rows, len(mask), N, n)
        return [_pad(out, N, n) for out in _flatten(original(*sub.args, **sub.kwargs))]

    def _store(self, trajectory, rows, fresh, t, step, pending=None, clock=None) -> None:
        """Store the evaluations of molecules ``rows`` at clock values ``clock`` (default: solver times t)."""
        for i, out in enumerate(fresh):
            if not bool(torch.isfinite(out).all()):
                bad = (~torch.isfinite(out)).flatten(1).any(1)
                molecules = trajectory.mol_index[rows][bad.cpu()].tolist()
                raise FloatingPointError(
                    f"fastflow cache: output {i} of the model is NaN/inf at step {step} (t = {float(t[0]):.4f}) "
                    f"for molecules {molecules[:10]}; refusing to store it, forecasts would spread it"
                )
        if (
            pending is not None
        ):  # calibrate: true error of the forecast over the estimate, where there was one
            high, raw = pending
            known = torch.isfinite(raw[rows])
            actual = self._error([h[rows] for h in high], fresh, trajectory.mask[rows])
            ratio = calibration_ratio(actual[known], raw[rows][known])
            trajectory.calibration[rows[known]] = ratio
            self.stats.calibration.append(ratio)
        trajectory.store(rows, fresh, t if clock is None else clock)

    # -- block mode --------------------------------------------------------------------------------------------

    def _block_forward(self, original, *args, **kwargs):
        if self._call is None:  # called outside a model call: not a solver step
            return original(*args, **kwargs)
        trajectory, t, t_next, evaluate, clock, clock_next = self._call
        self._block_calls += 1
        if evaluate:
            output = original(*args, **kwargs)
            trajectory.structure = None if torch.is_tensor(output) else len(output)
            self._store(
                trajectory, torch.arange(len(t)), _flatten(output), t, trajectory.calls - 1, clock=clock
            )
            return output
        forecast = self._forecast(trajectory, clock, clock_next)
        trajectory.forecasts_in_a_row += 1
        return _unflatten([f.to(trajectory.signature[1]) for f in forecast], trajectory.structure)

    def _bypass_forward(self, original, *args, **kwargs):
        if self._call is not None and not self._call[3]:
            return self.adapter.bypass(
                args, kwargs
            )  # the block's forecast replaces what these layers compute
        return original(*args, **kwargs)


class _HookedForward:
    """An instance ``forward``: ``handler(original, *args, **kwargs)``. An object holding two bound methods, not a
    closure, so that ``copy.deepcopy(model)`` rebinds both to the copies (the copy's hook, the copy's forward):
    a copy runs its own weights and keeps its own cache state."""

    def __init__(self, handler, original):
        self.handler, self.original = handler, original
        functools.update_wrapper(self, original)  # inspect.signature sees the original's

    def __call__(self, *args, **kwargs):
        return self.handler(self.original, *args, **kwargs)


def _combine_rows(history: torch.Tensor, coeffs: torch.Tensor) -> torch.Tensor:
    """Σ_k coeffs[k, b] · history[k, b] for each molecule b: history ``[K, B, ...]``, coeffs ``[K, B]``.

    The per-molecule coefficients of the adaptive policy, in K broadcast multiply-adds over the whole batch. The
    ``cache_forecast`` op takes one coefficient set per call; one call per molecule, with its gathers, cost more
    than this whole pass (an adaptive run at tolerance 0.01 went from 142 s to 123 s on 1,000 molecules)."""
    shape = coeffs.shape + (1,) * (history.dim() - 2)
    coeffs = coeffs.to(history.device, history.dtype).view(shape)
    out = history[0] * coeffs[0]
    for k in range(1, len(history)):
        out.addcmul_(history[k], coeffs[k])
    return out


def _describe(value) -> str:
    return f"shape {list(value.shape)} ({value.dtype})" if torch.is_tensor(value) else type(value).__name__


def _flatten(output) -> list[torch.Tensor]:
    return [output] if torch.is_tensor(output) else list(output)


def _unflatten(tensors: list[torch.Tensor], structure):
    return tensors[0] if structure is None else tuple(tensors)


def _is_pair(x: torch.Tensor, n: int) -> bool:
    """``[B, n, n, ...]`` per-pair tensors (bonds) as opposed to ``[B, n, ...]`` per-atom ones."""
    return x.dim() >= 4 and x.size(1) == n and x.size(2) == n


def _crop(x: torch.Tensor, rows, B, N, n) -> torch.Tensor:
    if x.dim() == 0 or x.size(0) != B:
        return x
    x = x[rows]
    if x.dim() >= 2 and x.size(1) == N:
        x = x[:, :n, :n] if _is_pair(x, N) else x[:, :n]
    return x


def _pad(x: torch.Tensor, N, n) -> torch.Tensor:
    if x.dim() < 2 or x.size(1) != n or n == N:
        return x
    pair = _is_pair(x, n)
    out = x.new_zeros((x.size(0), N, N) + x.shape[3:] if pair else (x.size(0), N) + x.shape[2:])
    (out[:, :n, :n] if pair else out[:, :n]).copy_(x)
    return out


def _zero_padding(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """x with padding atoms / pairs set to 0 (``torch.where``: NaN in padding does not survive), so stored
    histories and error norms only see the molecule itself."""
    if x.dim() < 2 or x.size(1) != mask.size(1):
        return x
    keep = mask.unsqueeze(-1) & mask.unsqueeze(-2) if _is_pair(x, mask.size(1)) else mask
    return torch.where(keep.view(keep.shape + (1,) * (x.dim() - keep.dim())), x, 0)
