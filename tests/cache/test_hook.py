"""The cache hook on a tiny Semla model and on stub models, through fastflow.sample and by direct calls."""

import pytest
import torch

from fastflow import CacheConfig, SemlaConfig, patch_model, sample
from fastflow.cache import Forecaster
from tests.models.conftest import perturbed_model, random_inputs
from tests.sampling.stubs import StubModel

TINY = SemlaConfig.preset("tiny")


def assert_same_samples(a, b):
    for name in ("coords", "type_probs", "bond_probs", "charge_probs"):
        for x, y in zip(getattr(a, name), getattr(b, name)):
            assert torch.equal(x, y), name


def run(model, cache, **kwargs):
    """Sample with a fresh patch; returns (result, stats)."""
    handle = patch_model(model, kernels="reference", cache=cache)
    try:
        return sample(model, **kwargs), handle.stats()
    finally:
        handle.unpatch()


REQUEST = dict(n_molecules=4, steps=6, seed=1, sizes=[3, 5, 4, 7], batch_size=4)


@pytest.mark.parametrize(
    "cache",
    [
        None,
        CacheConfig(interval=1),
        CacheConfig(forecaster="ab", interval=1),
        CacheConfig(interval=1, block="dynamics.layers.1"),
    ],
)
def test_interval_one_or_no_cache_is_bit_identical(model, cache):
    base = sample(model, **REQUEST)
    result, stats = run(model, cache, **REQUEST)
    assert_same_samples(base, result)
    assert result.stats["nfe"] == base.stats["nfe"] == 4 * 6


@pytest.mark.parametrize("forecaster", ["reuse", "taylor", "ab"])
def test_fixed_interval_skips_the_network_and_counts_it(model, forecaster):
    result, stats = run(model, CacheConfig(forecaster=forecaster, interval=2), **REQUEST)
    assert result.stats["nfe"] == 4 * 4  # steps 0, 2, 4 and the forced last step 5
    assert (
        stats["evaluations"] == 16 and stats["forecasts"] == 8 and stats["hit_rate"] == pytest.approx(1 / 3)
    )
    assert stats["evaluations_per_molecule"] == {i: 4 for i in range(4)}
    assert all(torch.isfinite(c).all() for c in result.coords)


def test_forecast_is_the_combination_of_the_stored_outputs(model64):
    """Direct calls (no sampler): 3 evaluations at uneven times, then a Taylor-2 forecast of every output."""
    handle = patch_model(model64, cache=CacheConfig(interval=100, warmup=2))
    inputs = random_inputs(TINY, [4, 6], dtype=torch.float64)
    times = [0.1, 0.25, 0.33, 0.4]
    outputs = []
    for t in times:
        inputs["inv_feats"][..., 0] = t
        outputs.append(model64(**inputs))
    handle.unpatch()
    c = Forecaster("taylor", 2).coefficients(times[2::-1], times[3], times[3])
    mask = inputs["atom_mask"].bool()
    for i, forecast in enumerate(outputs[3]):
        expected = sum(ck * outputs[2 - k][i] for k, ck in enumerate(c))
        keep = mask if forecast.dim() == 3 else mask[:, :, None] & mask[:, None, :]
        torch.testing.assert_close(forecast[keep], expected[keep])
    assert handle.stats()["evaluations"] == 6 and handle.stats()["forecasts"] == 2


@pytest.mark.parametrize("forecaster", ["taylor", "ab"])
def test_hook_is_equivariant(model64, forecaster):
    """Rotated inputs at every step → rotated coordinates and unchanged logits, forecast steps included."""
    rotation = torch.linalg.qr(
        torch.randn(3, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    )[0]
    inputs = random_inputs(TINY, [5, 6], dtype=torch.float64)
    runs = []
    for rotate in (False, True):
        handle = patch_model(model64, cache=CacheConfig(forecaster=forecaster, interval=2))
        outputs = []
        for t in [0.0, 0.2, 0.3, 0.45, 0.5]:
            x = {
                k: v @ rotation.T if rotate and k in ("coords", "cond_coords") else v
                for k, v in inputs.items()
            }
            x["inv_feats"] = x["inv_feats"].clone()
            x["inv_feats"][..., 0] = t
            outputs.append(model64(**x))
        assert handle.stats()["forecasts"] == 4  # calls 1 and 3 were forecasts
        handle.unpatch()
        runs.append(outputs)
    for plain, rotated in zip(*runs):
        torch.testing.assert_close(rotated[0], plain[0] @ rotation.T)
        for a, b in zip(plain[1:], rotated[1:]):
            torch.testing.assert_close(a, b)


@pytest.mark.parametrize("error, tolerance", [("sample", 4.0), ("relative", 0.1)])
def test_adaptive_policy_is_equivariant(model64, error, tolerance):
    """Rotated inputs at every step → the same per-molecule decisions, rotated coordinates and unchanged logits:
    the error measures see coordinates only through rotation invariants."""
    rotation = torch.linalg.qr(
        torch.randn(3, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    )[0]
    inputs = random_inputs(TINY, [4, 6, 5], dtype=torch.float64)
    runs, decisions = [], []
    for move in (False, True):
        handle = patch_model(
            model64, cache=CacheConfig(interval=4, warmup=3, tolerance=tolerance, error=error)
        )
        outputs = []
        for t in [0.0, 0.2, 0.3, 0.38, 0.45, 0.5, 0.56, 0.6]:
            x = dict(inputs)
            if move:
                x["coords"], x["cond_coords"] = x["coords"] @ rotation.T, x["cond_coords"] @ rotation.T
            x["inv_feats"] = x["inv_feats"].clone()
            x["inv_feats"][..., 0] = t
            outputs.append(model64(**x))
        decisions.append(handle.stats()["evaluations_per_molecule"])
        handle.unpatch()
        runs.append(outputs)
    assert decisions[0] == decisions[1] and len(set(decisions[0].values())) > 1  # molecules decided apart
    for plain, moved in zip(*runs):
        torch.testing.assert_close(moved[0], plain[0] @ rotation.T)
        for a, b in zip(plain[1:], moved[1:]):
            torch.testing.assert_close(a, b)


@pytest.mark.parametrize("error, tolerance", [("sample", 16.0), ("relative", 0.6)])
def test_adaptive_policy_is_batch_independent(model64, error, tolerance):
    """A molecule's evaluations and sample do not depend on its batch-mates (fp64: no rounding chaos), with
    either error measure (a random model's outputs swing: the sample measure's tolerance is large here)."""
    request = dict(n_molecules=5, steps=12, seed=3, sizes=[3, 4, 6, 9, 12])
    cache = CacheConfig(interval=5, tolerance=tolerance, error=error)
    together, stats_together = run(model64, cache, batch_size=5, **request)
    apart, stats_apart = run(model64, cache, batch_size=2, **request)
    counts = stats_together["evaluations_per_molecule"]
    assert counts == stats_apart["evaluations_per_molecule"]
    assert len(set(counts.values())) > 1  # molecules did decide differently: sub-batches ran
    if error == "relative":  # the former measure decides as it did before CacheConfig.error existed
        assert counts == {0: 5, 1: 6, 2: 8, 3: 7, 4: 7}
    assert together.stats["nfe"] == sum(counts.values()) < 5 * 12
    for a, b in zip(together.coords, apart.coords):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    assert (
        stats_together["error_estimates"]["count"] > 0 and stats_together["calibration_ratios"]["count"] > 0
    )


@pytest.mark.parametrize("error, tolerance", [("sample", 8.0), ("relative", 0.5)])
def test_nothing_leaks_across_calls(model, error, tolerance):
    """One patch reused over many requests of varying batch and molecule sizes equals a fresh patch per request."""
    cache = CacheConfig(interval=3, tolerance=tolerance, error=error)
    handle = patch_model(model, kernels="reference", cache=cache)
    reused = [
        sample(model, n, steps=5, seed=s, sizes=sizes, batch_size=b)
        for n, s, sizes, b in [(3, 0, [4, 6, 5], 3), (2, 1, [9, 3], 1), (3, 0, [4, 6, 5], 2), (1, 2, [7], 1)]
    ]
    assert handle.stats()["trajectories"] == 1 + 2 + 2 + 1
    assert handle.stats()["forecasts"] > 0  # the tolerance lets some molecules forecast
    handle.unpatch()
    for result, (n, s, sizes, b) in zip(
        reused, [(3, 0, [4, 6, 5], 3), (2, 1, [9, 3], 1), (3, 0, [4, 6, 5], 2), (1, 2, [7], 1)]
    ):
        fresh, _ = run(model, cache, n_molecules=n, steps=5, seed=s, sizes=sizes, batch_size=b)
        assert_same_samples(result, fresh)


def test_new_trajectory_when_time_goes_back_or_batch_changes(model):
    handle = patch_model(model, cache=CacheConfig(interval=10))
    inputs = random_inputs(TINY, [4, 5])
    for t in (0.1, 0.2, 0.1, 0.3):  # the third call goes back in time
        inputs["inv_feats"][..., 0] = t
        model(**inputs)
    model(**random_inputs(TINY, [4, 6]))  # another batch signature
    stats = handle.stats()
    assert stats["trajectories"] == 3 and stats["evaluations"] == 2 * 3
    handle.reset()
    assert handle.stats()["trajectories"] == 0
    model(**inputs)
    assert handle.stats()["evaluations"] == 2  # reset(): the next call starts over
    handle.unpatch()


def test_nan_in_a_stored_output_is_an_error():
    stub = StubModel(nan_at_step=2)
    patch_model(stub, cache=CacheConfig(interval=2))
    with pytest.raises(FloatingPointError, match="refusing to store"):
        sample(stub, 2, steps=6, seed=0, sizes=[3, 4])


def test_block_cache_and_prefix_skip(model):
    request = dict(n_molecules=3, steps=6, seed=0, sizes=[4, 6, 5], batch_size=3)
    block, stats = run(model, CacheConfig(interval=2, block="dynamics.layers.1"), **request)
    prefix, _ = run(model, CacheConfig(interval=2, block="dynamics.layers.1", skip_prefix=True), **request)
    # Layer 0 only feeds layer 1, whose output is forecast: skipping it changes nothing.
    assert_same_samples(block, prefix)
    assert (
        stats["evaluations"] == 3 * 4 and block.stats["nfe"] == 3 * 6
    )  # the rest of the network always runs


def test_hooks_that_match_nothing_are_refused(model):
    with pytest.raises(ValueError, match="no module at path"):
        patch_model(model, cache=CacheConfig(block="dynamics.layer.1"))
    with pytest.raises(ValueError, match="skip_prefix"):
        patch_model(model, cache=CacheConfig(block="dynamics.final_ff_block", skip_prefix=True))
    assert "forward" not in model.__dict__


@pytest.mark.parametrize("block", [None, "dynamics.layers.1"])
def test_a_deepcopy_of_a_patched_model_runs_its_own_weights(block):
    import copy

    original = perturbed_model(TINY)
    handle = patch_model(original, kernels="reference", cache=CacheConfig(interval=2, block=block))
    twin = copy.deepcopy(original)
    with torch.no_grad():
        for p in twin.parameters():
            p.mul_(1.5)
    scaled = copy.deepcopy(twin)  # what the copy must equal: the scaled weights, patched afresh
    scaled._fastflow_patch.unpatch()
    patch_model(scaled, kernels="reference", cache=CacheConfig(interval=2, block=block))
    before = sample(original, **REQUEST)
    assert_same_samples(sample(twin, **REQUEST), sample(scaled, **REQUEST))
    assert not torch.equal(sample(twin, **REQUEST).coords[0], before.coords[0])
    assert_same_samples(sample(original, **REQUEST), before)  # the original is untouched
    twin_handle = twin._fastflow_patch
    assert twin_handle is not handle and twin_handle.model is twin and twin_handle.stats()["evaluations"] > 0
    twin_handle.unpatch()  # the copy's handle undoes the copy only
    assert "forward" not in twin.__dict__ and "forward" in original.__dict__ and handle.active


def _bad_inputs(config, self_cond):
    """(name, inputs) that the unpatched model refuses; built from valid inputs of two molecules."""

    def valid():
        inputs = random_inputs(config, [4, 5])
        inputs["inv_feats"][..., 0] = 0.5
        return inputs

    nan = valid()
    nan["coords"][0, 1, 2] = float("nan")
    yield "NaN coords", nan
    yield "B = 0", {name: value[:0] for name, value in valid().items()}
    empty = valid()
    yield (
        "N = 0",
        {name: value[:, :0, :0] if value.dim() >= 4 else value[:, :0] for name, value in empty.items()},
    )
    flat = valid()
    flat["inv_feats"] = flat["inv_feats"][:, 0]
    yield "2-D inv_feats", flat
    padding = valid()
    padding["atom_mask"][1] = 0
    yield "all-padding molecule", padding


@pytest.mark.parametrize("which", ["semla", "stub"])
def test_forecast_steps_check_inputs_like_the_model(model, which):
    """A forecast step never runs the model, so the hook checks what the model would: the model's own
    check_inputs where it has one (Semla), its own checks of what it reads otherwise (the stub has none)."""
    net = model if which == "semla" else StubModel()
    handle = patch_model(net, kernels="reference", cache=CacheConfig(interval=10))
    try:
        for t in (0.1, 0.2, 0.3):  # one evaluation, then forecasts
            inputs = random_inputs(TINY, [4, 5])
            inputs["inv_feats"][..., 0] = t
            net(**inputs)
        assert handle.stats()["forecasts"] == 2 * 2
        for _, inputs in _bad_inputs(TINY, False):
            with pytest.raises(ValueError):
                net(**inputs)
    finally:
        handle.unpatch()
