"""Counter-based random numbers keyed per molecule, so a molecule's sample never depends on its batch-mates.

Every random number the sampler uses is a pure function of integer keys — (seed, molecule index in the
request, stream, step, element index inside the molecule) — hashed with the SplitMix64 finaliser. Nothing
depends on the batch size, the padding or the device, and all draws of a batch are one vectorised tensor
expression (no per-molecule generator loop, no host round trip), which a fused sampler kernel can reproduce.

Arithmetic is on int64 tensors; multiplications wrap modulo 2^64 as unsigned ones would (two's complement),
and right shifts are made logical by masking off the sign-extended bits.
"""

from __future__ import annotations

import math

import torch


def _int64(value: int) -> int:
    """An unsigned 64-bit constant as the signed int64 with the same bits."""
    return value - (1 << 64) if value >= 1 << 63 else value


GOLDEN = _int64(0x9E3779B97F4A7C15)  # odd, so multiplying by it is a bijection modulo 2^64
_MIX1 = _int64(0xBF58476D1CE4E5B9)
_MIX2 = _int64(0x94D049BB133111EB)

# Streams: one per kind of draw, so no two draws of a molecule share a key.
SIZE, PRIOR_COORDS, PRIOR_ATOMS, PRIOR_BONDS, STEP_ATOMS, STEP_BONDS = range(6)


def _shift_right(x: torch.Tensor, bits: int) -> torch.Tensor:
    return (x >> bits) & ((1 << (64 - bits)) - 1)


def mix(x: torch.Tensor) -> torch.Tensor:
    """SplitMix64 finaliser: a bijection of 64-bit integers with good avalanche."""
    x = (x ^ _shift_right(x, 30)) * _MIX1
    x = (x ^ _shift_right(x, 27)) * _MIX2
    return x ^ _shift_right(x, 31)


def combine(key: torch.Tensor | int, value: torch.Tensor | int) -> torch.Tensor:
    """Key for the pair (key, value); broadcasts. Injective in ``value`` for a fixed key."""
    key = torch.as_tensor(key, dtype=torch.int64)
    if isinstance(value, int):  # mix a constant on the host: no tiny host-to-device copy per call
        return mix(key ^ int(mix(torch.tensor(value + 1) * GOLDEN)))
    return mix(key ^ mix((value.to(torch.int64) + 1) * GOLDEN))


def molecule_keys(seed: int, indices: torch.Tensor) -> torch.Tensor:
    """Root key ``[B]`` of each molecule: depends only on the seed and the molecule's index in the request."""
    return combine(combine(torch.tensor(seed, dtype=torch.int64), 0x5EED), indices)


def uniform(keys: torch.Tensor) -> torch.Tensor:
    """Float32 uniforms in [0, 1) from int64 keys (24 random bits, exact in float32)."""
    return _shift_right(mix(keys), 40).to(torch.float32) * 2.0**-24


def normal(keys: torch.Tensor) -> torch.Tensor:
    """Float32 standard normals from int64 keys (Box–Muller on two 24-bit uniforms, computed in float64)."""
    u1 = (_shift_right(mix(combine(keys, 1)), 40).to(torch.float64) + 1) * 2.0**-24  # (0, 1]: log is finite
    u2 = uniform(combine(keys, 2)).to(torch.float64)
    return (torch.sqrt(-2 * torch.log(u1)) * torch.cos(2 * math.pi * u2)).to(torch.float32)


def atom_keys(keys: torch.Tensor, n_atoms: int) -> torch.Tensor:
    """Per-atom keys ``[B, N]`` from per-molecule keys ``[B]``; atom a's key does not depend on N."""
    return combine(keys.unsqueeze(-1), torch.arange(n_atoms, device=keys.device))


def pair_keys(keys: torch.Tensor, n_atoms: int) -> torch.Tensor:
    """Per ordered pair keys ``[B, N, N]``; pair (i, j) is numbered i·2^32 + j, independent of N."""
    idx = torch.arange(n_atoms, device=keys.device)
    pair_index = (idx.unsqueeze(-1) << 32) + idx
    return combine(keys.view(-1, 1, 1), pair_index)
