"""fastflow::semla_attention, Triton backend: against the float64 reference, opcheck, dtype errors.

Without a GPU these run on CPU tensors under Triton's interpreter (tests/conftest.py sets
TRITON_INTERPRET), about 1 ms per op per program, so every shape here is tiny.
"""

import zlib

import pytest
import torch

from fastflow.ops.semla_attention import semla_attention, semla_attention_reference

# (F, S, H, d_head, P, E_in, E_out): a tiny layer with edge input and output, and an odd one without either.
CONFIGS = {"tiny": (16, 4, 2, 4, 4, 8, 8), "odd": (12, 3, 3, 3, 3, 0, 0)}
TOLERANCE = {torch.float32: 1e-5, torch.float64: 1e-12}  # on max|out - ref| / max|ref|


def random_inputs(N, config, seed, B=2, adjacency=None):
    """Float64 inputs of the op, all random (padding atoms too); molecule 1 (if any) has one real atom.

    Adjacency is random over the real atoms of each molecule, without self-loops, so padding atoms, the single
    atom of molecule 1 and, for N >= 3, atom 0 of molecule 0 (cut off on purpose) have rows without an edge.
    """
    F, S, H, D, P, E, EO = CONFIGS[config]
    generator = torch.Generator().manual_seed(seed)

    def randn(*shape, scale=1.0):
        return torch.randn(shape, generator=generator, dtype=torch.float64) * scale

    if adjacency is None:
        real = torch.zeros(B, N, dtype=torch.bool)
        real[0] = True
        real[1:, 0] = True
        adjacency = real[:, :, None] & real[:, None, :] & ~torch.eye(N, dtype=torch.bool)
        adjacency &= torch.rand(B, N, N, generator=generator) < 0.7
        if N >= 3:
            adjacency[0, 0] = False
    args = [
        randn(B, N, F),  # node_terms_i
        randn(B, N, F),  # node_terms_j
        randn(B, S, N, 3),  # gram_coords
        randn(F, S, scale=0.5),  # gram_weight
        randn(H + P + EO, F, scale=F**-0.5),  # out_weight
        randn(H + P + EO, scale=0.5),  # out_bias
        randn(B, N, H, D),  # values
        randn(B, P, N, 3),  # attn_coords
        adjacency,
    ]
    if E:
        args += [randn(B, N, N, E), 1 + randn(E, scale=0.2), randn(E, scale=0.2), randn(F, E, scale=E**-0.5)]
    else:
        args += [None] * 4
    return args


def cast(args, dtype, device):
    return [t.to(device, dtype) if torch.is_tensor(t) and t.is_floating_point() else
            t.to(device) if torch.is_tensor(t) else t for t in args]


def max_relative_errors(args, dtype, device):
    """Run the Triton backend in `dtype` and return max|out - ref| / max|ref| per output (ref in float64)."""
    outputs = semla_attention(*cast(args, dtype, device), backend="triton")
    expected = semla_attention_reference(*args)
    errors = []
    for out, ref in zip(outputs, expected):
        assert out.shape == ref.shape and out.dtype == dtype and out.is_contiguous()
        if ref.numel() == 0:
            errors.append(0.0)
            continue
        error, scale = (out.cpu().double() - ref).abs().max().item(), ref.abs().max().item()
        # A single atom's coord_agg is exactly 0 (its only difference vector is 0): demand an exact 0 then.
        assert error <= TOLERANCE[dtype] * scale, f"error {error:.3g} vs max|ref| {scale:.3g}"
        errors.append(error / scale if scale else error)
    return errors


def seed_of(*key):
    return zlib.crc32(repr(key).encode())  # a fresh, reproducible seed per case


@pytest.mark.parametrize("config", list(CONFIGS))
@pytest.mark.parametrize("N", [1, 2, 3, 5])
def test_float32_matches_reference(triton_device, N, config):
    max_relative_errors(random_inputs(N, config, seed_of(N, config)), torch.float32, triton_device)


@pytest.mark.parametrize("config", list(CONFIGS))
def test_float64_matches_reference(triton_device, config):
    max_relative_errors(random_inputs(5, config, seed_of("float64", config)), torch.float64, triton_device)


def test_several_tiles_of_j(triton_device):
    # N = 18 > BLOCK_J = 16: the online softmax rescales across tiles. Row 0's only edges lie in the second
    # tile (its running max is still -inf after the first); row 1 has no edge (softmax over every j).
    N = 18
    generator = torch.Generator().manual_seed(seed_of("tiles"))
    adjacency = torch.rand(1, N, N, generator=generator) < 0.5
    adjacency[0, 0] = False
    adjacency[0, 0, 16:] = True
    adjacency[0, 1] = False
    args = random_inputs(N, "tiny", seed_of("tiles", N), B=1, adjacency=adjacency)
    max_relative_errors(args, torch.float32, triton_device)


def test_large_logits_do_not_overflow(triton_device):
    # Logits of a few hundred: exp(z) overflows without the running-max shift.
    args = random_inputs(5, "odd", seed_of("large"))
    args[4] = args[4] * 40  # out_weight
    max_relative_errors(args, torch.float32, triton_device)


def test_opcheck(triton_device):
    # Inputs without requires_grad: the backward is the reference's (see fastflow/ops/semla_attention.py), and
    # checking it here would cost ~15 s of interpreter time for no Triton code.
    args = cast(random_inputs(3, "tiny", seed_of("opcheck")), torch.float32, triton_device) + [1e-5, 1e-6]
    torch.library.opcheck(torch.ops.fastflow.semla_attention_triton.default, args)


def test_launcher_rejects_other_dtypes(triton_device):
    from fastflow.triton_kernels import semla_attention as kernel

    args = cast(random_inputs(2, "odd", seed_of("half")), torch.float16, triton_device)
    with pytest.raises(TypeError, match="float32 or float64, got torch.float16"):
        kernel.semla_attention(*args, 1e-5, 1e-6)
