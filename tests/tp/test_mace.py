"""patch_model on real MACE models (mace-torch's own ScaleShiftMACE, random weights, rotated ethanol molecules):
each interaction block's gather → conv_tp → scatter-sum runs as one fastflow::tp_conv, energies and forces match the
unpatched model within twice its own float32 error against float64, forces rotate with the molecule, training's
double backward matches, unpatch restores the model, and a patched model scripts, saves and reloads."""

import importlib.util
import json
import subprocess
import sys

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
from fastflow.nn.tensor_product import EdgeIndexTPConv

from .common import require_backend

pytestmark = [
    pytest.mark.usefixtures("single_thread"),
    pytest.mark.skipif(mace_unavailable_reason() is not None, reason=str(mace_unavailable_reason())),
]

SMALL = {"hidden_irreps": "16x0e+16x1o", "max_ell": 2, "correlation": 2}


def float64_twin(model):
    twin = mace_model(**SMALL, dtype=torch.float64)
    twin.load_state_dict(model.state_dict())
    return twin


def batch(n_molecules=3, seed=0, dtype=torch.float32):
    return mace_batch(*ethanol_positions(n_molecules, spacing=4.0, seed=seed), dtype=dtype)


def max_error(a, b):
    return (a.double() - b.double()).abs().max().item()


@pytest.mark.parametrize("kernels", ["auto", "cpp"])
def test_fused_convolution_matches_within_the_models_own_float32_error(kernels):
    require_backend(kernels)
    model, data = mace_model(**SMALL), batch()
    state = {key: value.clone() for key, value in model.state_dict().items()}
    energy64, forces64 = energy_and_forces(float64_twin(model), batch(dtype=torch.float64))
    energy, forces = energy_and_forces(model, data)
    handle = patch_model(model, kernels=kernels)
    swapped = {swap["module"]: swap["to"] for swap in handle.report()["kernels"]["swapped"]}
    assert swapped["interactions.0.conv_tp"] == swapped["interactions.1.conv_tp"] == "EdgeIndexTPConv"
    assert model.interactions[0].conv_fusion == "fastflow"
    patched_energy, patched_forces = energy_and_forces(model, data)
    assert max_error(patched_energy, energy) <= 2 * max_error(energy, energy64)
    assert max_error(patched_forces, forces) <= 2 * max_error(forces, forces64)
    assert model.state_dict().keys() == state.keys()

    handle.unpatch()
    assert not hasattr(model.interactions[0], "conv_fusion")
    assert type(model.interactions[0].conv_tp).__name__ == "TensorProduct"
    assert torch.equal(energy_and_forces(model, data)[1], forces)


def test_forces_rotate_with_the_molecules():
    model, (numbers, positions) = mace_model(**SMALL), ethanol_positions(3, spacing=4.0, seed=1)
    patch_model(model)
    rotation = torch.linalg.qr(torch.randn(3, 3, generator=torch.Generator().manual_seed(2)))[0].double()
    energy, forces = energy_and_forces(model, mace_batch(numbers, positions))
    rotated = mace_batch(numbers, positions @ rotation.numpy().T)
    rotated_energy, rotated_forces = energy_and_forces(model, rotated)
    torch.testing.assert_close(rotated_energy, energy, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(rotated_forces, forces @ rotation.float().T, rtol=1e-4, atol=1e-5)


def test_training_double_backward_matches():
    """training=True keeps the force graph: a force-matching loss differentiates through the fused backward."""

    def parameter_gradients(model, data):
        out = model({key: value.clone() for key, value in data.items()}, training=True, compute_force=True)
        loss = out["energy"].sum() + out["forces"].square().sum()
        parameters = [p for _, p in sorted(model.named_parameters())]
        return torch.autograd.grad(loss, parameters, allow_unused=True)

    model, data = mace_model(**SMALL, dtype=torch.float64), batch(dtype=torch.float64)
    expected = parameter_gradients(model, data)
    patch_model(model)
    for got, want in zip(parameter_gradients(model, data), expected):
        if want is None:
            assert got is None
        else:
            torch.testing.assert_close(got, want, rtol=1e-8, atol=1e-10)


def test_a_block_that_already_fuses_is_left_alone_with_the_reason():
    model = mace_model(**SMALL)
    model.interactions[
        1
    ].conv_fusion = "atomic"  # as mace-torch's cuequivariance / OpenEquivariance paths set it
    handle = patch_model(model)
    report = handle.report()["kernels"]
    assert isinstance(model.interactions[0].conv_tp, EdgeIndexTPConv)
    assert not isinstance(model.interactions[1].conv_tp, EdgeIndexTPConv)
    (entry,) = [e for e in report["left_alone"] if e["module"] == "interactions.1.conv_tp"]
    assert "already fuses its convolution" in entry["reason"]
    handle.unpatch()
    assert model.interactions[1].conv_fusion == "atomic"


def test_edge_index_conv_names_a_bad_edge_index():
    model = mace_model(**SMALL)
    conv = EdgeIndexTPConv(model.interactions[0].conv_tp)
    d = conv.descriptor
    node_feats, edge_attrs = torch.randn(4, d.dim_in1), torch.randn(5, d.dim_in2)
    with pytest.raises(ValueError, match=r"edge_index must have shape \[2, E\]"):
        conv(node_feats, edge_attrs, torch.randn(5, d.weight_numel), torch.zeros(5, dtype=torch.int64))
    with pytest.raises(ValueError, match="per-edge weights"):
        EdgeIndexTPConv(model.interactions[0].skip_tp)


def test_patched_model_scripts_saves_and_reloads_in_a_fresh_process(tmp_path):
    """MACE deploys through TorchScript (e3nn.util.jit.compile): the swapped modules script as direct calls of the
    C++ ops, and the saved file runs, forces included, in a new process once fastflow's ops are loaded."""
    from e3nn.util import jit

    require_backend("cpp")
    model, data = mace_model(**SMALL), batch()
    energy, forces = energy_and_forces(model, data)
    patch_model(model)
    scripted = jit.compile(model)
    assert scripted.interactions[0].conv_tp.original_name == "_ScriptedEdgeIndexTPConv"
    assert scripted.interactions[0].skip_tp.original_name == "_ScriptedTensorProduct"
    scripted_energy, scripted_forces = energy_and_forces(scripted, data)
    torch.testing.assert_close(scripted_energy, energy, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(scripted_forces, forces, rtol=1e-4, atol=1e-5)

    scripted.save(str(tmp_path / "mace.pt"))
    torch.save({"batch": data, "forces": scripted_forces}, tmp_path / "inputs.pt")
    code = f"""
import torch
import fastflow
from fastflow import _extension
assert _extension.load_extension()
from fastflow.benchmarks.e3nn_models import energy_and_forces
model = torch.jit.load({str(tmp_path / "mace.pt")!r})
saved = torch.load({str(tmp_path / "inputs.pt")!r})
torch.testing.assert_close(energy_and_forces(model, saved["batch"])[1], saved["forces"], rtol=0, atol=0)
print("reloaded")
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and "reloaded" in done.stdout, done.stderr[-2000:]


def test_scripting_needs_the_cpp_backend():
    model = mace_model(**SMALL)
    conv = EdgeIndexTPConv(model.interactions[0].conv_tp, backend="reference")
    with pytest.raises(RuntimeError, match="torch.jit.script needs backend 'auto' or 'cpp'"):
        torch.jit.script(conv)


def test_bench_e3nn_models_writes_ratios_and_errors(tmp_path):
    from fastflow.benchmarks.e3nn_models import run

    require_backend("cpp")
    results = run(
        configs=("mace-off-small",),
        n_molecules=2,
        repeats=1,
        compile_model=False,
        out=tmp_path / "r.json",
        cueq=importlib.util.find_spec("cuequivariance_torch") is not None,
    )
    (row,) = json.loads((tmp_path / "r.json").read_text())["rows"]
    assert row == results["rows"][0] and row["atoms"] == 18
    assert (
        row["speedup_unpatched"] == 1.0 and row["speedup_patched"] > 0 and row["speedup_patched_tp_only"] > 0
    )
    assert max(row["force_max_rel_error"].values()) < 1e-4
    if "cueq" in row["force_max_rel_error"]:  # mace-torch's own cuEquivariance conversion, its CPU path
        assert row["speedup_cueq"] > 0
