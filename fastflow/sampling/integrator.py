"""One solver step t → t + Δt (as SemlaFlow's ``Integrator`` with the ``uniform-sample`` strategy).

Coordinates: Euler on the conditional-OT velocity v = (x̂₁ − x_t) / (1 − t).
Atom types and bonds: the uniform-noise discrete flow of Campbell et al. 2024 ("Discrete Flow Models"),
sampled by inverse CDF from given uniforms so the draw is a deterministic function of (probabilities, u).
Charges are not integrated: the sampler keeps the last prediction.
"""

from __future__ import annotations

import torch

from fastflow.sampling import rng
from fastflow.sampling.prior import one_hot_masked
from fastflow.sampling.step import FlowState

T_EPS = 1e-5  # upstream clamps t to [eps, 1 − eps] in the categorical rates


def euler_coords(coords: torch.Tensor, pred_coords: torch.Tensor, t: torch.Tensor, dt: float) -> torch.Tensor:
    """x_{t+Δt} = x_t + Δt · (x̂₁ − x_t) / (1 − t). coords, pred_coords ``[B,N,3]``, t ``[B]``."""
    return coords + dt * (pred_coords - coords) / (1 - t.view(-1, 1, 1))


def discrete_flow_probs(classes: torch.Tensor, probs: torch.Tensor, t: torch.Tensor, dt: float,
                        noise_level: float) -> torch.Tensor:
    """Transition probabilities ``[..., K]`` of one uniform-noise CTMC step from current classes ``[...]``.

    With p̂ = predicted probabilities, c = current class, t clamped to [1e-5, 1 − 1e-5] and η = noise_level
    (0 once t + Δt ≥ 1): for k ≠ c, P(c→k) = min(1, Δt·p̂_k·(1 + 2η(K−1)t)/(1−t) + Δt·η·p̂_c);
    P(c→c) = max(0, 1 − Σ_{k≠c} P(c→k)). ``t`` ``[B]`` broadcasts over the leading axis.
    """
    n_classes = probs.size(-1)
    t = t.clamp(T_EPS, 1 - T_EPS).view(-1, *([1] * (probs.dim() - 1)))
    eta = (t + dt < 1.0).to(probs.dtype) * noise_level
    current = classes.unsqueeze(-1)
    p_current = probs.gather(-1, current)
    jump = dt * (1 + 2 * eta * (n_classes - 1) * t) / (1 - t) * probs + dt * eta * p_current
    jump = jump.clamp(max=1.0).scatter(-1, current, 0.0)
    stay = (1.0 - jump.sum(dim=-1, keepdim=True)).clamp(min=0.0)
    return jump.scatter(-1, current, stay)


def sample_categorical(weights: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Inverse-CDF draw ``[...]`` from unnormalised non-negative weights ``[..., K]`` with uniforms
    u ``[...]`` in [0, 1): the first class whose cumulative weight exceeds u · total (so zero-weight classes
    are never picked)."""
    cdf = weights.cumsum(dim=-1)
    below = cdf <= (u * cdf[..., -1]).unsqueeze(-1)
    return below.sum(dim=-1).clamp(max=weights.size(-1) - 1)


def integrate_step(state: FlowState, coords: torch.Tensor, type_probs: torch.Tensor, bond_probs: torch.Tensor,
                   grid: torch.Tensor, noise_level: float, keys: torch.Tensor) -> FlowState:
    """Move ``state`` from t_k to t_{k+1} (k = state.step, times from the float64 ``grid``) given the
    prediction: x̂₁ ``[B,N,3]``, softmaxed types ``[B,N,V]`` and bonds ``[B,N,N,K]``. keys ``[B]``:
    per-molecule keys; the step's uniforms are keyed by (molecule, step, atom or ordered pair). Padding stays
    zero."""
    k, n_atoms = state.step, state.mask.size(1)
    dt = float(grid[k + 1] - grid[k])
    mask = state.mask
    pair_mask = mask.unsqueeze(-1) & mask.unsqueeze(-2)
    step_keys = rng.combine(keys, k)

    new_coords = torch.where(mask.unsqueeze(-1), euler_coords(state.coords, coords, state.t, dt), 0.0)

    atom_u = rng.uniform(rng.combine(rng.atom_keys(step_keys, n_atoms), rng.STEP_ATOMS))
    atom_probs = discrete_flow_probs(state.atomics.argmax(-1), type_probs, state.t, dt, noise_level)
    atomics = one_hot_masked(sample_categorical(atom_probs, atom_u), type_probs.size(-1), mask,
                             type_probs.dtype)

    bond_u = rng.uniform(rng.combine(rng.pair_keys(step_keys, n_atoms), rng.STEP_BONDS))
    bond_step_probs = discrete_flow_probs(state.bonds.argmax(-1), bond_probs, state.t, dt, noise_level)
    bonds = one_hot_masked(sample_categorical(bond_step_probs, bond_u), bond_probs.size(-1), pair_mask,
                           bond_probs.dtype)

    t_next = torch.full_like(state.t, float(grid[k + 1]))
    t_after = torch.full_like(state.t, float(grid[k + 2])) if k + 2 < len(grid) else None
    return FlowState(new_coords, atomics, bonds, mask, t_next, k + 1, state.n_steps, state.mol_index, t_after)
