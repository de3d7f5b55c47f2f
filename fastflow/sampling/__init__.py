"""Sampling: priors, time schedules, the Euler + discrete-flow integrator and the sampling loop.

``sample(model, n_molecules, ...)`` is the entry point. The network is reached only through a step function
``step_fn(model, state: FlowState, cond: SelfCond | None) -> Prediction`` (default :func:`model_step`), the
hook that caches and fused paths replace.
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
    StepContext,
    StepFn,
    current_step,
    model_step,
    step_context,
)

__all__ = [
    "QM9_SIZE_COUNTS",
    "SCHEDULES",
    "FlowState",
    "Prediction",
    "SampleResult",
    "SelfCond",
    "StepContext",
    "StepFn",
    "current_step",
    "step_context",
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
