"""Op registration: opcheck of the C++ ops, the Triton custom ops and the reference-backward ops; which backward
runs (fused kernel for a first-order backward, the reference under create_graph); the Triton binding under the
interpreter; torch.compile tracing."""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from fastflow.nn import TPConv
from fastflow.ops import tensor_product as op
from fastflow.tp import TPDescriptor

from .common import assert_close, require_backend, seed_of
from .test_conv import conv_inputs, nequip_tp

pytestmark = pytest.mark.usefixtures("single_thread")


def small_case(dtype=torch.float64, shared=False):
    tp = nequip_tp("2x0e+3x1o+1x2e")
    d = TPDescriptor.from_e3nn(tp)
    x, e, w, src, dst = conv_inputs(tp, 4, 7, seed_of("ops", shared), shared=shared, dtype=dtype)
    return d, (x, e, w, src, dst)


def conv_args(d, inputs, n_nodes=4):
    x, e, w, src, dst = inputs
    return (x, e, w, src, dst, n_nodes, *d.tensors(x.dtype), d.dim_out)


def tp_args(d, inputs):
    x, e, w, src, _ = inputs
    return (x[src], e, w, *d.tensors(x.dtype), d.dim_out)


def backward_args(d, inputs, conv):
    x, e, w, src, dst = inputs
    if conv:
        return (torch.randn(4, d.dim_out, dtype=x.dtype), x, e, w, src, dst, *d.tensors(x.dtype))
    return (torch.randn(len(src), d.dim_out, dtype=x.dtype), x[src], e, w, *d.tensors(x.dtype))


@pytest.mark.parametrize("shared", [False, True], ids=["per-edge", "shared"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_opcheck_cpp(dtype, shared):
    require_backend("cpp")
    fastflow = op._cpp_ops()
    d, inputs = small_case(dtype, shared)
    inputs = tuple(t.requires_grad_() if t.is_floating_point() else t for t in inputs)
    torch.library.opcheck(fastflow.tp_conv.default, conv_args(d, inputs))
    torch.library.opcheck(fastflow.tensor_product.default, tp_args(d, inputs))
    detached = tuple(t.detach() for t in inputs)
    torch.library.opcheck(fastflow.tp_conv_backward.default, backward_args(d, detached, True))
    torch.library.opcheck(fastflow.tensor_product_backward.default, backward_args(d, detached, False))


def test_opcheck_reference_backward_ops():
    d, inputs = small_case()
    torch.library.opcheck(op.tp_conv_backward_reference, backward_args(d, inputs, True))
    torch.library.opcheck(op.tensor_product_backward_reference, backward_args(d, inputs, False))


class OpLog(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.names = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(str(func.name()))
        return func(*args, **(kwargs or {}))


def test_first_order_backward_runs_the_fused_kernel_and_create_graph_the_reference():
    require_backend("cpp")
    d, inputs = small_case()
    x, e, w = (t.clone().requires_grad_() for t in inputs[:3])
    out = op.tp_conv(x, e, w, *inputs[3:], 4, *d.tensors(x.dtype), d.dim_out, backend="cpp")
    with OpLog() as log:
        torch.autograd.grad(out.sum(), [x, e, w], retain_graph=True)
    assert "fastflow::tp_conv_backward" in log.names
    with OpLog() as log:
        grads = torch.autograd.grad(out.sum(), [x, e, w], create_graph=True)
    assert "fastflow::tp_conv_backward" not in log.names and all(g.requires_grad for g in grads)


def test_cpp_kernels_are_registered_when_the_source_exists():
    # Never skipped: cpp tests elsewhere skip only when fastflow._C cannot be loaded at all.
    from .common import CPP_SOURCE

    reason = op.cpp_unavailable_reason()
    if CPP_SOURCE.exists() and reason is not None and "has no CPU kernel" in reason:
        pytest.fail(reason)


def test_torch_compile_traces_forward_and_backward():
    require_backend("cpp")
    tp = nequip_tp("2x0e+3x1o+1x2e")
    conv = TPConv(tp, backend="cpp")
    x, e, w, src, dst = conv_inputs(tp, 4, 7, seed_of("compile"))

    def loss(x, e, w):
        return conv(x, e, w, src, dst, 4).square().sum()

    compiled = torch.compile(loss, backend="aot_eager", fullgraph=True)
    leaves = [t.clone().requires_grad_() for t in (x, e, w)]
    expected = torch.autograd.grad(loss(*leaves), leaves)
    got = torch.autograd.grad(compiled(*leaves), leaves)
    for a, b in zip(got, expected):
        assert_close(a, b, 1e-6, "compiled gradient")


# ---- Triton binding (tiny shapes: the interpreter runs about 1 ms per program) ----


def test_triton_binding_matches_the_reference(triton_device):
    if op.triton_unavailable_reason() is not None:
        pytest.skip(op.triton_unavailable_reason())
    d, inputs = small_case(torch.float64)
    inputs = tuple(t.to(triton_device) for t in inputs)
    T = d.tensors(torch.float64, triton_device)

    def run(backend, conv):
        leaves = [t.clone().requires_grad_() for t in inputs[:3]]
        if conv:
            out = op.tp_conv(*leaves, *inputs[3:], 4, *T, d.dim_out, backend=backend)
        else:
            out = op.tensor_product(
                leaves[0][inputs[3]], leaves[1], leaves[2], *T, d.dim_out, backend=backend
            )
        probe = torch.linspace(-1, 1, out.numel(), dtype=out.dtype, device=out.device).reshape(out.shape)
        return [out, *torch.autograd.grad((out * probe).sum(), leaves)]

    for conv in (False, True):
        for got, expected in zip(run("triton", conv), run("reference", conv)):
            assert_close(
                got.cpu(), expected.cpu(), 1e-12, f"triton {'tp_conv' if conv else 'tensor_product'}"
            )
    torch.library.opcheck(
        op.tp_conv_triton,
        conv_args(d, tuple(t.requires_grad_() if t.is_floating_point() else t for t in inputs)),
    )


def test_descriptor_extents_are_read_once_per_paths_tensor_and_again_after_an_in_place_change():
    d, inputs = small_case()
    args = list(tp_args(d, inputs))
    paths = args[3]
    op.check_inputs(*args)
    calls = []
    original = paths.tolist
    paths.tolist = lambda: calls.append(1) or original()  # instance attribute: counts this tensor's reads
    op.check_inputs(*args)
    assert calls == []
    paths[0, 1] += args[0].size(1)  # path 0 now reads past x1: the cached extents are stale
    with pytest.raises(ValueError, match="irreps mismatch"):
        op.check_inputs(*args)
    assert calls == [1]
