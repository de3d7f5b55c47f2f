"""fastflow::bond_head, Triton backend: against the float64 reference, exact symmetry, padding, opcheck, gradients,
input errors, and the fused generator forward of a model patched with kernels="triton".

Without a GPU these run on CPU tensors under Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET), about
1 ms per program, so every shape here is small.
"""

import pytest
import torch

from fastflow import SemlaConfig, patch_model
from fastflow.ops.bond_head import bond_head, bond_head_reference
from tests.models.conftest import perturbed_model
from tests.models.conftest import random_inputs as model_inputs

from .test_bond_head import cast, positional, random_inputs, seed_of

pytestmark = pytest.mark.usefixtures("single_thread")

TOLERANCE = {torch.float32: 1e-5, torch.float64: 1e-12}  # on max|out - ref64| / max|ref64|
# (E, F, G, K): F and G over the kernel's 32-column chunks with a partial last chunk, E and K not powers of two.
WIDE = (20, 40, 36, 3)


def on(args, dtype, device):
    return {name: t.to(dtype=dtype, device=device) if torch.is_tensor(t) else t for name, t in args.items()}


def assert_matches_reference(args, dtype, device, **eps):
    out = bond_head(**on(args, dtype, device), **eps, backend="triton")
    ref = bond_head_reference(**args, **eps)
    assert out.shape == ref.shape and out.dtype == dtype and out.is_contiguous()
    error, scale = (out.cpu().double() - ref).abs().max().item(), ref.abs().max().item()
    assert error <= TOLERANCE[dtype] * scale, f"error {error:.3g} vs max|ref| {scale:.3g}"
    assert torch.equal(out, out.transpose(1, 2))  # each unordered pair is stored once, at (i, j) and (j, i)
    return out


# ---- against the reference ----


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("refine", [True, False])
@pytest.mark.parametrize("N", [1, 2, 3, 17])
def test_triton_matches_reference(triton_device, N, refine, dtype):
    # N = 17: 5 blocks of 4 atoms, the last with one; 3 molecules with padding.
    args, _ = random_inputs("tiny", 3, N, seed_of("triton", N, refine, str(dtype)), refine=refine)
    assert_matches_reference(args, dtype, triton_device)


@pytest.mark.parametrize("widths", ["odd", WIDE])
def test_triton_matches_reference_other_widths(triton_device, widths):
    args, _ = random_inputs(widths, 2, 6, seed_of("triton widths", widths))
    assert_matches_reference(args, torch.float32, triton_device)


def test_eps_and_strided_inputs(triton_device):
    args, _ = random_inputs("tiny", 2, 5, seed_of("triton eps"))
    eps = {"edge_norm_eps": 0.3, "bond_norm_eps": 0.7}
    out = assert_matches_reference(args, torch.float64, triton_device, **eps)
    assert (out.cpu() - bond_head_reference(**args)).abs().max() > 1e-3  # the epsilons do reach the kernel
    strided = {
        name: t.transpose(0, -1).contiguous().transpose(0, -1) if t.dim() > 1 else t[None].expand(2, -1)[1]
        for name, t in on(args, torch.float64, triton_device).items()
    }
    assert not any(t.is_contiguous() for t in strided.values() if t.dim() > 1)
    assert torch.equal(bond_head(**strided, **eps, backend="triton"), out)


@pytest.mark.parametrize("refine", [True, False])
def test_padding_does_not_reach_real_pairs(triton_device, refine):
    # Two inputs that differ only in the garbage of their padding atoms: identical logits on every real pair.
    seed = seed_of("triton padding", refine)
    first, mask = random_inputs("tiny", 3, 7, seed, refine=refine, garbage_seed=1)
    second, _ = random_inputs("tiny", 3, 7, seed, refine=refine, garbage_seed=2)
    real = (mask[:, :, None] & mask[:, None, :]).to(triton_device)
    out_1 = bond_head(**on(first, torch.float32, triton_device), backend="triton")
    out_2 = bond_head(**on(second, torch.float32, triton_device), backend="triton")
    assert not torch.equal(out_1, out_2)  # the padding pairs did change
    assert torch.equal(out_1[real], out_2[real])


# ---- the custom op ----


@pytest.mark.parametrize("refine", [True, False])
def test_opcheck(triton_device, refine):
    # Inputs without requires_grad: the backward is the reference's, checked by test_gradients_match_reference.
    args, _ = random_inputs("odd", 2, 3, seed_of("triton opcheck", refine), refine=refine)
    torch.library.opcheck(
        torch.ops.fastflow.bond_head_triton.default, positional(on(args, torch.float32, triton_device))
    )


def test_gradients_match_reference(triton_device):
    args, _ = random_inputs("odd", 2, 4, seed_of("triton gradients"))
    args = on(args, torch.float64, triton_device)
    weight = torch.randn(2, 4, 4, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(5))

    def gradients(function):
        inputs = {name: t.clone().requires_grad_() for name, t in args.items()}
        loss = (function(**inputs) * weight.to(triton_device)).sum()
        return torch.autograd.grad(loss, list(inputs.values()))

    triton = gradients(lambda **inputs: bond_head(**inputs, backend="triton"))
    reference = gradients(bond_head_reference)
    for name, g_triton, g_ref in zip(args, triton, reference):
        torch.testing.assert_close(
            g_triton, g_ref, rtol=1e-10, atol=1e-10, msg=lambda m, name=name: f"{name}: {m}"
        )


@pytest.mark.parametrize(
    "name, replacement, error, message",
    [
        ("head_weight1", lambda t: t[:, :-1], ValueError, r"head_weight1 must have shape \[·, 16\]"),
        ("edge_feats", lambda t: t[:, :, :4], ValueError, r"edge_feats must have shape \[2, 5, 5, 16\]"),
        ("node_terms_j", lambda t: t[:, :, :3], ValueError, r"node_terms_j must have shape \[2, 5, 16\]"),
        ("coords", lambda t: t.float(), TypeError, r"coords has dtype torch.float32, expected torch.float64"),
        ("refine_weight", lambda t: None, ValueError, r"given together or not at all"),
        ("edge_feats", lambda t: t[:0], ValueError, r"empty batch"),
    ],
)
def test_op_refuses_bad_inputs_before_launching(triton_device, name, replacement, error, message):
    # The custom op itself checks: a direct call must not launch the kernel on shapes it would read past.
    args, _ = random_inputs("tiny", 2, 5, 0)
    args = on(args, torch.float64, triton_device)
    args[name] = replacement(args[name])
    with pytest.raises(error, match=message):
        torch.ops.fastflow.bond_head_triton.default(*positional(args))


def test_launcher_rejects_other_dtypes(triton_device):
    from fastflow.triton_kernels import bond_head as kernel

    args, _ = random_inputs("tiny", 2, 3, 0)
    with pytest.raises(TypeError, match="float32 or float64, got torch.float16"):
        kernel.bond_head(*positional(cast(on(args, torch.float64, triton_device), torch.float16)))


# ---- the patched generator ----


def test_patched_model_runs_the_triton_pair_tail(triton_device):
    # patch_model with kernels="triton" now fuses the generator forward; its bond_head call runs the Triton op.
    config = SemlaConfig.preset("tiny")
    model = perturbed_model(config, seed=7)
    inputs = model_inputs(config, [5, 3], n_pad=1, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        expected = model(**inputs)
        handle = patch_model(model, kernels="triton")
        assert model.forward.__func__.__name__ == "fused_semla_forward"
        with torch.profiler.profile() as profile:
            got = model(**inputs)
    handle.unpatch()
    assert any(event.name == "fastflow::bond_head_triton" for event in profile.events())
    mask = inputs["atom_mask"]
    real = mask[:, :, None] & mask[:, None, :]
    error = (got[2] - expected[2])[real].abs().max() / expected[2][real].abs().max()
    assert error <= 1e-5


# ---- tf32 / bf16 (tensor cores on a GPU) ----


@pytest.mark.parametrize("refine", [True, False])
def test_tf32_matches_reference_and_opchecks(triton_device, refine):
    # Under the interpreter TF32 dots are float32 ones: the float32 tolerance; bench/gpu_check.py checks tf32 and
    # bf16 on a GPU at their own.
    from fastflow.ops.bond_head import bond_head_triton

    args, _ = random_inputs("tiny", 2, 5, seed_of("triton tf32", refine), refine=refine)
    out = bond_head(**on(args, torch.float32, triton_device), backend="triton", precision="tf32")
    ref = bond_head_reference(**args)
    assert (out.cpu().double() - ref).abs().max() <= TOLERANCE[torch.float32] * ref.abs().max()
    assert torch.equal(out, out.transpose(1, 2))
    positional_args = (*positional(on(args, torch.float32, triton_device)), "tf32")
    torch.library.opcheck(bond_head_triton, positional_args)


def test_precision_refusals(triton_device):
    from fastflow.ops.backends import BackendUnavailable

    args, _ = random_inputs("tiny", 1, 3, seed_of("precision refusals"))
    with pytest.raises(ValueError, match="triton backend only"):
        bond_head(**on(args, torch.float32, "cpu"), backend="reference", precision="bf16")
    with pytest.raises(ValueError, match="needs float32"):
        bond_head(**on(args, torch.float64, triton_device), backend="triton", precision="tf32")
    if triton_device.type == "cpu":
        with pytest.raises(BackendUnavailable, match="TRITON_INTERPRET"):
            bond_head(**on(args, torch.float32, triton_device), backend="triton", precision="bf16")
