"""fastflow::discrete_flow_step: the C++ kernel against the reference (probabilities, keyed draws), padding,
batch independence, opcheck, bad inputs, and whole sampling runs with either backend."""

import importlib
import zlib

import pytest
import torch

from fastflow import _extension, rng
from fastflow.pretrained import has_pretrained, load_pretrained
from fastflow.sampling import sample

op = importlib.import_module("fastflow.ops.discrete_flow_step")
pytestmark = pytest.mark.usefixtures("single_thread")
TOLERANCE = {torch.float32: 1e-6, torch.float64: 1e-13}


def require_cpp():
    if not _extension.load_extension():
        pytest.skip(_extension.extension_status()["reason"])


def inputs(B, N, K, pairs, dtype, seed, step=3, dt=0.02):
    """Random logits (spread so that every class gets drawn), one-hot current classes with all-zero padding
    rows, a mask with padding, times across [0, 1] (t = 0 and t + dt >= 1 included: eta switches off)."""
    g = torch.Generator().manual_seed(seed)
    shape = (B, N, N, K) if pairs else (B, N, K)
    logits = (torch.randn(shape, generator=g, dtype=torch.float64) * 3).to(dtype)
    mask = torch.arange(N)[None] < torch.randint(1, N + 1, (B,), generator=g)[:, None]
    valid = mask[:, :, None] & mask[:, None, :] if pairs else mask
    current = torch.nn.functional.one_hot(torch.randint(0, K, shape[:-1], generator=g), K).to(dtype)
    current = current * valid.unsqueeze(-1)
    t = torch.rand(B, generator=g, dtype=torch.float64).to(dtype)
    t[0] = 0.0
    if B > 1:
        t[-1] = 1 - dt / 2
    keys = rng.molecule_keys(seed, torch.arange(B))
    stream = rng.STEP_BONDS if pairs else rng.STEP_ATOMS
    return logits, current, mask, t, keys, step, stream, dt, 1.0


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("pairs", [False, True], ids=["atoms", "pairs"])
@pytest.mark.parametrize("N", [1, 2, 3, 17])
def test_cpp_matches_the_reference(N, pairs, dtype):
    require_cpp()
    K = 5 if pairs else 18
    args = inputs(4, N, K, pairs, dtype, zlib.crc32(repr((N, pairs, str(dtype))).encode()))
    p_ref, next_ref = op.discrete_flow_step(*args, backend="reference")
    p_cpp, next_cpp = op.discrete_flow_step(*args, backend="cpp")
    assert p_cpp.dtype == dtype and next_cpp.shape == next_ref.shape and p_cpp.is_contiguous()
    assert (p_cpp - p_ref).abs().max() <= TOLERANCE[dtype]
    assert torch.equal(
        next_cpp, next_ref
    )  # same keyed uniforms; no draw sits within rounding of a boundary here


def test_many_draws_agree_and_padding_is_zero():
    """64 molecules × 23² pairs: the draws agree everywhere (an ulp of softmax could flip a draw whose uniform
    sits on a CDF boundary; none does at these seeds), padding is zero, real elements are one-hot."""
    require_cpp()
    args = inputs(64, 23, 5, True, torch.float32, seed=11)
    p_ref, next_ref = op.discrete_flow_step(*args, backend="reference")
    p_cpp, next_cpp = op.discrete_flow_step(*args, backend="cpp")
    assert torch.equal(next_cpp, next_ref)
    mask = args[2]
    valid = mask[:, :, None] & mask[:, None, :]
    assert torch.equal(next_cpp.sum(-1), valid.float()) and (p_cpp[~valid] == 0).all()
    assert torch.allclose(p_cpp[valid].sum(-1), torch.ones(()), atol=1e-6)
    assert (next_cpp.argmax(-1) != args[1].argmax(-1))[valid].any()  # the step moves some classes


def test_a_molecule_draws_the_same_alone_or_in_a_batch():
    require_cpp()
    logits, current, mask, t, keys, *rest = inputs(5, 9, 5, True, torch.float32, seed=5)
    _, together = op.discrete_flow_step(logits, current, mask, t, keys, *rest, backend="cpp")
    n = int(mask[2].sum())
    _, alone = op.discrete_flow_step(
        logits[2:3, :n, :n], current[2:3, :n, :n], mask[2:3, :n], t[2:3], keys[2:3], *rest, backend="cpp"
    )
    assert torch.equal(alone[0], together[2, :n, :n])


def test_opcheck_and_bad_inputs():
    require_cpp()
    args = inputs(2, 4, 5, True, torch.float64, seed=3)
    torch.library.opcheck(op._cpp_op(), args)
    logits, current, mask, t, keys, step, stream, dt, eta = args
    bad = [
        ((logits[..., :3, :], current, mask, t, keys), "logits must be"),
        ((logits, current.float(), mask, t, keys), "current must have dtype"),
        ((logits, current, mask.long(), t, keys), "mask must have dtype"),
        ((logits, current, mask, t[:1], keys), "t must have shape"),
        ((logits, current, mask, t, keys.int()), "keys must have dtype"),
    ]
    for tensors, message in bad:
        with pytest.raises((ValueError, TypeError), match=message):
            op.discrete_flow_step(*tensors, step, stream, dt, eta)
    with pytest.raises(ValueError, match="dt must be > 0"):
        op.discrete_flow_step(logits, current, mask, t, keys, step, stream, float("nan"), eta)
    with pytest.raises(RuntimeError, match="mask must be"):  # the C++ kernel checks too
        op._cpp_op()(logits, current, mask.long(), t, keys, step, stream, dt, eta)


@pytest.mark.skipif(not has_pretrained(), reason="no packaged model")
def test_sampling_with_the_fused_step_gives_the_same_molecules():
    require_cpp()
    model = load_pretrained()
    request = dict(n_molecules=12, steps=8, seed=4, size_distribution=model.size_counts, progress=False)
    fused, reference = sample(model, kernels="cpp", **request), sample(model, kernels="reference", **request)
    for a, b in zip(fused.graphs, reference.graphs):
        assert torch.equal(a.atom_types, b.atom_types) and torch.equal(a.bond_types, b.bond_types)
        assert torch.allclose(a.coords, b.coords, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("pairs", [False, True], ids=["atoms", "pairs"])
def test_triton_matches_the_reference(triton_device, pairs, dtype):
    K = 5 if pairs else 18
    args = inputs(3, 7, K, pairs, dtype, zlib.crc32(repr(("triton", pairs, str(dtype))).encode()))
    p_ref, next_ref = op.discrete_flow_step(*args, backend="reference")
    moved = [a.to(triton_device) if torch.is_tensor(a) else a for a in args]
    p_tri, next_tri = op.discrete_flow_step(*moved, backend="triton")
    assert (p_tri.cpu() - p_ref).abs().max() <= TOLERANCE[dtype] and torch.equal(next_tri.cpu(), next_ref)
    torch.library.opcheck(op.discrete_flow_step_triton, moved)
