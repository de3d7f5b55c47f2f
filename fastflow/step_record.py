"""The solver step a model call belongs to, published by the sampler to hooks inside the model.

A hook installed inside the model (the cache of ``fastflow.patch_model``) sees only the model's inputs. The
sampler publishes a :class:`StepRecord` around each model call (:func:`publish_step`); the hook reads it with
:func:`current_step` and writes back the molecule evaluations it really spent (``nfe``). This module imports
neither the sampler nor the hooks: both depend on it, not on each other. Custom loops publish their own
records the same way: ``with publish_step(StepRecord(k, n_steps, t, t_next, mol_index, nfe=B)): model(...)``.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass

import torch


@dataclass
class StepRecord:
    """One model call of a solver: step k of n_steps (the model is called for k = 0 … n_steps − 1) at times
    t ``[B]``, ending at t_next ``[B]`` (None after the last step), for the molecules with request indices
    mol_index ``[B]`` (stable across the steps of one batch); nfe: molecule evaluations spent on the call, B
    until a hook that skips molecules lowers it."""

    step: int
    n_steps: int
    t: torch.Tensor
    t_next: torch.Tensor | None
    mol_index: torch.Tensor
    nfe: int


_CURRENT_STEP: ContextVar[StepRecord | None] = ContextVar("fastflow_step", default=None)


def current_step() -> StepRecord | None:
    """The step whose model call is running (None outside :func:`publish_step`)."""
    return _CURRENT_STEP.get()


@contextmanager
def publish_step(record: StepRecord) -> Iterator[StepRecord]:
    """Make ``record`` the :func:`current_step` for the duration of one model call."""
    token = _CURRENT_STEP.set(record)
    try:
        yield record
    finally:
        _CURRENT_STEP.reset(token)
