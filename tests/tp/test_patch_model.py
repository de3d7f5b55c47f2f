"""patch_model on a small e3nn-built equivariant model (two NequIP-style convolutions): the e3nn tensor products
are swapped for fused modules holding the same weights, outputs / forces / gradients are unchanged, unsupported
products are left alone with the reason, and unpatch restores the model."""

import subprocess
import sys

import pytest
import torch
from e3nn import o3
from torch import nn

from fastflow import patch_model
from fastflow.nn import TensorProduct

from .common import assert_close, require_backend, seed_of
from .test_conv import nequip_tp

pytestmark = pytest.mark.usefixtures("single_thread")

N_SPECIES, N_RADIAL = 3, 8


class Convolution(nn.Module):
    """NequIP's interaction: self-interaction (FullyConnectedTensorProduct with the species one-hot) plus a
    convolution (uvu TensorProduct with spherical harmonics, per-edge weights from a radial MLP) and a Linear."""

    def __init__(self, irreps_in, irreps_out, lmax=2):
        super().__init__()
        self.self_interaction = o3.FullyConnectedTensorProduct(irreps_in, f"{N_SPECIES}x0e", irreps_out)
        self.tp = nequip_tp(str(o3.Irreps(irreps_in)), lmax=lmax)
        self.radial = nn.Sequential(nn.Linear(N_RADIAL, 16), nn.SiLU(), nn.Linear(16, self.tp.weight_numel))
        self.linear = o3.Linear(self.tp.irreps_out, irreps_out)

    def forward(self, x, species, sh, radial, src, dst):
        messages = self.tp(x[src], sh, self.radial(radial))
        aggregated = messages.new_zeros(x.size(0), messages.size(1)).index_add(0, dst, messages) / 4.0
        return self.self_interaction(x, species) + self.linear(aggregated)


class TinyPotential(nn.Module):
    def __init__(self):
        super().__init__()
        hidden = "8x0e+4x1o+2x2e"
        self.embed = o3.Linear(f"{N_SPECIES}x0e", "8x0e")
        self.layers = nn.ModuleList([Convolution("8x0e", hidden), Convolution(hidden, hidden)])
        self.square = o3.FullTensorProduct("2x0e", "2x0e")  # mode uvuv: left alone
        self.readout = o3.Linear(hidden, "2x0e")

    def forward(self, positions, species, src, dst):
        vectors = positions[dst] - positions[src]
        sh = o3.spherical_harmonics(o3.Irreps.spherical_harmonics(2), vectors, normalize=True)
        lengths = vectors.norm(dim=-1, keepdim=True)
        radial = torch.exp(-(lengths - torch.linspace(0.5, 3, N_RADIAL)).square())
        x = self.embed(species)
        for layer in self.layers:
            x = layer(x, species, sh, radial, src, dst)
        scalars = self.readout(x)
        return self.square(scalars, scalars).sum()


def molecule(seed, n=7):
    g = torch.Generator().manual_seed(seed)
    positions = torch.randn(n, 3, generator=g) * 1.5
    species = nn.functional.one_hot(torch.randint(N_SPECIES, (n,), generator=g), N_SPECIES).float()
    pairs = torch.cartesian_prod(torch.arange(n), torch.arange(n))
    pairs = pairs[pairs[:, 0] != pairs[:, 1]]
    return positions, species, pairs[:, 0].contiguous(), pairs[:, 1].contiguous()


def energy_forces_gradients(model, positions, species, src, dst):
    positions = positions.clone().requires_grad_()
    energy = model(positions, species, src, dst)
    forces = -torch.autograd.grad(energy, positions, create_graph=True)[0]
    loss = energy + forces.square().sum()  # force-matching style loss: double backward
    parameters = [p for _, p in sorted(model.named_parameters())]
    return energy.detach(), forces.detach(), torch.autograd.grad(loss, parameters)


@pytest.mark.parametrize("kernels", ["auto", "cpp"])
def test_patched_model_matches_and_unpatch_restores(kernels):
    if kernels == "cpp":
        require_backend("cpp")
    torch.manual_seed(seed_of("model"))
    model = TinyPotential()
    inputs = molecule(seed_of("molecule"))
    keys, originals = list(model.state_dict()), dict(model.named_modules())
    expected = energy_forces_gradients(model, *inputs)

    handle = patch_model(model, kernels=kernels)
    report = handle.report()["kernels"]
    swapped = {entry["module"]: entry["from"] for entry in report["swapped"]}
    assert swapped == {
        "layers.0.self_interaction": "FullyConnectedTensorProduct",
        "layers.0.tp": "TensorProduct",
        "layers.1.self_interaction": "FullyConnectedTensorProduct",
        "layers.1.tp": "TensorProduct",
    }
    assert all(entry["to"] == "TensorProduct" for entry in report["swapped"])
    assert [(e["module"], e["class"]) for e in report["left_alone"]] == [("square", "FullTensorProduct")]
    assert "uvuv" in report["left_alone"][0]["reason"]
    fused = model.layers[0].self_interaction
    assert isinstance(fused, TensorProduct) and fused.weight is originals["layers.0.self_interaction"].weight
    assert list(model.state_dict()) == keys

    energy, forces, gradients = energy_forces_gradients(model, *inputs)
    assert_close(energy, expected[0], 1e-5, "energy")
    assert_close(forces, expected[1], 1e-5, "forces")
    for (name, _), got, ref in zip(sorted(model.named_parameters()), gradients, expected[2]):
        assert_close(got, ref, 1e-4, f"d loss / d {name}")

    handle.unpatch()
    assert all(model.get_submodule(path) is module for path, module in originals.items() if path)
    after = energy_forces_gradients(model, *inputs)
    assert torch.equal(after[0], expected[0]) and torch.equal(after[1], expected[1])


def test_reference_kernels_swap_nothing_and_cuequivariance_is_refused_here():
    model = TinyPotential()
    handle = patch_model(model, kernels="reference")
    assert handle.report()["kernels"]["swapped"] == []
    handle.unpatch()
    if torch.cuda.is_available():
        pytest.skip("a CUDA machine may have cuequivariance's kernels")
    with pytest.raises(RuntimeError, match="kernels='cuequivariance' is not available here"):
        patch_model(model, kernels="cuequivariance")
    assert "_fastflow_patch" not in model.__dict__


def test_patching_never_imports_e3nn_or_cuequivariance():
    code = (
        "import sys, torch, fastflow; h = fastflow.patch_model(torch.nn.Sequential(torch.nn.Linear(2, 2))); "
        "assert h.report()['kernels']['swapped'] == []; "
        "print(sorted(m for m in ('e3nn', 'cuequivariance', 'cuequivariance_torch') if m in sys.modules))"
    )
    result = subprocess.run(
        [sys.executable, "-W", "ignore", "-c", code], capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() == "[]"


def test_tensor_product_precision_on_modules_and_in_patch_model(monkeypatch):
    import fastflow.runtime

    tp = o3.FullyConnectedTensorProduct("16x0e+16x1o", "3x0e", "16x0e+16x1o")
    for bad, match in (
        (dict(backend="cpp", precision="tf32"), "runs on the Triton kernels"),
        (dict(backend="reference", precision="bf16"), "runs on the Triton kernels"),
        (dict(precision="fp16"), "precision must be one of"),
    ):
        with pytest.raises(ValueError, match=match):
            TensorProduct(tp, **bad)
    assert "precision='tf32'" in repr(TensorProduct(tp, backend="triton", precision="tf32"))
    if torch.cuda.is_available():
        pytest.skip("on a GPU the tensor products run Triton's bf16 variant")
    # On a CPU (bf16 assumed present, as on AMX machines) Semla modules would take bf16, tensor products stay fp32:
    # said in the report and, when asked for explicitly, once as a warning.
    monkeypatch.setattr(fastflow.runtime, "cpu_isa", lambda: ("avx2", "avx512", "amx_bf16"))
    model = TinyPotential()
    with pytest.warns(UserWarning, match="tensor products compute in float32"):
        handle = patch_model(model, precision="bf16")
    assert model.layers[0].self_interaction.precision == "fp32"
    assert handle.report()["precision"]["tensor_products"].startswith("fp32 (tf32 / bf16 tensor products")
    handle.unpatch()
    handle = patch_model(model)
    assert handle.report()["precision"]["tensor_products"] == "fp32"
    handle.unpatch()


def test_tf32_module_on_triton_matches_e3nn(triton_device):
    # Under the interpreter tf32 products are float32 ones: e3nn's float32 result to 1e-5.
    torch.manual_seed(seed_of("tf32 module"))
    tp = o3.FullyConnectedTensorProduct("16x0e+16x1o", "3x0e", "16x0e+16x1o").to(triton_device)
    fused = TensorProduct(tp, backend="triton", precision="tf32")
    x1, x2 = torch.randn(5, tp.irreps_in1.dim, device=triton_device), torch.randn(5, 3, device=triton_device)
    assert_close(fused(x1, x2), tp(x1, x2), 1e-5, "tf32 TensorProduct")
