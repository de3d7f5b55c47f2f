"""torch.jit.script of fastflow's tensor-product modules: they compile as direct calls of the C++ ops and match the
eager modules (internal and per-sample weights, broadcasting batch dimensions, gradients)."""

import pytest
import torch
from e3nn import o3

from fastflow.nn import TensorProduct

from .common import require_backend
from .test_conv import nequip_tp

pytestmark = pytest.mark.usefixtures("single_thread")


def test_internal_weights_and_broadcast_batch():
    require_backend("cpp")
    tp = TensorProduct(o3.FullyConnectedTensorProduct("4x0e+2x1o", "3x0e", "3x0e+2x1o"))
    scripted = torch.jit.script(tp)
    x1, x2 = torch.randn(2, 5, tp.descriptor.dim_in1), torch.randn(5, 3)
    torch.testing.assert_close(scripted(x1, x2), tp(x1, x2))
    assert scripted(x1, x2).shape == (2, 5, tp.descriptor.dim_out)


def test_per_sample_weights_and_gradients():
    require_backend("cpp")
    tp = TensorProduct(nequip_tp())
    scripted = torch.jit.script(tp)
    d = tp.descriptor
    inputs = [torch.randn(7, n, requires_grad=True) for n in (d.dim_in1, d.dim_in2, d.weight_numel)]
    expected = tp(*inputs)
    grads = torch.autograd.grad(expected.square().sum(), inputs)
    got = scripted(*inputs)
    torch.testing.assert_close(got, expected)
    for g, want in zip(torch.autograd.grad(got.square().sum(), inputs), grads):
        torch.testing.assert_close(g, want)
    with pytest.raises(torch.jit.Error, match="weights must be provided"):
        scripted(*inputs[:2])
