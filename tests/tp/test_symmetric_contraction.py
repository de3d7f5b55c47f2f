"""fastflow::symmetric_contraction against mace-torch's own SymmetricContraction (random weights and inputs, fresh
seeds), its gradients (float64 gradcheck, double backward), torch.library.opcheck, the swap patch_model makes in a
real MACE model (energies and forces equal, state dict unchanged, unpatch restores) and the errors on bad input."""

import pytest
import torch

from fastflow import patch_model
from fastflow.benchmarks.e3nn_models import (
    energy_and_forces,
    ethanol_positions,
    mace_batch,
    mace_model,
    mace_unavailable_reason,
)
from fastflow.ops import symmetric_contraction as op

from .common import seed_of

pytestmark = [
    pytest.mark.usefixtures("single_thread"),
    pytest.mark.skipif(mace_unavailable_reason() is not None, reason=str(mace_unavailable_reason())),
]

IRREPS_IN, IRREPS_OUT, ELEMENTS = "5x0e+5x1o+5x2e", "5x0e+5x1o+5x2e", 3


def backends():
    return ["reference"] + (["cpp"] if op.cpp_unavailable_reason() is None else [])


def mace_contraction(correlation, seed, irreps_in=IRREPS_IN, irreps_out=IRREPS_OUT, elements=ELEMENTS):
    from e3nn import o3
    from mace.modules.symmetric_contraction import SymmetricContraction as MaceContraction

    torch.manual_seed(seed)
    return MaceContraction(o3.Irreps(irreps_in), o3.Irreps(irreps_out), correlation, num_elements=elements)


def inputs(module, n_nodes, seed, dtype=torch.float32):
    generator = torch.Generator().manual_seed(seed)
    channels, dim = (
        module.contractions[0].num_features,
        module.irreps_in.dim // module.contractions[0].num_features,
    )
    x = torch.randn(n_nodes, channels, dim, generator=generator, dtype=dtype)
    elements = torch.randint(0, ELEMENTS, (n_nodes,), generator=generator)
    return x, elements, torch.nn.functional.one_hot(elements, ELEMENTS).to(dtype)


def relative_error(got, expected):
    return ((got.double() - expected.double()).abs().max() / expected.double().abs().max()).item()


@pytest.mark.parametrize("backend", backends())
@pytest.mark.parametrize("correlation", [1, 2, 3])
@pytest.mark.parametrize("n_nodes", [1, 2, 3, 17, 100])
def test_matches_mace_module(backend, correlation, n_nodes):
    from fastflow.nn.symmetric_contraction import SymmetricContraction

    module = mace_contraction(correlation, seed_of("module", correlation, n_nodes))
    fused = SymmetricContraction(module, backend=backend)
    assert list(fused.state_dict()) == list(module.state_dict())
    x, _, y = inputs(module, n_nodes, seed_of("x", backend, correlation, n_nodes))
    expected, got = module(x, y), fused(x, y)
    assert got.shape == expected.shape and not torch.all(expected == 0)
    assert relative_error(got, expected) <= 1e-5


def test_scalar_only_and_mixed_correlations_match():
    from fastflow.nn.symmetric_contraction import SymmetricContraction

    module = mace_contraction(3, seed_of("scalar"), irreps_in="4x0e+4x1o", irreps_out="4x0e")
    x, _, y = inputs(module, 9, seed_of("scalar x"))
    assert relative_error(SymmetricContraction(module)(x, y), module(x, y)) <= 1e-5


def plan_and_coeffs(module, dtype):
    from fastflow.nn.symmetric_contraction import SymmetricContraction

    fused = SymmetricContraction(module)
    coeffs = op.contraction_coefficients(
        fused.u.to(dtype), fused.weights().to(dtype), fused.q_offsets, fused.k_offsets
    )
    return fused, coeffs.detach()


@pytest.mark.parametrize("backend", backends())
def test_gradcheck_float64(backend):
    module = mace_contraction(3, seed_of("gradcheck"), irreps_in="2x0e+2x1o", irreps_out="2x0e+2x1o")
    fused, coeffs = plan_and_coeffs(module, torch.float64)
    x, elements, _ = inputs(module, 3, seed_of("gradcheck x"), torch.float64)
    x.requires_grad_(True)
    coeffs.requires_grad_(True)

    def f(x, coeffs):
        return op.symmetric_contraction(
            x, elements, coeffs, fused.monomials, fused.terms, fused.out_dims, backend
        )

    assert torch.autograd.gradcheck(f, (x, coeffs))
    assert torch.autograd.gradgradcheck(f, (x, coeffs))


def test_opcheck():
    if op.cpp_unavailable_reason() is not None:
        pytest.skip(f"cpp backend unavailable: {op.cpp_unavailable_reason()}")
    module = mace_contraction(2, seed_of("opcheck"), irreps_in="3x0e+3x1o", irreps_out="3x0e+3x1o")
    fused, coeffs = plan_and_coeffs(module, torch.float32)
    x, elements, _ = inputs(module, 4, seed_of("opcheck x"))
    args = (
        x.requires_grad_(True),
        elements,
        coeffs.requires_grad_(True),
        fused.monomials,
        fused.terms,
        fused.out_dims,
    )
    op.symmetric_contraction(*args, backend="cpp")  # binds the fake kernel and autograd
    torch.library.opcheck(torch.ops.fastflow.symmetric_contraction.default, args)


def test_patched_mace_model_energy_and_forces_and_unpatch():
    from fastflow.nn.symmetric_contraction import SymmetricContraction

    model = mace_model(hidden_irreps="16x0e+16x1o", max_ell=2, correlation=3)
    data = mace_batch(*ethanol_positions(3, spacing=4.0, seed=seed_of("mace") % 1000))
    state = {key: value.clone() for key, value in model.state_dict().items()}
    energy, forces = energy_and_forces(model, data)
    handle = patch_model(model)
    swapped = {s["module"]: s["to"] for s in handle.report()["kernels"]["swapped"]}
    paths = [p for p in swapped if p.endswith("symmetric_contractions")]
    assert len(paths) == 2 and all(swapped[p] == "SymmetricContraction" for p in paths)
    assert isinstance(model.products[0].symmetric_contractions, SymmetricContraction)
    assert model.state_dict().keys() == state.keys()
    patched_energy, patched_forces = energy_and_forces(model, data)
    torch.testing.assert_close(patched_energy, energy, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(patched_forces, forces, rtol=1e-4, atol=1e-5)
    handle.unpatch()
    assert type(model.products[0].symmetric_contractions).__module__.startswith("mace.")
    assert torch.equal(energy_and_forces(model, data)[1], forces)


def test_bad_input_is_named():
    from fastflow.nn.symmetric_contraction import SymmetricContraction

    module = mace_contraction(2, seed_of("bad"), irreps_in="3x0e+3x1o", irreps_out="3x0e")
    fused, coeffs = plan_and_coeffs(module, torch.float32)
    x, elements, _ = inputs(module, 4, seed_of("bad x"))
    with pytest.raises(IndexError, match="elements holds indices"):
        op.symmetric_contraction(x, elements + ELEMENTS, coeffs, fused.monomials, fused.terms, fused.out_dims)
    with pytest.raises(ValueError, match=r"x must be \[N, C, I\]"):
        op.symmetric_contraction(x[0], elements, coeffs, fused.monomials, fused.terms, fused.out_dims)
    with pytest.raises(TypeError, match="cannot fuse this module"):
        SymmetricContraction(torch.nn.Linear(2, 2))
    # node attributes that are not one-hot are refused (never a silent switch to MACE's own module)
    with pytest.raises(ValueError, match="node_attrs must be one-hot"):
        fused(x, torch.rand(4, ELEMENTS))
    with pytest.raises(ValueError, match=r"node_attrs must be \[N, 3\]"):
        fused(x, torch.ones(4, ELEMENTS + 1))


def test_a_changed_u_buffer_rebuilds_the_plan():
    from fastflow.nn.symmetric_contraction import SymmetricContraction

    module = mace_contraction(2, seed_of("reload"), irreps_in="3x0e+3x1o", irreps_out="3x0e+3x1o")
    fused = SymmetricContraction(module)
    x, _, y = inputs(module, 5, seed_of("reload x"))
    with torch.no_grad():
        module.contractions[1].U_matrix_2.mul_(-2.0)  # in place, as load_state_dict copies
    assert relative_error(fused(x, y), module(x, y)) <= 1e-5


def test_scripted_patched_mace_runs_the_fused_op_and_reloads_in_a_fresh_process(tmp_path):
    import subprocess
    import sys

    from e3nn.util import jit

    if op.cpp_unavailable_reason() is not None:
        pytest.skip(f"cpp backend unavailable: {op.cpp_unavailable_reason()}")
    model = mace_model(hidden_irreps="16x0e+16x1o", max_ell=2, correlation=3)
    data = mace_batch(*ethanol_positions(3, spacing=4.0, seed=seed_of("script") % 1000))
    energy, forces = energy_and_forces(model, data)
    patch_model(model)
    scripted = jit.compile(model)
    contraction = scripted.products[0].symmetric_contractions
    assert contraction.original_name == "_ScriptedSymmetricContraction"
    assert "fastflow::symmetric_contraction" in str(contraction.graph)
    scripted_energy, scripted_forces = energy_and_forces(scripted, data)
    torch.testing.assert_close(scripted_energy, energy, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(scripted_forces, forces, rtol=1e-4, atol=1e-5)
    scripted.save(str(tmp_path / "mace.pt"))
    torch.save({"batch": data, "forces": scripted_forces}, tmp_path / "inputs.pt")
    code = f"""
import torch
import fastflow
from fastflow.benchmarks.e3nn_models import energy_and_forces
model = torch.jit.load({str(tmp_path / "mace.pt")!r})
saved = torch.load({str(tmp_path / "inputs.pt")!r})
torch.testing.assert_close(energy_and_forces(model, saved["batch"])[1], saved["forces"], rtol=0, atol=0)
print("reloaded")
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and "reloaded" in done.stdout, done.stderr[-2000:]
