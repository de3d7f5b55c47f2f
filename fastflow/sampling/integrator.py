"""One solver step t → t + Δt (as SemlaFlow's ``Integrator`` with the ``uniform-sample`` strategy).

Coordinates: Euler on the conditional-OT velocity v = (x̂₁ − x_t) / (1 − t).
Atom types and bonds: the uniform-noise discrete flow of Campbell et al. 2024 ("Discrete Flow Models"),
sampled by inverse CDF from keyed uniforms: the op :mod:`fastflow.ops.discrete_flow_step` (softmax, transition
weights, draw in one pass per element).
Charges are not integrated: the sampler keeps the last prediction.
"""

from __future__ import annotations

import torch

from fastflow import rng
from fastflow.ops.discrete_flow_step import discrete_flow_step
from fastflow.sampling.step import FlowState


def euler_coords(coords: torch.Tensor, pred_coords: torch.Tensor, t: torch.Tensor, dt: float) -> torch.Tensor:
    """x_{t+Δt} = x_t + Δt · (x̂₁ − x_t) / (1 − t). coords, pred_coords ``[B,N,3]``, t ``[B]``."""
    return coords + dt * (pred_coords - coords) / (1 - t.view(-1, 1, 1))


def integrate_step(
    state: FlowState,
    coords: torch.Tensor,
    type_logits: torch.Tensor,
    bond_logits: torch.Tensor,
    grid: torch.Tensor,
    noise_level: float,
    keys: torch.Tensor,
    kernels: str | None = None,
) -> tuple[FlowState, torch.Tensor, torch.Tensor]:
    """Move ``state`` from t_k to t_{k+1} (k = state.step, times from the float64 ``grid``) given the
    prediction: x̂₁ ``[B,N,3]`` (padding zero), type ``[B,N,V]`` and bond ``[B,N,N,K]`` logits. keys ``[B]``:
    per-molecule keys; the step's uniforms are keyed by (molecule, step, atom or ordered pair). Padding stays
    zero. Returns the new state and the softmaxed type and bond predictions (zero on padding): the next step's
    self-conditioning and, after the last step, the sample. ``kernels``: backend of the
    :func:`~fastflow.ops.discrete_flow_step.discrete_flow_step` op (default auto)."""
    k = state.step
    dt = float(grid[k + 1] - grid[k])
    mask = state.mask
    new_coords = torch.where(mask.unsqueeze(-1), euler_coords(state.coords, coords, state.t, dt), 0.0)
    type_probs, atomics = discrete_flow_step(
        type_logits, state.atomics, mask, state.t, keys, k, rng.STEP_ATOMS, dt, noise_level, backend=kernels
    )
    bond_probs, bonds = discrete_flow_step(
        bond_logits, state.bonds, mask, state.t, keys, k, rng.STEP_BONDS, dt, noise_level, backend=kernels
    )
    t_next = torch.full_like(state.t, float(grid[k + 1]))
    t_after = torch.full_like(state.t, float(grid[k + 2])) if k + 2 < len(grid) else None
    state = FlowState(
        new_coords, atomics, bonds, mask, t_next, k + 1, state.n_steps, state.mol_index, t_after
    )
    return state, type_probs, bond_probs
