"""fastflow::discrete_flow_step: one step of the uniform-noise discrete flow for atom types or bonds, in one pass.

For every element e (an atom of molecule b, or an ordered pair of its atoms) with predicted logits z_e ∈ R^K and
current class c_e (the argmax of its one-hot), at solver time t_b with step Δt and noise η:

    p̂_e      = softmax(z_e)                                          the prediction (returned: self-conditioning)
    t'       = clamp(t_b, 1e-5, 1 − 1e-5);  η' = η if t_b + Δt < 1 else 0
    w_e,k    = min(1, Δt·p̂_e,k·(1 + 2η'(K−1)t')/(1 − t') + Δt·η'·p̂_e,c)    k ≠ c      jump weights
    w_e,c    = max(0, 1 − Σ_{k≠c} w_e,k)                                                stay weight
    u_e      = uniform(key(b, step, stream, e))                         the keyed random stream (fastflow.rng)
    c'_e     = min{k : Σ_{j≤k} w_e,j > u_e · Σ_j w_e,j}                   inverse-CDF draw
    returned: p̂ and the one-hot of c', both zero on padding atoms and on pairs with a padding atom.

This is the discrete part of the Campbell et al. (2024) CTMC step that SemlaFlow samples with
(``uniform-sample``); the key of element e is (molecule key, step, stream, atom a) for atoms and (…, i·2^32 + j)
for pair (i, j), so a molecule's draws do not depend on its batch-mates or on the padded size. The reference
materialises the softmax, the transition weights, the keys and the uniforms as tensors (about twenty passes
over [B, N, N, K]); the C++ kernel does one pass per element with the key hashed in registers.

Inference op (sampling runs under no_grad): it has no autograd formula.

Implementations (fastflow.ops.backends picks one):
    reference  discrete_flow_step_reference below
    cpp        torch.ops.fastflow.discrete_flow_step    schema csrc/registration.cpp, kernel csrc/discrete_flow_step.cpp
    triton     torch.ops.fastflow.discrete_flow_step_triton   kernel triton_kernels/discrete_flow_step.py (CUDA)
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from fastflow import rng
from fastflow.ops.backends import FLOAT_DTYPES, bind_cpp_ops, register_cpp_op, resolve_backend

T_EPS = 1e-5  # upstream clamps t to [eps, 1 − eps] in the categorical rates


def discrete_flow_step(
    logits,
    current,
    mask,
    t,
    keys,
    step: int,
    stream: int,
    dt: float,
    noise_level: float,
    backend: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One discrete-flow step (see the module docstring).

    Arguments (B molecules, N atoms, K classes):
        logits: ``[B, N, K]`` (atoms) or ``[B, N, N, K]`` (ordered pairs), float32 or float64.
        current: the current one-hot classes, same shape and dtype (all-zero rows on padding are fine).
        mask: ``[B, N]`` bool, real atoms. t: ``[B]`` solver time, dtype of logits. keys: ``[B]`` int64 molecule
            keys (:func:`fastflow.rng.molecule_keys`). step: the solver step k; stream: ``rng.STEP_ATOMS`` or
            ``rng.STEP_BONDS``. dt: t_{k+1} − t_k; noise_level: η ≥ 0.
        backend: "auto" (default), "cpp", "triton" or "reference".
    Return:
        (probs, next_one_hot), both shaped like logits, contiguous, zero on padding.
    """
    check_inputs(logits, current, mask, t, keys, step, stream, dt, noise_level)
    chosen = resolve_backend(backend, logits.device)
    if chosen == "cpp":
        return _cpp_op()(
            logits.contiguous(),
            current.contiguous(),
            mask.contiguous(),
            t.contiguous(),
            keys.contiguous(),
            int(step),
            int(stream),
            float(dt),
            float(noise_level),
        )
    if chosen == "triton":
        return discrete_flow_step_triton(
            logits, current, mask, t, keys, int(step), int(stream), float(dt), float(noise_level)
        )
    return discrete_flow_step_reference(logits, current, mask, t, keys, step, stream, dt, noise_level)


def discrete_flow_step_reference(
    logits, current, mask, t, keys, step: int, stream: int, dt: float, noise_level: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """The definition, in plain PyTorch."""
    pairs, n_atoms, n_classes = logits.dim() == 4, mask.size(1), logits.size(-1)
    valid = mask.unsqueeze(-1) & mask.unsqueeze(-2) if pairs else mask
    probs = torch.where(valid.unsqueeze(-1), F.softmax(logits, dim=-1), 0.0)
    element_keys = (rng.pair_keys if pairs else rng.atom_keys)(rng.combine(keys, step), n_atoms)
    u = rng.uniform(rng.combine(element_keys, stream))
    weights = discrete_flow_probs(current.argmax(-1), probs, t, dt, noise_level)
    drawn = F.one_hot(sample_categorical(weights, u), n_classes).to(probs.dtype) * valid.unsqueeze(-1)
    return probs.contiguous(), drawn


def discrete_flow_probs(
    classes: torch.Tensor, probs: torch.Tensor, t: torch.Tensor, dt: float, noise_level: float
) -> torch.Tensor:
    """Transition weights w ``[..., K]`` of one uniform-noise CTMC step from current classes ``[...]`` (the
    module docstring's w; t ``[B]`` broadcasts over the leading axis)."""
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
    """Inverse-CDF draw ``[...]`` from unnormalised non-negative weights ``[..., K]`` with uniforms u ``[...]`` in
    [0, 1): the first class whose cumulative weight exceeds u · total (so zero-weight classes are never picked)."""
    cdf = weights.cumsum(dim=-1)
    below = cdf <= (u * cdf[..., -1]).unsqueeze(-1)
    return below.sum(dim=-1).clamp(max=weights.size(-1) - 1)


def check_inputs(logits, current, mask, t, keys, step, stream, dt, noise_level) -> None:
    """Raise with a message naming the argument, the expectation and what arrived."""
    op = "discrete_flow_step"
    if (
        not torch.is_tensor(logits)
        or logits.dim() not in (3, 4)
        or (logits.dim() == 4 and logits.size(1) != logits.size(2))
    ):
        got = f"shape {list(logits.shape)}" if torch.is_tensor(logits) else type(logits).__name__
        raise ValueError(f"{op}: logits must be [B, N, K] (atoms) or [B, N, N, K] (pairs), got {got}")
    B, N, K = logits.size(0), logits.size(1), logits.size(-1)
    if B == 0 or N == 0 or K == 0:
        raise ValueError(f"{op}: empty logits of shape {list(logits.shape)}")
    if logits.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{op}: logits must be float32 or float64, got {logits.dtype}")
    for name, tensor, shape, dtype in (
        ("current", current, tuple(logits.shape), logits.dtype),
        ("mask", mask, (B, N), torch.bool),
        ("t", t, (B,), logits.dtype),
        ("keys", keys, (B,), torch.int64),
    ):
        if not torch.is_tensor(tensor) or tuple(tensor.shape) != shape:
            got = f"shape {list(tensor.shape)}" if torch.is_tensor(tensor) else type(tensor).__name__
            raise ValueError(f"{op}: {name} must have shape {list(shape)}, got {got}")
        if tensor.dtype != dtype:
            raise TypeError(f"{op}: {name} must have dtype {dtype}, got {tensor.dtype}")
        if tensor.device != logits.device:
            raise ValueError(f"{op}: {name} is on {tensor.device}, expected {logits.device} like logits")
    if int(step) < 0 or int(stream) < 0:
        raise ValueError(f"{op}: step and stream must be >= 0, got {step} and {stream}")
    if not (math.isfinite(dt) and dt > 0) or not (math.isfinite(noise_level) and noise_level >= 0):
        raise ValueError(f"{op}: dt must be > 0 and noise_level >= 0 (finite), got {dt} and {noise_level}")


def _fake(logits, current, mask, t, keys, step, stream, dt, noise_level):
    # Shapes for torch.compile / export; the checks also run here (a meta input sends the C++ op here).
    check_inputs(logits, current, mask, t, keys, step, stream, dt, noise_level)
    return torch.empty_like(logits, memory_format=torch.contiguous_format), torch.empty_like(
        logits, memory_format=torch.contiguous_format
    )


def _cpp_op():
    """The C++ op, with its fake kernel registered once fastflow._C has defined it (schema in C++)."""
    return register_cpp_op("discrete_flow_step", _fake)


bind_cpp_ops(_cpp_op)


# custom_op, not triton_op: see cache_forecast.py.
@torch.library.custom_op("fastflow::discrete_flow_step_triton", mutates_args=())
def discrete_flow_step_triton(
    logits: torch.Tensor,
    current: torch.Tensor,
    mask: torch.Tensor,
    t: torch.Tensor,
    keys: torch.Tensor,
    step: int,
    stream: int,
    dt: float,
    noise_level: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    from fastflow.triton_kernels import (
        discrete_flow_step as kernel,  # lazy: importing fastflow never needs triton
    )

    check_inputs(
        logits, current, mask, t, keys, step, stream, dt, noise_level
    )  # a bad launch reads out of bounds
    return kernel.discrete_flow_step(logits, current, mask, t, keys, step, stream, dt, noise_level)


discrete_flow_step_triton.register_fake(_fake)
