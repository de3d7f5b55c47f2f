"""Every op checks its arguments before launching a kernel, when called directly as torch.ops.fastflow.<op>: the
Triton launchers (a kernel launched on wrong shapes reads out of bounds on a GPU) and the C++ ops, including
inputs on another device (a meta input sends the C++ op to its fake kernel, which must refuse too)."""

import importlib

import pytest
import torch

from fastflow import _extension

from .semla_helpers import cast, random_inputs, seed_of

# The modules (fastflow.ops exports the functions under the same names).
forecast_op, semla_op, tp_op = (
    importlib.import_module(f"fastflow.ops.{name}")
    for name in ("cache_forecast", "semla_attention", "tensor_product")
)
pytestmark = pytest.mark.usefixtures("single_thread")

CONFIG = (8, 3, 2, 4, 3, 4, 2)  # (F, S, H, d_head, P, E_in, E_out)
EPS = (1e-5, 1e-6)
BAD = (ValueError, TypeError, IndexError, RuntimeError)  # Python checks, and TORCH_CHECK (RuntimeError)


def semla_args(device="cpu"):
    return (
        cast(random_inputs(CONFIG, 2, 3, seed_of("direct", str(device))), torch.float32, device) + [None] * 4
    )


def semla_cases():
    """(name, arguments) that every backend must refuse."""

    def edit(index, make):
        args = semla_args()
        args[index] = make(args[index])
        return args

    yield "gram_weight [F, S-1]", edit(3, lambda w: w[:, :-1].contiguous())
    yield "float adjacency", edit(8, lambda a: a.float())
    yield "float64 values", edit(6, lambda v: v.double())
    yield "meta values", edit(6, lambda v: v.to("meta"))
    yield "edge block half given", edit(12, lambda w: None)
    yield "out_bias too short", edit(5, lambda b: b[:-1].contiguous())
    yield "embedding half given", edit(13, lambda w: torch.ones(4, CONFIG[5]))


def semla_ops():
    ops = []
    if _extension.load_extension():
        semla_op._cpp_op()
        ops.append(torch.ops.fastflow.semla_attention.default)
    return ops


@pytest.mark.parametrize("case", list(semla_cases()), ids=lambda case: case[0])
def test_semla_attention_cpp_refuses(case):
    for op in semla_ops():
        with pytest.raises(BAD):
            op(*case[1], *EPS)


@pytest.mark.parametrize("case", list(semla_cases()), ids=lambda case: case[0])
def test_semla_attention_triton_refuses(triton_device, case):
    with pytest.raises(BAD):
        torch.ops.fastflow.semla_attention_triton(*case[1], *EPS)


def forecast_cases():
    history = [torch.randn(2, 5, 3, generator=torch.Generator().manual_seed(k)) for k in range(3)]
    yield "mixed dtypes", [history[0], history[1].double(), history[2]], [0.5, 0.3, 0.2]
    yield "fewer coefficients", history, [0.5, 0.5]
    yield "more coefficients", history, [0.5, 0.3, 0.1, 0.1]
    yield "NaN coefficient", history, [0.5, float("nan"), 0.5]
    yield "mixed shapes", [history[0], history[1][:, :4], history[2]], [0.5, 0.3, 0.2]
    yield "a meta tensor", [history[0], history[1].to("meta"), history[2]], [0.5, 0.3, 0.2]


@pytest.mark.parametrize("case", list(forecast_cases()), ids=lambda case: case[0])
def test_cache_forecast_refuses(triton_device, case):
    _, history, coeffs = case
    ops = [torch.ops.fastflow.cache_forecast_triton]
    if _extension.load_extension():
        ops.append(forecast_op._cpp_op())
    for op in ops:
        with pytest.raises(BAD):
            op(history, coeffs)


def tp_case():
    from tests.tp.test_ops import conv_args, small_case, tp_args

    d, inputs = small_case(torch.float32)
    return d, inputs, conv_args(d, inputs), tp_args(d, inputs)


def test_tensor_product_triton_ops_refuse(triton_device):
    if tp_op.triton_unavailable_reason() is not None:
        pytest.skip(tp_op.triton_unavailable_reason())
    d, inputs, conv, tp = tp_case()
    ops = torch.ops.fastflow
    bad_tp = [  # x2 float64; too few x1 features for the paths; dim_out smaller than the paths write
        (tp[0], tp[1].double(), *tp[2:]),
        (tp[0][:, :3].contiguous(), *tp[1:]),
        (*tp[:-1], d.dim_out - 1),
    ]
    for args in bad_tp:
        with pytest.raises(BAD):
            ops.tensor_product_triton(*args)
    out_of_range = conv[4].clone()
    out_of_range[0] = 99
    bad_conv = [
        (*conv[:4], out_of_range, *conv[5:]),  # edge_dst outside [0, n_nodes)
        (*conv[:3], conv[3].int(), *conv[4:]),  # int32 edge_src
        (*conv[:2], conv[2][:1], *conv[3:]),  # per-edge weights with one row
    ]
    for args in bad_conv:
        with pytest.raises(BAD):
            ops.tp_conv_triton(*args)
    grad = torch.randn(len(tp[0]) + 1, d.dim_out)  # one row too many
    with pytest.raises(BAD):
        ops.tensor_product_backward_triton(grad, *tp[:-1])


def test_tensor_product_cpp_ops_refuse_a_meta_input():
    if tp_op.cpp_unavailable_reason() is not None:
        pytest.skip(tp_op.cpp_unavailable_reason())
    _, _, conv, tp = tp_case()
    ops = tp_op._cpp_ops()
    with pytest.raises(BAD):
        ops.tensor_product.default(tp[0], tp[1].to("meta"), *tp[2:])
    with pytest.raises(BAD):
        ops.tp_conv.default(conv[0], conv[1].to("meta"), *conv[2:])
