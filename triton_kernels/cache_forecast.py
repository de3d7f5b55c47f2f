"""Triton kernel of fastflow::cache_forecast: out = sum_k coeffs[k] * history[k], any K in one launch.

The K history tensors reach the kernel as a table of their addresses, so one compiled kernel serves every K
and every tensor is read exactly once. Schema, fake impl and reference: fastflow/ops/cache_forecast.py.
"""

import torch
import triton
import triton.language as tl

BLOCK = 1024


@triton.jit
def _cache_forecast_kernel(
    history_addresses,  # [K] int64: data pointers of the K contiguous history tensors
    coeffs,  # [K] in the accumulation dtype (fp32, or fp64 for fp64 history)
    out,  # [numel] output, in the history dtype
    numel,
    K,
    BLOCK: tl.constexpr,
):
    offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < numel
    forecast = tl.zeros([BLOCK], coeffs.dtype.element_ty)
    for k in range(K):
        F_k = tl.load(history_addresses + k).to(tl.pointer_type(out.dtype.element_ty))
        forecast += tl.load(coeffs + k) * tl.load(F_k + offsets, mask=mask).to(forecast.dtype)
    tl.store(out + offsets, forecast.to(out.dtype.element_ty), mask=mask)


def cache_forecast(history: list[torch.Tensor], coeffs: list[float]) -> torch.Tensor:
    """Launch on validated inputs (same shape, dtype, device; len(coeffs) == len(history) >= 1)."""
    history = [
        F.contiguous() for F in history
    ]  # this list keeps the copies alive while the kernel reads them
    first = history[0]
    out = torch.empty(first.shape, dtype=first.dtype, device=first.device)
    if out.numel() == 0:
        return out
    accumulate_dtype = torch.float64 if first.dtype == torch.float64 else torch.float32
    addresses = torch.tensor([F.data_ptr() for F in history], dtype=torch.int64, device=first.device)
    coeffs = torch.tensor(coeffs, dtype=accumulate_dtype, device=first.device)
    grid = (triton.cdiv(out.numel(), BLOCK),)
    _cache_forecast_kernel[grid](addresses, coeffs, out, out.numel(), len(history), BLOCK=BLOCK)
    return out
