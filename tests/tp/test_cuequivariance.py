"""cuequivariance_torch modules: the descriptor read from ChannelWiseTensorProduct / FullyConnectedTensorProduct
(mul_ir layout) reproduces them (against their PyTorch "naive" method on CPU), including the gather/scatter form;
what cannot be mapped is refused; backend="cuequivariance" maps descriptors onto cuequivariance's polynomials."""

import pytest
import torch

from fastflow import patch_model
from fastflow.nn import TensorProduct, TPConv
from fastflow.tp import TPDescriptor

from .common import assert_close, require_backend, seed_of
from .test_conv import conv_inputs, nequip_tp

cue = pytest.importorskip("cuequivariance")
cuet = pytest.importorskip("cuequivariance_torch")

pytestmark = pytest.mark.usefixtures("single_thread")
BACKENDS = ("reference", "cpp")


def channel_wise(irreps1="4x0e+3x1o+2x2e", irreps2="0e+1o+2e", **kwargs):
    return cuet.ChannelWiseTensorProduct(
        cue.Irreps("O3", irreps1),
        cue.Irreps("O3", irreps2),
        layout=cue.mul_ir,
        method="naive",
        dtype=torch.float64,
        **kwargs,
    )


def fully_connected():
    return cuet.FullyConnectedTensorProduct(
        cue.Irreps("O3", "4x0e+3x1o"),
        cue.Irreps("O3", "0e+1o+2e"),
        cue.Irreps("O3", "2x0e+3x1o+1x2e+2x1e"),
        layout=cue.mul_ir,
        method="naive",
        dtype=torch.float64,
    )


def inputs(module, Z, seed, shared=True):
    g = torch.Generator().manual_seed(seed)
    x1 = torch.randn(Z, module.irreps_in1.dim, generator=g, dtype=torch.float64)
    x2 = torch.randn(Z, module.irreps_in2.dim, generator=g, dtype=torch.float64)
    w = None if shared else torch.randn(Z, module.weight_numel, generator=g, dtype=torch.float64)
    return x1, x2, w


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("make", [channel_wise, fully_connected], ids=["channel-wise", "fully-connected"])
def test_internal_weights_match(make, backend):
    require_backend(backend)
    module = make()
    fused = TensorProduct(module, backend=backend)
    assert fused.weight is module.weight and list(fused.state_dict()) == list(module.state_dict())
    x1, x2, _ = inputs(module, 6, seed_of("cue", make.__name__))
    leaves = [x1.requires_grad_(), x2.requires_grad_()]
    expected, got = module(*leaves), fused(*leaves)
    assert_close(got, expected, 1e-12, "forward")
    for a, b in zip(
        torch.autograd.grad(got.sum(), [*leaves, fused.weight]),
        torch.autograd.grad(expected.sum(), [*leaves, module.weight]),
    ):
        assert_close(a, b, 1e-11, "gradient")


@pytest.mark.parametrize("backend", BACKENDS)
def test_channel_wise_gather_scatter_form_runs_as_tp_conv(backend):
    require_backend(backend)
    module = channel_wise(shared_weights=False, internal_weights=False)
    fused = TensorProduct(module, backend=backend)
    g = torch.Generator().manual_seed(seed_of("indexed"))
    x1 = torch.randn(5, module.irreps_in1.dim, generator=g, dtype=torch.float64)
    edge_attrs = torch.randn(12, module.irreps_in2.dim, generator=g, dtype=torch.float64)
    weights = torch.randn(12, module.weight_numel, generator=g, dtype=torch.float64)
    src, dst = torch.randint(5, (12,), generator=g), torch.randint(6, (12,), generator=g)
    kwargs = {"indices_1": src, "indices_out": dst, "size_out": 6}
    assert_close(
        fused(x1, edge_attrs, weights, **kwargs), module(x1, edge_attrs, weights, **kwargs), 1e-12, "indexed"
    )
    assert_close(
        fused(x1[src], edge_attrs, weights), module(x1[src], edge_attrs, weights), 1e-12, "per-sample"
    )


def test_unmappable_modules_are_refused_and_left_alone():
    with pytest.raises(ValueError, match="needs e3nn's 'uvuv' mode"):
        TPDescriptor.from_module(channel_wise("2x0e+2x1o", "2x0e+1x1o"))
    ir_mul = cuet.ChannelWiseTensorProduct(
        cue.Irreps("O3", "2x0e"), cue.Irreps("O3", "0e"), layout=cue.ir_mul, method="naive"
    )
    with pytest.raises(ValueError, match="only the mul_ir layout"):
        TPDescriptor.from_module(ir_mul)
    model = torch.nn.ModuleDict(
        {
            "ok": channel_wise(),
            "uvuv": channel_wise("2x0e+2x1o", "2x0e+1x1o"),
            "ir_mul": ir_mul,
            "fc": fully_connected(),
        }
    )
    handle = patch_model(model, kernels="auto")
    report = handle.report()["kernels"]
    assert sorted(e["module"] for e in report["swapped"]) == ["fc", "ok"]
    assert {e["module"]: e["reason"].split(":")[0] for e in report["left_alone"]} == {
        "uvuv": "ChannelWiseTensorProduct",
        "ir_mul": "ChannelWiseTensorProduct with layout_in1=(irrep,mul)",
    }
    handle.unpatch()


def test_cuequivariance_backend_is_refused_without_its_cuda_kernels():
    if torch.cuda.is_available():
        pytest.skip("a CUDA machine may have cuequivariance's kernels")
    with pytest.raises(
        RuntimeError, match="backend='cuequivariance' is not available here: .*Use backend='auto'"
    ):
        TensorProduct(nequip_tp(), backend="cuequivariance")


@pytest.mark.parametrize("mode", ["uvu", "uvw"])
def test_descriptor_maps_onto_a_cuequivariance_polynomial(mode):
    # The translation used by backend="cuequivariance", checked with cuequivariance's PyTorch method on CPU.
    if mode == "uvu":
        tp = nequip_tp("3x0e+2x1o+1x2e")
    else:
        from e3nn import o3

        tp = o3.FullyConnectedTensorProduct(
            "3x0e+2x1o", "1x0e+1x1o", "2x0e+2x1o+1x1e", shared_weights=False, _optimize_einsums=False
        )
    fused = TensorProduct(tp, backend="cuequivariance", _cue_method="naive")
    conv, conv_reference = TPConv(tp, backend="cuequivariance", _cue_method="naive"), TPConv(tp, "reference")
    x, e, w, src, dst = conv_inputs(tp, 5, 9, seed_of("cue backend", mode))
    assert_close(fused(x[src], e, w), tp(x[src], e, w), 1e-5, "tensor product")
    assert_close(conv(x, e, w, src, dst, 5), conv_reference(x, e, w, src, dst, 5), 1e-5, "convolution")
