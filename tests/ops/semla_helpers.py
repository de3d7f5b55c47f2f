"""Shared helpers of the fastflow::semla_attention tests (C++ and Triton backends): seeded random inputs, casts,
and the comparison of a backend with the float64 reference."""

import zlib

import torch

from fastflow.ops.semla_attention import semla_attention, semla_attention_reference


def seed_of(*key):
    return zlib.crc32(repr(key).encode())  # a fresh, reproducible seed per case


def molecule_adjacency(B, N, generator):
    """Edges between the real atoms of each molecule, no self-loops. Molecules have padding atoms (N > 1);
    the last one (B > 1) has a single real atom, so its rows and all padding rows have no edge."""
    counts = torch.randint(max(1, N // 2), N + 1, (B,), generator=generator)
    if N > 1:
        counts[0] = N - 1  # some padding
    if B > 1:
        counts[-1] = 1
    real = torch.arange(N)[None, :] < counts[:, None]
    return real[:, :, None] & real[:, None, :] & ~torch.eye(N, dtype=torch.bool)


def random_inputs(config, B, N, seed, adjacency=molecule_adjacency):
    """Float64 inputs of the op (13 tensors or None), all random and non-zero (padding atoms too).

    config: (F, S, H, d_head, P, E_in, E_out); E_in = 0 means no edge-input block (its 4 arguments None).
    adjacency: a [B, N, N] bool tensor, or a function (B, N, generator) -> one, drawn from the same generator.
    """
    F, S, H, D, P, E, EO = config
    generator = torch.Generator().manual_seed(seed)

    def randn(*shape, scale=1.0, shift=0.0):
        return torch.randn(shape, generator=generator, dtype=torch.float64) * scale + shift

    args = [
        randn(B, N, F),  # node_terms_i
        randn(B, N, F),  # node_terms_j
        randn(B, S, N, 3),  # gram_coords
        randn(F, S, scale=S**-0.5),  # gram_weight
        randn(H + P + EO, F, scale=F**-0.5),  # out_weight
        randn(H + P + EO, scale=0.5),  # out_bias
        randn(B, N, H, D),  # values
        randn(B, P, N, 3),  # attn_coords
        adjacency(B, N, generator) if callable(adjacency) else adjacency,
    ]
    if E:
        args += [
            randn(B, N, N, E, scale=2.0, shift=0.5),
            randn(E, scale=0.2, shift=1.0),
            randn(E, scale=0.2),
            randn(F, E, scale=E**-0.5),
        ]
    else:
        args += [None] * 4
    return args


NO_EMBEDDING = (
    None,
) * 4  # the op's edge-embedding block (embed_weight1, embed_bias1, embed_weight2, embed_bias2)


def random_embedding(X, E_h, E, seed):
    """Float64 edge-embedding arguments (W_a [E_h, X], b_a, W_b [E, E_h], b_b) and a raw edge input maker."""
    generator = torch.Generator().manual_seed(seed)

    def randn(*shape, scale=1.0):
        return torch.randn(shape, generator=generator, dtype=torch.float64) * scale

    weights = [randn(E_h, X, scale=X**-0.5), randn(E_h), randn(E, E_h, scale=E_h**-0.5), randn(E, scale=0.5)]
    return weights, lambda B, N: randn(B, N, N, X)


def cast(args, dtype, device="cpu"):
    """The float tensors of `args` in `dtype`, every tensor on `device`; anything else as it is."""
    return [
        t.to(device, dtype)
        if torch.is_tensor(t) and t.is_floating_point()
        else t.to(device)
        if torch.is_tensor(t)
        else t
        for t in args
    ]


def max_relative_errors(args, dtype, backend, tolerance, device="cpu"):
    """Run `backend` on the float64 `args` cast to `dtype` (on `device`) and compare with the reference on `args`.

    Asserts each output's shape, dtype and contiguity and max|out - ref| <= tolerance[dtype] · max|ref| (so an
    output whose reference is exactly 0 must be exactly 0); returns max|out - ref| / max|ref| per output (0.0 for
    an empty output, the absolute error where the reference is 0).
    """
    outputs = semla_attention(*cast(args, dtype, device), backend=backend)
    expected = semla_attention_reference(*args)
    errors = []
    for out, ref in zip(outputs, expected):
        assert out.shape == ref.shape and out.dtype == dtype and out.is_contiguous()
        if ref.numel() == 0:
            errors.append(0.0)
            continue
        error, scale = (out.cpu().double() - ref).abs().max().item(), ref.abs().max().item()
        assert error <= tolerance[dtype] * scale, f"error {error:.3g} vs max|ref| {scale:.3g}"
        errors.append(error / scale if scale else error)
    return errors
