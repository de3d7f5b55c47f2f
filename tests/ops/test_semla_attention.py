"""fastflow::semla_attention, C++ backend: against the float64 reference, opcheck, gradients, symmetries, errors."""

import importlib

import pytest
import torch

from fastflow import _extension
from fastflow.ops.semla_attention import semla_attention, semla_attention_reference

from . import semla_helpers
from .semla_helpers import (
    NO_EMBEDDING,
    cast,
    max_relative_errors,
    molecule_adjacency,
    random_embedding,
    seed_of,
)

op = importlib.import_module("fastflow.ops.semla_attention")  # the module: the name above is the function

pytestmark = pytest.mark.usefixtures("single_thread")

# (F, S, H, d_head, P, E_in, E_out); E_in = 0 means no edge-input block.
CONFIGS = {
    "tiny": (16, 4, 4, 8, 4, 16, 16),
    "small": (64, 16, 16, 8, 16, 64, 64),
    "odd": (24, 3, 5, 3, 3, 0, 7),
}
TOLERANCE = {torch.float32: 1e-5, torch.float64: 1e-10}  # on max|out - ref64| / max|ref64|


def random_adjacency(B, N, generator):
    """Arbitrary bool adjacency (self-loops allowed), with every third row empty."""
    adjacency = torch.rand(B, N, N, generator=generator) < 0.5
    adjacency[:, ::3] = False
    return adjacency


def random_inputs(config, B, N, seed, edge_in=None, E_out=None, adjacency=molecule_adjacency):
    """Float64 inputs of the op for CONFIGS[config] (semla_helpers.random_inputs); edge_in (a bool) drops or adds
    the edge-input block (16 channels where the config has none), E_out overrides the edge outputs."""
    F, S, H, D, P, E, EO = CONFIGS[config]
    E = E if edge_in is None else (E or 16) * edge_in
    EO = EO if E_out is None else E_out
    return semla_helpers.random_inputs((F, S, H, D, P, E, EO), B, N, seed, adjacency)


def assert_matches_reference(args, dtype):
    """The cpp backend in `dtype` against the reference in float64; returns max|out - ref| / max|ref| per output."""
    return max_relative_errors(args, dtype, "cpp", TOLERANCE)


# ---- against the reference ----


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("E_out", [0, 8])
@pytest.mark.parametrize("edge_in", [False, True])
@pytest.mark.parametrize("N", [1, 2, 3, 17, 44, 100])
def test_cpp_matches_reference(N, edge_in, E_out, dtype):
    config, B = ("tiny", 1) if N == 100 else ("small", 3)
    args = random_inputs(config, B, N, seed_of(N, edge_in, E_out, str(dtype)), edge_in=edge_in, E_out=E_out)
    assert_matches_reference(args, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("config", list(CONFIGS))
def test_cpp_matches_reference_configs(config, dtype):
    assert_matches_reference(random_inputs(config, 4, 17, seed_of(config, str(dtype))), dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("config", ["tiny", "odd"])
def test_arbitrary_adjacency_with_empty_rows(config, dtype):
    args = random_inputs(
        config, 3, 13, seed_of("random adjacency", config, str(dtype)), adjacency=random_adjacency
    )
    assert not args[8].any(dim=-1).all()  # rows without an edge take their softmax over every atom
    assert_matches_reference(args, dtype)


def test_softmax_is_stable_for_large_logits():
    # Logits of a few hundred: exp overflows without the max subtraction. Exact in float64; in float32 the
    # logits alone carry ~1e-5 relative rounding (the float32 reference is off by as much), so 1e-4 there.
    args = random_inputs("tiny", 2, 17, seed_of("large logits"))
    args[4] = args[4] * 300
    assert_matches_reference(args, torch.float64)
    for out, ref in zip(
        semla_attention(*cast(args, torch.float32), backend="cpp"), semla_attention_reference(*args)
    ):
        assert torch.isfinite(out).all()
        assert (out.double() - ref).abs().max() <= 1e-4 * ref.abs().max()


def test_strided_inputs():
    args = random_inputs("tiny", 3, 11, seed_of("strided"))
    strided = [
        t.transpose(0, -1).contiguous().transpose(0, -1) if torch.is_tensor(t) and t.dim() > 1 else t
        for t in args
    ]
    assert not any(t.is_contiguous() for t in strided if torch.is_tensor(t) and t.dim() > 1)
    for out, ref in zip(semla_attention(*strided, backend="cpp"), semla_attention(*args, backend="cpp")):
        torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)


def test_several_threads_and_tiles():
    # 6 * 44 rows in tiles of ~512 pairs: several tiles per thread, one tile spanning two molecules.
    args = random_inputs("small", 6, 44, seed_of("threads"))
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        assert_matches_reference(args, torch.float32)
        assert_matches_reference(args, torch.float64)
    finally:
        torch.set_num_threads(threads)


# ---- op registration: opcheck and gradients ----


def cpp_op():
    assert _extension.load_extension(), _extension.extension_status()["reason"]
    op._cpp_op()  # fake and autograd registered
    return torch.ops.fastflow.semla_attention.default


@pytest.mark.parametrize("case", ["tiny", "odd"])
def test_opcheck(case):
    args = random_inputs(case, 2, 5, seed_of("opcheck", case))
    for dtype in (torch.float32, torch.float64):
        torch.library.opcheck(cpp_op(), (*cast(args, dtype), *NO_EMBEDDING, 1e-5, 1e-6))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("N", [1, 2, 3, 17, 44])
def test_edge_embedding_inside_the_op(N, dtype):
    """embed_*: the op embeds the raw edge input itself; same outputs as embedding first and passing edge_feats."""
    F, S, H, D, P, E, EO = CONFIGS["small"]
    args = random_inputs("small", 3, N, seed_of("embedding", N), edge_in=True)
    weights, raw_input = random_embedding(10, 24, E, seed_of("embedding weights", N))
    embedded_args = args[:9] + [raw_input(3, N)] + args[10:13] + weights
    expected = semla_attention_reference(*embedded_args)
    W_a, b_a, W_b, b_b = weights
    outside = list(args[:13])
    outside[9] = torch.nn.functional.linear(
        torch.nn.functional.silu(embedded_args[9] @ W_a.T + b_a), W_b, b_b
    )
    for out, ref in zip(semla_attention_reference(*outside), expected):
        torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    max_relative_errors(embedded_args, dtype, "cpp", TOLERANCE)
    torch.library.opcheck(cpp_op(), (*cast(embedded_args, dtype), 1e-5, 1e-6))


@pytest.mark.parametrize("config", ["tiny", "odd"])
def test_gradients_match_reference(config):
    args = random_inputs(config, 2, 6, seed_of("gradients", config))
    floats = [i for i, t in enumerate(args) if torch.is_tensor(t) and t.is_floating_point()]
    generator = torch.Generator().manual_seed(seed_of("upstream", config))

    def gradients(function):
        inputs = [
            t.clone().requires_grad_(i in floats) if torch.is_tensor(t) else t for i, t in enumerate(args)
        ]
        outputs = function(*inputs)
        loss = sum(
            (out * torch.randn(out.shape, generator=generator.manual_seed(k), dtype=out.dtype)).sum()
            for k, out in enumerate(outputs)
        )
        return torch.autograd.grad(loss, [inputs[i] for i in floats])

    cpp = gradients(lambda *inputs: semla_attention(*inputs, backend="cpp"))
    reference = gradients(semla_attention_reference)
    for i, g_cpp, g_ref in zip(floats, cpp, reference):
        torch.testing.assert_close(g_cpp, g_ref, rtol=1e-10, atol=1e-10, msg=lambda m, i=i: f"input {i}: {m}")


# ---- symmetries ----


def random_rotation(generator):
    q, r = torch.linalg.qr(torch.randn(3, 3, generator=generator, dtype=torch.float64))
    q = q * torch.sign(torch.diagonal(r))
    return q if torch.det(q) > 0 else -q


def test_rotation_and_translation():
    # G is rotation-invariant only, so gram_coords are rotated; the differences Y_i - Y_j are also translation
    # invariant, so attn_coords are rotated and translated.
    args = random_inputs("tiny", 3, 9, seed_of("rotation"))
    generator = torch.Generator().manual_seed(seed_of("rotation", "R"))
    R = random_rotation(generator)
    t = torch.randn(3, generator=generator, dtype=torch.float64) * 5
    moved = list(args)
    moved[2] = args[2] @ R.T
    moved[7] = args[7] @ R.T + t
    node, coord, edge = semla_attention(*args, backend="cpp")
    node_m, coord_m, edge_m = semla_attention(*moved, backend="cpp")
    torch.testing.assert_close(node_m, node, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(edge_m, edge, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(coord_m, coord @ R.T, rtol=1e-9, atol=1e-9)


def test_atom_permutation():
    args = random_inputs("tiny", 2, 9, seed_of("permutation"))
    perm = torch.randperm(9, generator=torch.Generator().manual_seed(seed_of("permutation", "perm")))
    moved = list(args)
    for k in (0, 1, 6):  # node_terms_i, node_terms_j, values: atom axis 1
        moved[k] = args[k][:, perm]
    for k in (2, 7):  # gram_coords, attn_coords: atom axis 2
        moved[k] = args[k][:, :, perm]
    for k in (8, 9):  # adjacency, edge_feats: pair axes 1, 2
        moved[k] = args[k][:, perm][:, :, perm]
    node, coord, edge = semla_attention(*args, backend="cpp")
    node_m, coord_m, edge_m = semla_attention(*moved, backend="cpp")
    torch.testing.assert_close(node_m, node[:, perm], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(coord_m, coord[:, perm], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(edge_m, edge[:, perm][:, :, perm], rtol=1e-12, atol=1e-12)


# ---- input errors ----


def bad_inputs():
    """(argument index, replacement, exception of the Python checks, message pattern)."""
    args = random_inputs("tiny", 2, 5, 0)
    return [
        (3, args[3][:, :3], ValueError, r"gram_weight must have shape \[16, 4\], got shape \[16, 3\]"),
        (
            7,
            args[7][..., :2],
            ValueError,
            r"attn_coords must have shape \[2, '?·'?, 5, 3\], got shape \[2, 4, 5, 2\]",
        ),
        (6, args[6].float(), TypeError, r"values has dtype torch.float32, expected torch.float64"),
        (8, args[8].float(), TypeError, r"adjacency must be a bool tensor, got torch.float32"),
        (10, None, ValueError, r"given together or not at all"),
    ]


@pytest.mark.parametrize("case", range(len(bad_inputs())))
def test_bad_inputs_raise_clear_errors(case):
    args = random_inputs("tiny", 2, 5, 0)
    index, replacement, error, message = bad_inputs()[case]
    args[index] = replacement
    with pytest.raises(error, match=message):
        semla_attention(*args, backend="cpp")


def test_bad_dtypes_and_empty_batch():
    args = random_inputs("tiny", 2, 5, 0)
    with pytest.raises(TypeError, match="tensors must be float32 or float64, got torch.float16"):
        semla_attention(*cast(args, torch.float16), backend="cpp")
    empty = [t[:0] if i in (0, 1, 2, 6, 7, 8, 9) else t for i, t in enumerate(args)]  # the batch axis
    with pytest.raises(ValueError, match=r"empty batch \(node_terms_i has shape \[0, 5, 16\]\)"):
        semla_attention(*empty, backend="cpp")


@pytest.mark.parametrize(
    "index, replacement, message",
    [
        (3, lambda t: t[:, :3], r"gram_weight must have shape \[16, 4\], got \[16, 3\]"),
        (9, lambda t: t[:, :4], r"edge_feats must have shape \[2, 5, 5, \*\], got \[2, 4, 5, 16\]"),
        (8, lambda t: t.float(), r"adjacency must have dtype Bool, got Float"),
        (6, lambda t: t.float(), r"values must have dtype Double, got Float"),
        (0, lambda t: t[:0], r"empty batch"),
        (11, lambda t: None, r"given together or not at all"),
    ],
)
def test_cpp_kernel_checks(index, replacement, message):
    # The C++ checks, for direct calls of torch.ops.fastflow.semla_attention.
    args = random_inputs("tiny", 2, 5, 0)
    args[index] = replacement(args[index])
    with pytest.raises(RuntimeError, match=message):
        cpp_op()(*args, *NO_EMBEDDING, 1e-5, 1e-6)
