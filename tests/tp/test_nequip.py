"""patch_model on real NequIP models (nequip's own NequIPGNNModel, random weights, rotated ethanol molecules): each
convolution's TensorProductScatter runs as one fastflow::tp_conv, energies and forces match the unpatched model
within twice its own float32 error against float64, forces rotate with the molecules, unpatch restores the model,
and the patched model scripts and compiles."""

import pytest
import torch

from fastflow import patch_model
from fastflow.benchmarks.e3nn_models import (
    ethanol_positions,
    nequip_batch,
    nequip_energy_and_forces,
    nequip_model,
    nequip_unavailable_reason,
)
from fastflow.nn.tensor_product import ScatterTPConv

from .common import require_backend

pytestmark = [
    pytest.mark.usefixtures("single_thread"),
    pytest.mark.skipif(nequip_unavailable_reason() is not None, reason=str(nequip_unavailable_reason())),
]

SMALL = {"num_layers": 2, "l_max": 2, "num_features": 8}


def max_error(a, b):
    return (a.double() - b.double()).abs().max().item()


@pytest.mark.parametrize("kernels", ["auto", "cpp"])
def test_fused_convolution_matches_within_the_models_own_float32_error(kernels):
    require_backend(kernels)
    model = nequip_model(**SMALL)
    twin = nequip_model(**SMALL, dtype=torch.float64)
    twin.load_state_dict(model.state_dict())
    data = nequip_batch(*ethanol_positions(3, spacing=4.0))
    energy64, forces64 = nequip_energy_and_forces(twin, data)
    energy, forces = nequip_energy_and_forces(model, data)
    keys = model.state_dict().keys()
    handle = patch_model(model, kernels=kernels)
    fused = [
        swap["module"] for swap in handle.report()["kernels"]["swapped"] if swap["to"] == "ScatterTPConv"
    ]
    assert len(fused) == SMALL["num_layers"] and all(path.endswith("conv.tp_scatter") for path in fused)
    patched_energy, patched_forces = nequip_energy_and_forces(model, data)
    assert max_error(patched_energy, energy) <= 2 * max_error(energy, energy64)
    assert max_error(patched_forces, forces) <= 2 * max_error(forces, forces64)
    assert model.state_dict().keys() == keys

    handle.unpatch()
    assert type(model.get_submodule(fused[0])).__name__ == "TensorProductScatter"
    assert torch.equal(nequip_energy_and_forces(model, data)[1], forces)


def test_forces_rotate_with_the_molecules():
    model, (numbers, positions) = nequip_model(**SMALL), ethanol_positions(3, spacing=4.0, seed=1)
    patch_model(model)
    rotation = torch.linalg.qr(torch.randn(3, 3, generator=torch.Generator().manual_seed(2)))[0].double()
    energy, forces = nequip_energy_and_forces(model, nequip_batch(numbers, positions))
    rotated = nequip_batch(numbers, positions @ rotation.numpy().T)
    rotated_energy, rotated_forces = nequip_energy_and_forces(model, rotated)
    torch.testing.assert_close(rotated_energy, energy, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(rotated_forces, forces @ rotation.float().T, rtol=1e-4, atol=1e-5)


def test_patched_model_scripts():
    from e3nn.util import jit

    require_backend("cpp")
    model, data = nequip_model(**SMALL), nequip_batch(*ethanol_positions(2, spacing=4.0))
    patch_model(model)
    energy, forces = nequip_energy_and_forces(model, data)
    scripted = jit.compile(model)
    assert any(getattr(m, "original_name", "") == "_ScriptedScatterTPConv" for m in scripted.modules())
    torch.testing.assert_close(nequip_energy_and_forces(scripted, data)[1], forces, rtol=1e-5, atol=1e-6)


def test_patched_model_compiles():
    """torch.compile of the patched model (the fused ops' fake kernels trace, the forces' backward included)."""
    require_backend("cpp")
    model, data = nequip_model(**SMALL), nequip_batch(*ethanol_positions(2, spacing=4.0))
    patch_model(model)
    energy, forces = nequip_energy_and_forces(model, data)
    compiled_energy, compiled_forces = nequip_energy_and_forces(torch.compile(model), data)
    assert max_error(compiled_energy, energy) <= 1e-5 * energy.abs().item()
    torch.testing.assert_close(compiled_forces, forces, rtol=1e-4, atol=1e-5)


def test_scatter_conv_needs_per_edge_weights():
    model = nequip_model(**SMALL)
    scatter = next(m for m in model.modules() if type(m).__name__ == "TensorProductScatter")
    scatter.tp.shared_weights = True  # as a shared-weight product would report it
    with pytest.raises(ValueError, match="per-edge weights"):
        ScatterTPConv(scatter)


def test_bench_e3nn_models_runs_nequip():
    from fastflow.benchmarks.e3nn_models import run

    require_backend("cpp")
    (row,) = run(configs=("nequip-issue15",), n_molecules=2, repeats=1, compile_model=False)["rows"]
    assert row["atoms"] == 18 and row["speedup_patched"] > 0 and row["speedup_patched_tp_only"] > 0
    assert max(row["force_max_rel_error"].values()) < 1e-4
