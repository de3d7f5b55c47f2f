"""patch_model: instance-only, idempotent, reversible, strict about options; and the CLI's --cache flags."""

import json

import pytest
import torch

from fastflow import CacheConfig, Semla, SemlaConfig, patch_model
from fastflow.cli import main
from tests.models.conftest import perturbed_model, random_inputs

TINY = SemlaConfig.preset("tiny")


pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture
def model():
    return perturbed_model(TINY)


def calls(model, inputs, times=(0.1, 0.2, 0.3, 0.4)):
    outputs = []
    for t in times:
        x = dict(inputs, inv_feats=inputs["inv_feats"].clone())
        x["inv_feats"][..., 0] = t
        outputs.append(model(**x))
    return outputs


def test_unpatch_restores_the_instance_and_its_outputs_exactly(model):
    inputs = random_inputs(TINY, [4, 6])
    before = calls(model, inputs)
    handle = patch_model(model, cache=CacheConfig(interval=2, block=None))
    assert "forward" in model.__dict__ and Semla.forward is type(model).forward  # the class is untouched
    patched = calls(model, inputs)
    assert not torch.equal(patched[1][0], before[1][0])  # a forecast
    handle.unpatch()
    handle.unpatch()  # a second call is a no-op
    assert "forward" not in model.__dict__ and "_fastflow_patch" not in model.__dict__
    for a, b in zip(before, calls(model, inputs)):
        assert all(torch.equal(x, y) for x, y in zip(a, b))


def test_reference_kernels_without_cache_are_bit_identical(model):
    inputs = random_inputs(TINY, [3, 5])
    before = model(**inputs)
    handle = patch_model(model, kernels="reference")
    assert all(torch.equal(x, y) for x, y in zip(before, model(**inputs)))
    report = handle.report()
    assert report["kernels"]["swapped"] == [] and report["kernels"]["backend"] == "reference"
    assert "cache" not in report and handle.stats() == {}


def test_patching_is_idempotent(model):
    cache = CacheConfig(interval=3)
    handle = patch_model(model, cache=cache)
    wrapped = model.forward
    assert patch_model(model, cache=CacheConfig(interval=3)) is handle and model.forward is wrapped
    calls(model, random_inputs(TINY, [4]), times=(0.1, 0.2))
    assert handle.stats()["evaluations"] == 1  # one hook, not two stacked
    with pytest.raises(RuntimeError, match="already patched"):
        patch_model(model, cache=CacheConfig(interval=2))
    handle.unpatch()
    assert patch_model(model, cache=CacheConfig(interval=2)) is not handle


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        (dict(kernels="bogus"), ValueError, "unknown kernels"),
        (dict(kernels="fused"), ValueError, "unknown kernels"),
        (dict(cache={"interval": 2}), TypeError, "CacheConfig"),
        (dict(cache=CacheConfig(block="nowhere")), ValueError, "no module at path"),
    ],
)
def test_unknown_options_are_refused(model, kwargs, error, match):
    with pytest.raises(error, match=match):
        patch_model(model, **kwargs)
    assert "forward" not in model.__dict__
    with pytest.raises(TypeError):
        patch_model(torch.zeros(3))


def test_report_says_what_is_cached(model):
    handle = patch_model(
        model,
        kernels="reference",
        cache=CacheConfig(forecaster="ab", block="dynamics.layers.2", skip_prefix=True),
    )
    cache = handle.report()["cache"]
    assert cache["where"] == "dynamics.layers.2" and cache["order"] == 3
    assert cache["skipped_prefix"] == ["dynamics.layers.0", "dynamics.layers.1"]
    assert cache["cache_forecast_backend"] == "reference"
    handle.unpatch()


def test_cli_sample_with_cache(capsys):
    argv = [
        "sample",
        "--config",
        "tiny",
        "--n",
        "3",
        "--steps",
        "6",
        "--no-energy",
        "--json",
        "--threads",
        "1",
    ]
    assert main(argv + ["--cache", "taylor", "--interval", "2", "--order", "1"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["nfe"] == 3 * 4 and out["cache_hit_rate"] == pytest.approx(2 / 6)  # evaluates steps 0, 2, 4, 5
    assert main(argv + ["--cache", "adaptive", "--tolerance", "0.1"]) == 0
    assert 0 <= json.loads(capsys.readouterr().out)["cache_hit_rate"] < 1
    assert main(argv) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["nfe"] == 3 * 6 and out["cache_hit_rate"] == 0.0
    assert main(argv + ["--cache", "adaptive"]) == 2  # needs --tolerance
