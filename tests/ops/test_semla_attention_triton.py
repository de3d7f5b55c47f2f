"""fastflow::semla_attention, Triton backend: against the float64 reference, opcheck, dtype errors.

Without a GPU these run on CPU tensors under Triton's interpreter (tests/conftest.py sets
TRITON_INTERPRET), about 1 ms per op per program, so every shape here is tiny.
"""

import pytest
import torch

from .semla_helpers import cast, max_relative_errors, random_inputs, seed_of

# (F, S, H, d_head, P, E_in, E_out): a tiny layer with edge input and output, an odd one without either, one
# whose hidden width takes three chunks of the kernel's F loop (16 columns each, the last one partial), and one
# whose coordinate sets and edge features take several chunks of their inner loops too (S, E > 32; partial).
CONFIGS = {
    "tiny": (16, 4, 2, 4, 4, 8, 8),
    "odd": (12, 3, 3, 3, 3, 0, 0),
    "chunks": (40, 5, 3, 2, 6, 4, 3),
    "set_and_edge_chunks": (40, 37, 3, 2, 6, 35, 5),
}
TOLERANCE = {torch.float32: 1e-5, torch.float64: 1e-12}  # on max|out - ref| / max|ref|


def sparse_adjacency(B, N, generator):
    """Random edges between the real atoms of each molecule, without self-loops; molecule 1 (if any) has one real
    atom. Padding atoms, the single atom of molecule 1 and, for N >= 3, atom 0 of molecule 0 (cut off on purpose)
    have rows without an edge."""
    real = torch.zeros(B, N, dtype=torch.bool)
    real[0] = True
    real[1:, 0] = True
    adjacency = real[:, :, None] & real[:, None, :] & ~torch.eye(N, dtype=torch.bool)
    adjacency &= torch.rand(B, N, N, generator=generator) < 0.7
    if N >= 3:
        adjacency[0, 0] = False
    return adjacency


def inputs(N, config, seed, B=2, adjacency=sparse_adjacency):
    """Float64 inputs of the op for CONFIGS[config] (semla_helpers.random_inputs)."""
    return random_inputs(CONFIGS[config], B, N, seed, adjacency)


def matches_reference(args, dtype, device):
    """The Triton backend in `dtype` against the reference in float64; returns max|out - ref| / max|ref| per
    output."""
    return max_relative_errors(args, dtype, "triton", TOLERANCE, device)


@pytest.mark.parametrize("config", list(CONFIGS))
@pytest.mark.parametrize("N", [1, 2, 3, 5, 17])
def test_float32_matches_reference(triton_device, N, config):
    matches_reference(inputs(N, config, seed_of(N, config)), torch.float32, triton_device)


@pytest.mark.parametrize("config", list(CONFIGS))
def test_float64_matches_reference(triton_device, config):
    matches_reference(inputs(5, config, seed_of("float64", config)), torch.float64, triton_device)


def test_several_tiles_of_j(triton_device):
    # N = 18 > BLOCK_J = 16: the online softmax rescales across tiles (and rows 0 and 1 share a block of rows i). Row 0's only edges lie in the second
    # tile (its running max is still -inf after the first); row 1 has no edge (softmax over every j).
    N = 18
    generator = torch.Generator().manual_seed(seed_of("tiles"))
    adjacency = torch.rand(1, N, N, generator=generator) < 0.5
    adjacency[0, 0] = False
    adjacency[0, 0, 16:] = True
    adjacency[0, 1] = False
    args = inputs(N, "tiny", seed_of("tiles", N), B=1, adjacency=adjacency)
    matches_reference(args, torch.float32, triton_device)


def test_large_logits_do_not_overflow(triton_device):
    # Logits of a few hundred: exp(z) overflows without the running-max shift.
    args = inputs(5, "odd", seed_of("large"))
    args[4] = args[4] * 40  # out_weight
    matches_reference(args, torch.float32, triton_device)


def test_opcheck(triton_device):
    # Inputs without requires_grad: the backward is the reference's (see fastflow/ops/semla_attention.py), and
    # checking it here would cost ~15 s of interpreter time for no Triton code.
    args = (
        cast(inputs(3, "tiny", seed_of("opcheck")), torch.float32, triton_device) + [None] * 4 + [1e-5, 1e-6]
    )
    torch.library.opcheck(torch.ops.fastflow.semla_attention_triton.default, args)


def test_launcher_rejects_other_dtypes(triton_device):
    from fastflow.triton_kernels import semla_attention as kernel

    args = cast(inputs(2, "odd", seed_of("half")), torch.float16, triton_device)
    with pytest.raises(TypeError, match="float32 or float64, got torch.float16"):
        kernel.semla_attention(*args, 1e-5, 1e-6)
