"""fastflow's tensor product against e3nn's: every mode, both normalisations, shared and per-sample weights,
random irreps (l <= 3, both parities, multiplicities 1, 3, 7, 17); forward and gradients of all three inputs."""

import pytest
import torch
from e3nn import o3

from fastflow.nn import TensorProduct
from fastflow.ops.tensor_product import tensor_product
from fastflow.tp import TPDescriptor

from .common import (
    MODES,
    assert_close,
    default_dtype,
    random_inputs,
    random_tensor_product,
    require_backend,
    seed_of,
)

pytestmark = pytest.mark.usefixtures("single_thread")

BACKENDS = ("reference", "cpp")
FORWARD = {torch.float32: 1e-5, torch.float64: 1e-12}
GRADIENT = {torch.float32: 1e-4, torch.float64: 1e-11}
NORMALISATIONS = [("component", "element"), ("norm", "path"), ("component", "path"), ("norm", "element")]


def forward_and_gradients(function, x1, x2, w, seed):
    inputs = [t.clone().requires_grad_() for t in (x1, x2, w)]
    out = function(*inputs)
    probe = torch.randn(
        out.shape, generator=torch.Generator().manual_seed(seed_of("probe", seed)), dtype=out.dtype
    )
    return out.detach(), torch.autograd.grad(
        (out * probe).sum(), inputs, allow_unused=True, materialize_grads=True
    )


def check_against_e3nn(tp, backend, dtype, Z, seed, shared):
    require_backend(backend)
    descriptor = TPDescriptor.from_e3nn(tp)
    x1, x2, w = random_inputs(tp, Z, seed, shared, dtype)
    expected, expected_grads = forward_and_gradients(tp, x1, x2, w, seed)
    tensors = descriptor.tensors(dtype)
    out, grads = forward_and_gradients(
        lambda a, b, c: tensor_product(a, b, c, *tensors, descriptor.dim_out, backend=backend),
        x1,
        x2,
        w,
        seed,
    )
    assert out.dtype == dtype
    assert_close(out, expected, FORWARD[dtype], f"{backend} forward")
    for name, got, ref in zip(("x1", "x2", "weights"), grads, expected_grads):
        assert_close(got, ref, GRADIENT[dtype], f"{backend} d/d{name}")


@pytest.mark.parametrize("shared", [True, False], ids=["shared", "per-sample"])
@pytest.mark.parametrize("normalisation", NORMALISATIONS, ids=lambda n: "-".join(n))
@pytest.mark.parametrize("mode", MODES)
def test_matches_e3nn_float32(mode, normalisation, shared):
    seed = seed_of(mode, normalisation, shared)
    tp = random_tensor_product(mode, seed, shared, *normalisation)
    for backend in BACKENDS:
        check_against_e3nn(tp, backend, torch.float32, 6, seed, shared)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", MODES)
def test_matches_e3nn_float64(mode, backend):
    seed = seed_of("float64", mode)
    tp = random_tensor_product(mode, seed, shared=mode in ("uvu", "uuw"), dtype=torch.float64)
    check_against_e3nn(tp, backend, torch.float64, 5, seed, mode in ("uvu", "uuw"))


@pytest.mark.parametrize("weighted", ["none", "some"])
@pytest.mark.parametrize("mode", ["uvu", "uvv", "uuu", "uuw"])
def test_paths_without_weights(mode, weighted):
    seed = seed_of("weightless", mode, weighted)
    tp = random_tensor_product(mode, seed, shared=False, weighted=weighted)
    for backend in BACKENDS:
        check_against_e3nn(tp, backend, torch.float32, 4, seed, shared=False)


@pytest.mark.parametrize("irrep_normalization", ["component", "norm", "none"])
@pytest.mark.parametrize("path_normalization", ["element", "path", "none"])
def test_descriptor_create_reproduces_e3nn_path_weights(irrep_normalization, path_normalization):
    tp = random_tensor_product(
        "uvw",
        seed_of("create"),
        irrep_normalization=irrep_normalization,
        path_normalization=path_normalization,
    )
    raw = [(i.i_in1, i.i_in2, i.i_out, i.connection_mode, i.has_weight) for i in tp.instructions]
    created = TPDescriptor.create(
        tp.irreps_in1, tp.irreps_in2, tp.irreps_out, raw, irrep_normalization, path_normalization
    )
    read = TPDescriptor.from_e3nn(tp)
    assert [i.path_weight for i in created.instructions] == pytest.approx(
        [i.path_weight for i in read.instructions], rel=1e-12
    )
    assert (created.dim_in1, created.dim_in2, created.dim_out, created.weight_numel) == (
        tp.irreps_in1.dim,
        tp.irreps_in2.dim,
        tp.irreps_out.dim,
        tp.weight_numel,
    )


def test_e3nn_specialised_code_paths_agree_with_wigner_3j():
    # e3nn special-cases l = 0 inputs/outputs (dividing by sqrt(dim)) and uuu 1x1->1 (a cross product / sqrt 6);
    # the descriptor always uses wigner_3j. Exact agreement in float64 with e3nn's specialised code.
    with default_dtype(torch.float64):
        cases = [
            o3.TensorProduct("2x0e", "3x0e", "4x0e", [(0, 0, 0, "uvw", True)]),
            o3.TensorProduct("2x0e", "3x2o", "4x2o", [(0, 0, 0, "uvw", True)]),
            o3.TensorProduct("2x3o", "3x0e", "2x3o", [(0, 0, 0, "uvu", True)]),
            o3.TensorProduct("2x2e", "3x2e", "3x0e", [(0, 0, 0, "uvv", True)]),
            o3.TensorProduct("3x1o", "3x1o", "3x1e", [(0, 0, 0, "uuu", False)]),
            o3.TensorProduct("3x1o", "3x1o", "3x1e", [(0, 0, 0, "uuu", True)]),
            o3.TensorProduct("3x0e", "3x1o", "2x1o", [(0, 0, 0, "uuw", True)]),
        ]
    for n, tp in enumerate(cases):
        assert tp._specialized_code
        check_against_e3nn(tp, "reference", torch.float64, 4, seed_of("special", n), shared=True)


@pytest.mark.parametrize("backend", BACKENDS)
def test_module_matches_e3nn_with_batch_dimensions_and_internal_weights(backend):
    require_backend(backend)
    tp = o3.FullyConnectedTensorProduct(
        "3x0e+2x1o+1x2e", "1x0e+1x1o", "2x0e+2x1o+1x2e+1x1e", _optimize_einsums=False
    )
    fused = TensorProduct(tp, backend=backend)
    assert fused.weight is tp.weight and list(fused.state_dict()) == list(tp.state_dict())
    g = torch.Generator().manual_seed(seed_of("batch", backend))
    x1 = torch.randn(4, 1, tp.irreps_in1.dim, generator=g)
    x2 = torch.randn(3, tp.irreps_in2.dim, generator=g)  # broadcast to [4, 3]
    assert_close(fused(x1, x2), tp(x1, x2), 1e-5, "broadcast")
    assert_close(fused(x1[0, 0], x2[0]), tp(x1[0, 0], x2[0]), 1e-5, "no batch dimension")
    weights = list(tp.weight_views())  # e3nn's list-of-tensors weight form
    assert_close(
        fused(x1, x2, [w.detach() * 2 for w in weights]),
        tp(x1, x2, [w.detach() * 2 for w in weights]),
        1e-5,
        "list weights",
    )


@pytest.mark.parametrize("backend", BACKENDS)
def test_per_sample_weights_with_batch_dimensions(backend):
    require_backend(backend)
    tp = random_tensor_product("uvu", seed_of("per-sample batch"), shared=False)
    fused = TensorProduct(tp, backend=backend)
    g = torch.Generator().manual_seed(1)
    x1 = torch.randn(2, 3, tp.irreps_in1.dim, generator=g)
    x2 = torch.randn(2, 1, tp.irreps_in2.dim, generator=g)
    w = torch.randn(2, 3, tp.weight_numel, generator=g)
    assert_close(fused(x1, x2, w), tp(x1, x2, w), 1e-5, "per-sample broadcast")
    assert_close(fused(x1, x2, w[:1, :1]), tp(x1, x2, w[:1, :1]), 1e-5, "one weight row for all samples")


@pytest.mark.parametrize("Z", [1, 2, 3, 17, 100])
def test_shared_weight_uvw_self_interaction_matches_e3nn(Z):
    """The C++ kernel runs uvw paths with shared weights as matrix products over blocks of rows (NequIP's
    self-interaction: features x node attributes), mixed here with paths the row kernel runs."""
    tp = o3.FullyConnectedTensorProduct("17x0e+5x1o+3x2e", "4x0e+2x1o", "6x0e+7x1o+2x2e+3x1e")
    check_against_e3nn(tp, "cpp", torch.float32, Z, seed_of("shared uvw", Z), shared=True)


def test_shared_weight_uvw_spans_several_row_blocks():
    """A path whose [rows, d_out · mul1 · mul2] intermediate exceeds one block (16 Mi elements): 3 blocks."""
    tp = o3.TensorProduct("64x2e", "64x0e", "8x2e", [(0, 0, 0, "uvw", True)])
    check_against_e3nn(tp, "cpp", torch.float32, 1700, seed_of("row blocks"), shared=True)
