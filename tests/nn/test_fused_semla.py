"""Fused Semla modules swapped in by patch_model: same outputs, gradients, state and molecules as the reference."""

import pytest
import torch

from fastflow import CacheConfig, Semla, SemlaConfig, patch_model
from fastflow.nn.semla import FusedBondRefine, FusedNodeFeedForward, FusedSemlaLayer
from fastflow.sampling import sample
from tests.models.conftest import perturbed_model, random_inputs
from tests.models.test_semla import OUTPUTS, max_rel_err, random_rotation, real_parts

pytestmark = pytest.mark.usefixtures("single_thread")

BACKENDS = ["cpp", "reference"]


def assert_close(got, expected, mask, tolerance):
    errors = {
        name: max_rel_err(g, e)
        for name, g, e in zip(OUTPUTS, real_parts(got, mask), real_parts(expected, mask))
    }
    assert max(errors.values()) <= tolerance, errors


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "preset,self_cond,sizes",
    [("tiny", True, [1, 2, 3, 17]), ("tiny", False, [5, 3]), ("small", True, [9, 4, 12])],
)
def test_patched_model_equals_unpatched(backend, preset, self_cond, sizes):
    config = SemlaConfig.preset(preset, self_cond=self_cond)
    model = perturbed_model(config, seed=len(sizes))
    inputs = random_inputs(config, sizes, n_pad=2, generator=torch.Generator().manual_seed(sum(sizes)))
    with torch.no_grad():
        expected = model(**inputs)
        handle = patch_model(model, kernels=backend)
        got = model(**inputs)
    assert handle.report()["kernels"]["backend"] == backend
    assert_close(got, expected, inputs["atom_mask"], 1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_patched_model_matches_upstream_fixture(upstream_fixture, backend):
    config = SemlaConfig.preset("tiny")
    model = Semla(config).eval()
    model.load_state_dict(
        {k[len("sc.param.") :]: v for k, v in upstream_fixture.items() if k.startswith("sc.param.")}
    )
    inputs = {k[len("sc.input.") :]: v for k, v in upstream_fixture.items() if k.startswith("sc.input.")}
    expected = [upstream_fixture[f"sc.output.{name}"] for name in OUTPUTS]
    patch_model(model, kernels=backend)
    with torch.no_grad():
        got = model(**inputs)
    assert_close(got, expected, inputs["atom_mask"], 1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_patched_model_is_equivariant(backend):
    config = SemlaConfig.preset("tiny")
    model = perturbed_model(config, seed=3, dtype=torch.double)
    patch_model(model, kernels=backend)
    g = torch.Generator().manual_seed(31)
    sizes = [6, 3]
    inputs = random_inputs(config, sizes, n_pad=1, generator=g, dtype=torch.double)
    mask = inputs["atom_mask"]
    R, shift = random_rotation(g, torch.double), torch.randn(3, generator=g, dtype=torch.double)
    perm = torch.stack(
        [torch.cat([torch.randperm(n, generator=g), torch.arange(n, mask.size(1))]) for n in sizes]
    )
    b = torch.arange(len(sizes))[:, None]

    def move(name, value):
        value = value[b, perm]
        if value.dim() == 4:
            value = value[b[..., None], torch.arange(value.size(1))[None, :, None], perm[:, None, :]]
        if name in ("coords", "cond_coords"):
            value = (value @ R.T + shift) * mask[b, perm][..., None]
        return value

    with torch.no_grad():
        reference = model(**inputs)
        moved = model(**{k: move(k, v) for k, v in inputs.items()})
    expected = [move(name, value) for name, value in zip(("x", "t", "b", "c"), reference)]
    expected[0] = expected[0] @ R.T
    assert_close(moved, expected, mask[b, perm], 1e-9)


def test_swaps_keep_parameters_and_unpatch_restores_modules():
    model = perturbed_model(SemlaConfig.preset("tiny"))
    state = model.state_dict()
    layers = list(model.dynamics.layers)
    final_ff = model.dynamics.final_ff_block
    inputs = random_inputs(model.config, [4, 6])
    with torch.no_grad():
        before = model(**inputs)
    handle = patch_model(model, kernels="cpp")

    assert all(isinstance(layer, FusedSemlaLayer) for layer in model.dynamics.layers)
    assert isinstance(model.dynamics.final_ff_block, FusedNodeFeedForward)
    assert isinstance(model.dynamics.refine_layer, FusedBondRefine)
    patched_state = model.state_dict()
    assert list(patched_state) == list(state)
    assert all(patched_state[k].data_ptr() == v.data_ptr() for k, v in state.items())
    swapped = [entry["module"] for entry in handle.report()["kernels"]["swapped"]]
    assert swapped == (
        [f"dynamics.layers.{i}" for i in range(len(layers))]
        + ["dynamics.final_ff_block", "dynamics.refine_layer", "(forward)"]
    )

    handle.unpatch()
    assert (
        all(a is b for a, b in zip(model.dynamics.layers, layers))
        and model.dynamics.final_ff_block is final_ff
    )
    assert "forward" not in model.__dict__
    with torch.no_grad():
        after = model(**inputs)
    assert all(torch.equal(x, y) for x, y in zip(before, after))


def test_unsupported_structure_is_left_alone_and_listed():
    model = perturbed_model(SemlaConfig.preset("tiny"))
    odd = model.dynamics.layers[1]
    odd.message_ff.message_mlp[0] = torch.nn.Linear(
        odd.message_ff.message_mlp[0].in_features + 1, odd.message_ff.message_mlp[0].out_features
    )
    handle = patch_model(model, kernels="cpp")
    report = handle.report()["kernels"]
    assert model.dynamics.layers[1] is odd
    assert [entry["module"] for entry in report["left_alone"]] == ["dynamics.layers.1"]
    assert "message MLP reads" in report["left_alone"][0]["reason"]
    # the layer's own feed-forward is still fused (it is a module of its own)
    assert "dynamics.layers.1.node_ff" in [entry["module"] for entry in report["swapped"]]


def test_gradients_through_the_fused_layers_equal_the_reference():
    config = SemlaConfig.preset("tiny")
    model = perturbed_model(config, seed=5, dtype=torch.double)
    inputs = random_inputs(
        config, [5, 3], n_pad=1, generator=torch.Generator().manual_seed(5), dtype=torch.double
    )

    def grads():
        model.zero_grad()
        outputs = model(**inputs)
        sum((w * o).sum() for w, o in zip((1.0, 0.3, 0.2, 0.1), outputs)).backward()
        return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}

    expected = grads()
    patch_model(model, kernels="cpp")
    got = grads()
    assert got.keys() == expected.keys()
    # Relative to the largest gradient: some are exactly 0 in exact arithmetic (a bias shared by a softmax row).
    scale = max(g.abs().max() for g in expected.values())
    assert max((got[k] - expected[k]).abs().max() / scale for k in expected) < 1e-9


@pytest.mark.parametrize("cache", [None, CacheConfig(interval=2), CacheConfig(interval=4, tolerance=0.1)])
def test_sampling_with_fused_kernels_gives_the_same_molecules(cache):
    config = SemlaConfig.preset("small")
    model = perturbed_model(config, seed=2)
    sizes = [7, 11, 4, 9, 13, 5]
    handle = patch_model(model, kernels="reference", cache=cache)
    reference = sample(model, len(sizes), steps=12, seed=4, sizes=sizes)
    handle.unpatch()
    handle = patch_model(model, kernels="cpp", cache=cache)
    fused = sample(model, len(sizes), steps=12, seed=4, sizes=sizes)
    assert fused.stats["nfe"] == reference.stats["nfe"]
    for a, b in zip(reference.graphs, fused.graphs):
        assert torch.equal(a.atom_types, b.atom_types)
        assert torch.equal(a.bond_types, b.bond_types)
        assert torch.equal(a.charges, b.charges)
    assert max((a - b).abs().max().item() for a, b in zip(reference.coords, fused.coords)) < 1e-3


def test_fused_pair_tail_is_the_generator_forward_and_copies_run_their_own_weights():
    """patch_model binds fused_semla_forward (the pair tail as one fastflow::bond_head) to the instance; a deepcopy
    of the patched model runs the copy's weights, and its unpatch leaves the original patched."""
    import copy

    model = perturbed_model(SemlaConfig.preset("tiny"))
    inputs = random_inputs(model.config, [5, 3], n_pad=2)
    with torch.no_grad():
        expected = model(**inputs)
    handle = patch_model(model, kernels="cpp")
    assert model.forward.__func__.__name__ == "fused_semla_forward"
    twin = copy.deepcopy(model)
    with torch.no_grad():
        for p in twin.parameters():
            p.mul_(0.9)
        got, twin_out = model(**inputs), twin(**inputs)
    for a, b in zip(got, expected):
        assert ((a - b).abs().max() / b.abs().max()) <= 1e-5
    assert not torch.allclose(twin_out[2], got[2])  # the copy's bond logits come from the copy's weights
    twin._fastflow_patch.unpatch()
    assert "forward" not in twin.__dict__ and model.forward.__func__.__name__ == "fused_semla_forward"
    handle.unpatch()
