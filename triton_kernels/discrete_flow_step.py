"""Triton kernel of fastflow::discrete_flow_step: per atom or ordered pair, softmax of its K logits, the CTMC
transition weights, the keyed uniform (fastflow/rng.py's SplitMix64 keys, hashed in uint64 registers) and the
inverse-CDF draw. A program takes a block of elements × the K classes padded to a power of two. Schema, fake impl,
checks and reference: fastflow/ops/discrete_flow_step.py.
"""

import torch
import triton
import triton.language as tl

ELEMENT_BUDGET = {
    torch.float32: 2048,
    torch.float64: 512,
}  # BLOCK × padded K values per program: no spills on
# sm_80/sm_89/sm_90 (fastflow bench gpu-static) at K = 5 (bonds) and 18 (atom types)
T_EPS = tl.constexpr(1e-5)  # a global a @triton.jit function reads must be a constexpr


@triton.jit
def _mix(x):
    x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9
    x = (x ^ (x >> 27)) * 0x94D049BB133111EB
    return x ^ (x >> 31)


@triton.jit
def _combine(key, value):
    return _mix(key ^ _mix((value + 1) * 0x9E3779B97F4A7C15))


@triton.jit
def _discrete_flow_step_kernel(
    logits_ptr,
    current_ptr,
    mask_ptr,
    t_ptr,
    step_keys_ptr,
    stream_key_ptr,
    params_ptr,
    probs_ptr,
    next_ptr,
    n_elements,
    N,
    K,
    PAIRS: tl.constexpr,
    BLOCK: tl.constexpr,
    KP: tl.constexpr,
):
    # step_keys [B]: combine(molecule key, step); stream_key: mix((stream + 1)·golden), both hashed on the host
    # (fastflow.rng); params = (dt, noise_level) in the logits' dtype, as the reference computes them.
    dt = tl.load(params_ptr)
    noise_level = tl.load(params_ptr + 1)
    e = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    in_range = e < n_elements
    per_molecule = N * N if PAIRS else N
    b = e // per_molecule
    local = e % per_molecule
    i = local // N if PAIRS else local
    j = local % N if PAIRS else local
    valid = in_range & (tl.load(mask_ptr + b * N + i, mask=in_range, other=0) != 0)
    if PAIRS:
        valid = valid & (tl.load(mask_ptr + b * N + j, mask=in_range, other=0) != 0)

    k = tl.arange(0, KP)
    in_k = k < K
    offsets = e[:, None] * K + k[None, :]
    both = in_range[:, None] & in_k[None, :]
    z = tl.load(logits_ptr + offsets, mask=both, other=0.0)  # rows past the end stay finite (no inf − inf)
    z = tl.where(in_k[None, :], z, -float("inf"))
    top = tl.max(z, axis=1)
    ez = tl.where(in_k[None, :], tl.exp(z - top[:, None]), 0.0)
    p = ez * (1.0 / tl.sum(ez, axis=1))[:, None]

    current = tl.load(current_ptr + offsets, mask=both, other=-1.0)
    c = tl.argmax(current, axis=1)  # first maximum; an all-zero row gives 0
    is_c = k[None, :] == c[:, None]
    t = tl.load(t_ptr + b, mask=in_range, other=0.5)
    t = tl.minimum(tl.maximum(t, T_EPS), 1 - T_EPS)
    eta = tl.where(t + dt < 1.0, noise_level, 0.0).to(p.dtype)
    rate = dt * (1.0 + 2.0 * eta * (K - 1) * t) / (1.0 - t)
    p_c = tl.sum(tl.where(is_c, p, 0.0), axis=1)
    jump = tl.minimum(rate[:, None] * p + (dt * eta * p_c)[:, None], 1.0)
    jump = tl.where(is_c | ~in_k[None, :], 0.0, jump)
    stay = tl.maximum(1.0 - tl.sum(jump, axis=1), 0.0)
    w = tl.where(is_c, stay[:, None], jump)

    step_key = tl.load(step_keys_ptr + b, mask=in_range, other=0).to(tl.uint64)
    element = ((i.to(tl.uint64) << 32) + j.to(tl.uint64)) if PAIRS else i.to(tl.uint64)
    key = _mix(_combine(step_key, element) ^ tl.load(stream_key_ptr).to(tl.uint64))
    u = (_mix(key) >> 40).to(tl.float32) * 5.9604644775390625e-08  # 2^-24
    cdf = tl.cumsum(w, axis=1)
    total = tl.sum(w, axis=1)
    drawn = tl.sum(tl.where(in_k[None, :] & (cdf <= (u.to(p.dtype) * total)[:, None]), 1, 0), axis=1)
    drawn = tl.minimum(drawn, K - 1)

    keep = valid[:, None] & both
    tl.store(probs_ptr + offsets, tl.where(keep, p, 0.0), mask=both)
    tl.store(next_ptr + offsets, tl.where(keep & (k[None, :] == drawn[:, None]), 1.0, 0.0), mask=both)


def discrete_flow_step(logits, current, mask, t, keys, step, stream, dt, noise_level):
    """Launch on checked inputs (fastflow.ops.discrete_flow_step.check_inputs)."""
    from fastflow import rng

    logits, current, t = logits.contiguous(), current.contiguous(), t.contiguous()
    mask = mask.contiguous().to(torch.int8)
    step_keys = rng.combine(keys, int(step)).contiguous()
    stream_key = rng.mix(torch.tensor([int(stream) + 1], dtype=torch.int64) * rng.GOLDEN).to(logits.device)
    params = torch.tensor([dt, noise_level], dtype=logits.dtype, device=logits.device)
    probs, drawn = torch.empty_like(logits), torch.empty_like(logits)
    pairs = logits.dim() == 4
    N, K = logits.size(1), logits.size(-1)
    n_elements = logits.numel() // K
    KP = triton.next_power_of_2(K)
    block = min(256, max(16, ELEMENT_BUDGET[logits.dtype] // KP))
    grid = (triton.cdiv(n_elements, block),)
    _discrete_flow_step_kernel[grid](
        logits,
        current,
        mask,
        t,
        step_keys,
        stream_key,
        params,
        probs,
        drawn,
        n_elements,
        N,
        K,
        PAIRS=pairs,
        BLOCK=block,
        KP=KP,
    )
    return probs, drawn
