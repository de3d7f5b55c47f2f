"""fastflow::cache_forecast: forecast a cached tensor as a linear combination of its history.

    forecast = sum_k coeffs[k] * history[k]          history[k]: (*shape), all alike; k = 0..K-1

The predictive feature cache (fastflow.cache) keeps the last K outputs F_k of a model or block, computed at
solver times t_k, and forecasts the output at time t as sum_k c_k(t) F_k (Newton divided differences for
Taylor, variable-step Adams-Bashforth). The coefficients depend only on times, so the host computes them and
the kernel only combines: one pass over memory, K reads and one write per element. Scalar coefficients commute
with rotations, so the forecast of an equivariant output is equivariant.

The Euler update fuses in without a new op: x + dt * sum_k c_k F_k is this combination over
[x, F_0, ..., F_K-1] with coeffs [1, dt c_0, ..., dt c_K-1].

Implementations (fastflow.ops.backends picks one):
    reference  cache_forecast_reference below
    cpp        torch.ops.fastflow.cache_forecast
               schema in csrc/registration.cpp, kernel in csrc/cache_forecast.cpp
    triton     torch.ops.fastflow.cache_forecast_triton
               kernel in triton_kernels/cache_forecast.py (CUDA)
"""

import math
from collections.abc import Sequence

import torch

from fastflow.ops.backends import FLOAT_DTYPES, bind_cpp_ops, register_cpp_op, resolve_backend


def cache_forecast(history: Sequence[torch.Tensor], coeffs: Sequence[float], backend: str | None = None):
    """sum_k coeffs[k] * history[k] in one pass over memory.

    Arguments:
        history: K >= 1 tensors (*shape), same shape, dtype (float32 or float64) and device; any strides.
        coeffs: K finite floats.
        backend: "auto" (default), "cpp", "triton" or "reference"; see fastflow.ops.backends.
    Return:
        forecast: (*shape), contiguous, dtype of history; accumulated in float32 (float64 for float64
            history).
    """
    history, coeffs = list(history), [float(c) for c in coeffs]
    check_inputs(history, coeffs)
    chosen = resolve_backend(backend, history[0].device)
    if chosen == "cpp":
        return _cpp_op()(history, coeffs)
    if chosen == "triton":
        return cache_forecast_triton(history, coeffs)
    return cache_forecast_reference(history, coeffs)


def cache_forecast_reference(history: Sequence[torch.Tensor], coeffs: Sequence[float]) -> torch.Tensor:
    """The definition, in plain PyTorch (autograd included)."""
    accumulate_dtype = torch.promote_types(history[0].dtype, torch.float32)
    forecast = sum(c * F.to(accumulate_dtype) for c, F in zip(coeffs, history, strict=True))
    return forecast.to(history[0].dtype).contiguous()


def check_inputs(history: Sequence[torch.Tensor], coeffs: Sequence[float]) -> None:
    """Raise with a message naming the argument, the expectation and what arrived."""
    if len(history) == 0:
        raise ValueError("cache_forecast: history must hold at least one tensor, got 0")
    if len(coeffs) != len(history):
        raise ValueError(
            f"cache_forecast: coeffs must have one entry per history tensor ({len(history)}), "
            f"got {len(coeffs)}"
        )
    first = history[0]
    if first.dtype not in FLOAT_DTYPES:
        raise TypeError(f"cache_forecast: history must be float32 or float64, got {first.dtype}")
    for k, (F, c) in enumerate(zip(history, coeffs)):
        if F.dtype != first.dtype:
            raise TypeError(
                f"cache_forecast: history[{k}] must have dtype {first.dtype} like history[0], got {F.dtype}"
            )
        if F.device != first.device:
            raise ValueError(
                f"cache_forecast: history[{k}] must be on {first.device} like history[0], got {F.device}"
            )
        if F.shape != first.shape:
            raise ValueError(
                f"cache_forecast: history[{k}] must have shape {tuple(first.shape)} like "
                f"history[0], got {tuple(F.shape)}"
            )
        if not math.isfinite(c):
            raise ValueError(f"cache_forecast: coeffs[{k}] must be finite, got {c}")


def _forecast_fake(history, coeffs):
    # Shape, dtype and device of the output, so torch.compile and torch.export can trace the op.
    check_inputs(history, coeffs)
    return history[0].new_empty(history[0].shape)


# Linear in each history tensor: d forecast / d history[k] = coeffs[k].
def _setup_context(ctx, inputs, output):
    ctx.coeffs = inputs[1]


def _backward(ctx, grad):
    return [c * grad for c in ctx.coeffs], None


def _cpp_op():
    """The C++ op, with fake and autograd registered once fastflow._C has defined it (schema in C++)."""
    return register_cpp_op("cache_forecast", _forecast_fake, _backward, _setup_context)


bind_cpp_ops(_cpp_op)


# custom_op, not triton_op: triton_op traces the launcher with fake tensors, which breaks opcheck, compile and
# export under TRITON_INTERPRET=1 (the interpreter touches real storage).
@torch.library.custom_op("fastflow::cache_forecast_triton", mutates_args=())
def cache_forecast_triton(history: list[torch.Tensor], coeffs: list[float]) -> torch.Tensor:
    from fastflow.triton_kernels import (
        cache_forecast as kernel,  # lazy: importing fastflow never needs triton
    )

    check_inputs(history, coeffs)  # here too: a kernel launched on mismatched history reads out of bounds
    return kernel.cache_forecast(history, coeffs)


cache_forecast_triton.register_fake(_forecast_fake)
cache_forecast_triton.register_autograd(_backward, setup_context=_setup_context)
