"""Sampling: priors, time schedules, the Euler + discrete-flow integrator and the sampling loop.

``sample(model, n_molecules, ...)`` is the entry point. The network is reached only through a step function
``step_fn(model, state: FlowState, cond: SelfCond | None) -> Prediction`` (default :func:`model_step`, which
publishes each call's :class:`~fastflow.step_record.StepRecord` to the cache that ``patch_model`` installs
inside the model).
"""

from fastflow import rng  # the keyed random streams (fastflow.rng), as used by the sampler
from fastflow.ops.discrete_flow_step import discrete_flow_probs, sample_categorical
from fastflow.sampling.integrator import euler_coords, integrate_step
from fastflow.sampling.prior import sample_prior, zero_com
from fastflow.sampling.sampler import QM9_SIZE_COUNTS, SampleResult, draw_sizes, plan_batches, sample
from fastflow.sampling.schedule import SCHEDULES, time_grid
from fastflow.sampling.step import (
    FlowState,
    Prediction,
    SelfCond,
    StepFn,
    model_step,
)

__all__ = [
    "QM9_SIZE_COUNTS",
    "SCHEDULES",
    "FlowState",
    "Prediction",
    "SampleResult",
    "SelfCond",
    "StepFn",
    "discrete_flow_probs",
    "draw_sizes",
    "euler_coords",
    "integrate_step",
    "model_step",
    "plan_batches",
    "rng",
    "sample",
    "sample_categorical",
    "sample_prior",
    "time_grid",
    "zero_com",
]
