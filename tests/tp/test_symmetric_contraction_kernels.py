"""The kernels of fastflow::symmetric_contraction against its reference, on plans built from mace-torch's own U
tensors: the C++ kernel over full and partial channel blocks (lmax 1..3, float32 and float64, both backward
outputs), the Triton kernels under the interpreter (tiny shapes), rotation and inversion equivariance, NaN
confinement to its node, thread-count independence of the coefficient gradients, and the C++ op's own checks."""

import pytest
import torch

from fastflow.benchmarks.e3nn_models import mace_unavailable_reason
from fastflow.ops import symmetric_contraction as op

from .common import relative_error, seed_of

pytestmark = [
    pytest.mark.usefixtures("single_thread"),
    pytest.mark.skipif(mace_unavailable_reason() is not None, reason=str(mace_unavailable_reason())),
]

ELEMENTS = 4
COUPLING = {1: "0e+1o", 2: "0e+1o+2e", 3: "0e+1o+2e+3o"}


def require_cpp():
    reason = op.cpp_unavailable_reason()
    if reason is not None:
        pytest.skip(f"cpp backend unavailable: {reason}")


def case(lmax, correlation, channels, n_nodes, seed, dtype=torch.float32, irreps_out=None):
    """(mace module, x, elements, coeffs, plan) with random weights and inputs, in dtype."""
    from e3nn import o3
    from mace.modules.symmetric_contraction import SymmetricContraction

    irreps_in = "+".join(f"{channels}x{ir}" for ir in COUPLING[lmax].split("+"))
    irreps_out = irreps_out or "+".join(f"{channels}x{ir}" for ir in COUPLING[min(lmax, 2)].split("+"))
    torch.manual_seed(seed)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        module = SymmetricContraction(
            o3.Irreps(irreps_in), o3.Irreps(irreps_out), correlation, num_elements=ELEMENTS
        )
    finally:
        torch.set_default_dtype(previous)
    blocks, weights = [], []
    for contraction in module.contractions:
        block = []
        for nu in range(contraction.correlation, 0, -1):
            U = contraction.U_tensors(nu)
            block.append(U.unsqueeze(0) if U.dim() == nu + 1 else U)
        blocks.append(block)
        weights += [contraction.weights_max, *contraction.weights]
    plan = op.build_plan(blocks, o3.Irreps(COUPLING[lmax]).dim)
    coeffs = op.contraction_coefficients(
        plan.u.to(dtype), torch.cat(weights, 1), plan.q_offsets, plan.k_offsets
    )
    generator = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(
        n_nodes, channels, plan.monomials[:, 1].max().item() + 1, generator=generator, dtype=dtype
    )
    elements = torch.randint(0, ELEMENTS, (n_nodes,), generator=generator)
    return module, x, elements, coeffs.detach(), plan


def run(backend, x, elements, coeffs, plan, probe_seed=0):
    """(out, grad x, grad coeffs) through the op's autograd with a fixed random cotangent."""
    x, coeffs = x.clone().requires_grad_(), coeffs.clone().requires_grad_()
    out = op.symmetric_contraction(
        x, elements, coeffs, plan.monomials, plan.terms, plan.out_dims, backend=backend
    )
    probe = torch.randn(out.shape, generator=torch.Generator().manual_seed(probe_seed), dtype=out.dtype)
    return (out, *torch.autograd.grad((out * probe).sum(), [x, coeffs]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("channels", [16, 37, 64])
@pytest.mark.parametrize("lmax", [1, 2, 3])
def test_cpp_matches_the_reference_over_full_and_partial_channel_blocks(lmax, channels, dtype):
    require_cpp()
    module, x, elements, coeffs, plan = case(lmax, 3, channels, 17, seed_of("blocks", lmax, channels), dtype)
    tolerance = 1e-5 if dtype == torch.float32 else 1e-12
    y = torch.nn.functional.one_hot(elements, ELEMENTS).to(dtype)
    expected = run("reference", x, elements, coeffs, plan)
    assert relative_error(expected[0], module(x, y)) <= tolerance  # the plan is MACE's contraction
    for name, got, want in zip(
        ("out", "grad x", "grad coeffs"), run("cpp", x, elements, coeffs, plan), expected
    ):
        assert not torch.all(want == 0)
        assert relative_error(got, want) <= tolerance, name


@pytest.mark.parametrize("backend", ["cpp", "triton"])
def test_backward_computes_each_output_alone_as_with_both(backend):
    if backend == "cpp":
        require_cpp()
    _, x, elements, coeffs, plan = case(1, 3, 5 if backend == "triton" else 40, 3, seed_of("flags", backend))
    backward = {
        "cpp": torch.ops.fastflow.symmetric_contraction_backward,
        "triton": op.symmetric_contraction_backward_triton,
    }[backend]
    grad = torch.randn(x.size(0), x.size(1) * sum(plan.out_dims))
    arguments = (grad, x, elements, coeffs, plan.monomials, plan.terms, plan.out_dims)
    both = backward(*arguments, True, True)
    only_x, empty = backward(*arguments, True, False)
    empty_too, only_coeffs = backward(*arguments, False, True)
    assert torch.equal(only_x, both[0]) and torch.equal(only_coeffs, both[1])
    assert empty.numel() == 0 and empty_too.numel() == 0


@pytest.mark.parametrize("correlation", [1, 2, 3])
@pytest.mark.parametrize("n_nodes", [1, 2, 3])
def test_triton_matches_the_reference(triton_device, n_nodes, correlation):
    """Under the interpreter on CPU (about 1 ms per program and loop step): 5 channels, lmax 1."""
    _, x, elements, coeffs, plan = case(1, correlation, 5, n_nodes, seed_of("triton", n_nodes, correlation))
    expected = run("reference", x, elements, coeffs, plan)
    moved = [t.to(triton_device) for t in (x, elements, coeffs)]
    device_plan = plan._replace(
        monomials=plan.monomials.to(triton_device), terms=plan.terms.to(triton_device)
    )
    for name, got, want in zip(
        ("out", "grad x", "grad coeffs"), run("triton", *moved, device_plan), expected
    ):
        assert relative_error(got.cpu(), want) <= 1e-5, name


def test_triton_float64_and_opcheck(triton_device):
    _, x, elements, coeffs, plan = case(1, 2, 3, 2, seed_of("triton64"), torch.float64)
    for got, want in zip(
        run("triton", x, elements, coeffs, plan), run("reference", x, elements, coeffs, plan)
    ):
        assert relative_error(got, want) <= 1e-12
    arguments = (
        x.requires_grad_(),
        elements,
        coeffs.requires_grad_(),
        plan.monomials,
        plan.terms,
        plan.out_dims,
    )
    torch.library.opcheck(op.symmetric_contraction_triton, arguments)


@pytest.mark.parametrize("backend", ["reference", "cpp"])
@pytest.mark.parametrize("inversion", [False, True])
def test_rotating_the_input_irreps_rotates_the_output(backend, inversion):
    """out(D_in x) = D_out out(x) for a random rotation (times -1: the inversion, with the irreps' parities)."""
    from e3nn import o3

    if backend == "cpp":
        require_cpp()
    lmax, channels = 2, 7
    _, x, elements, coeffs, plan = case(
        lmax, 3, channels, 5, seed_of("rotation", backend, inversion), torch.float64
    )
    R = o3.rand_matrix(dtype=torch.float64)
    R = -R if inversion else R
    D_in = o3.Irreps(COUPLING[lmax]).D_from_matrix(R)
    D_out = o3.Irreps(COUPLING[2]).D_from_matrix(R)  # outputs 0e+1o+2e, one copy per channel

    def contract(x):
        out = op.symmetric_contraction(
            x, elements, coeffs, plan.monomials, plan.terms, plan.out_dims, backend=backend
        )
        blocks, start = [], 0
        for d in plan.out_dims:  # MACE's layout → [N, C, Σ d]
            blocks.append(out[:, start : start + channels * d].reshape(-1, channels, d))
            start += channels * d
        return torch.cat(blocks, 2)

    rotated = contract(x @ D_in.T)
    # 1e-6: e3nn builds its D matrices from float32 constants (the Wigner J matrices), whatever the dtype
    assert relative_error(rotated, contract(x) @ D_out.T) <= 1e-6
    assert relative_error(rotated, contract(x)) > 1e-3  # the rotation does change the output


@pytest.mark.parametrize("backend", ["reference", "cpp"])
def test_nan_reaches_only_its_node(backend):
    if backend == "cpp":
        require_cpp()
    _, x, elements, coeffs, plan = case(1, 3, 40, 6, seed_of("nan", backend))
    x[2, 5, 1] = float("nan")
    out = op.symmetric_contraction(
        x, elements, coeffs, plan.monomials, plan.terms, plan.out_dims, backend=backend
    )
    assert torch.isnan(out[2]).any()
    assert torch.isfinite(out[[0, 1, 3, 4, 5]]).all()


def test_cpp_coefficient_gradients_do_not_depend_on_the_thread_count():
    require_cpp()
    _, x, elements, coeffs, plan = case(2, 3, 70, 50, seed_of("threads"))
    grad = torch.randn(x.size(0), x.size(1) * sum(plan.out_dims))
    arguments = (grad, x, elements, coeffs, plan.monomials, plan.terms, plan.out_dims, True, True)
    one = torch.ops.fastflow.symmetric_contraction_backward(*arguments)
    torch.set_num_threads(2)
    try:
        two = torch.ops.fastflow.symmetric_contraction_backward(*arguments)
    finally:
        torch.set_num_threads(1)
    assert torch.equal(one[0], two[0]) and torch.equal(one[1], two[1])


def test_the_cpp_op_checks_its_plan_and_inputs():
    require_cpp()
    _, x, elements, coeffs, plan = case(1, 2, 5, 3, seed_of("checks"))
    call = torch.ops.fastflow.symmetric_contraction
    monomials, terms = plan.monomials, plan.terms
    with pytest.raises(RuntimeError, match=r"elements\[0\] = 9 is outside \[0, 4\)"):
        call(x, torch.full_like(elements, 9), coeffs, monomials, terms, plan.out_dims)
    with pytest.raises(RuntimeError, match="terms must be sorted by output row"):
        call(x, elements, coeffs, monomials, terms.flip(0), plan.out_dims)
    bad = monomials.clone()
    bad[-1, 0] = monomials.size(0)
    with pytest.raises(RuntimeError, match=r"must be -1 or an earlier slot"):
        call(x, elements, coeffs, bad, terms, plan.out_dims)
    with pytest.raises(RuntimeError, match="coeffs must have dtype Float"):
        call(x, elements, coeffs.double(), monomials, terms, plan.out_dims)
    with pytest.raises(RuntimeError, match=r"coeffs must be \[E, Q="):
        call(x, elements, coeffs[:, :-1], monomials, terms, plan.out_dims)
    with pytest.raises(RuntimeError, match="must index the"):
        call(x, elements, coeffs, monomials, terms, [1])


def test_a_backward_that_does_not_reach_the_weights_skips_their_gradient(monkeypatch):
    """Forces differentiate with respect to positions only: the fused backward then computes grad x alone."""
    require_cpp()
    _, x, elements, coeffs, plan = case(1, 3, 40, 5, seed_of("engine"))
    weights = coeffs.clone().requires_grad_()
    decisions, decide = [], op._engine_will_execute
    monkeypatch.setattr(
        op, "_engine_will_execute", lambda node: decisions.append(decide(node)) or decisions[-1]
    )
    x = x.requires_grad_()
    out = op.symmetric_contraction(
        x, elements, weights * 1.0, plan.monomials, plan.terms, plan.out_dims, "cpp"
    )
    (grad_x,) = torch.autograd.grad(out.square().sum(), [x], retain_graph=True)
    both = torch.autograd.grad(out.square().sum(), [x, weights])
    assert decisions == [False, True]
    assert torch.equal(grad_x, both[0]) and not torch.all(both[1] == 0)
