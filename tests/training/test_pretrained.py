"""The packaged models (fastflow/assets/<name>: qm9-small, the default, and moses3d-small): integrity, config and
seeded determinism."""

import dataclasses
import json

import pytest
import torch

import fastflow
from fastflow.chem.vocab import ATOM_VOCAB
from fastflow.models import SemlaConfig
from fastflow.pretrained import ASSETS, DEFAULT_MODEL, has_pretrained, load_pretrained, pretrained_dir

PACKAGED = sorted(path.parent.name for path in ASSETS.glob("*/model.safetensors"))
packaged = pytest.mark.parametrize("name", PACKAGED)


def test_the_default_model_is_packaged():
    assert has_pretrained(), "fastflow train --out RUN --export fastflow/assets/qm9-small"
    assert DEFAULT_MODEL in PACKAGED and "moses3d-small" in PACKAGED


@packaged
def test_packaged_model_loads_in_eval_mode_with_its_config(name):
    model = fastflow.load_pretrained(name)
    assert not model.training
    # the preset's architecture; coord_std is the training set's (QM9: the preset's own, MOSES-3D: GEOM scale)
    preset = SemlaConfig.preset("small")
    assert model.config == dataclasses.replace(preset, coord_std=model.config.coord_std)
    assert (model.config.coord_std == preset.coord_std) == (name == DEFAULT_MODEL)
    assert sum(p.numel() for p in model.parameters()) == sum(
        p.numel() for p in fastflow.Semla(preset).parameters()
    )
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert min(model.size_counts) >= 1 and max(model.size_counts) < model.config.max_atoms
    vocab = json.loads((pretrained_dir(name) / "vocab.json").read_text())
    assert vocab["atoms"] == list(ATOM_VOCAB)


@packaged
def test_packaged_model_is_small_enough_to_ship(name):
    assert (pretrained_dir(name) / "model.safetensors").stat().st_size <= 25 * 2**20


@packaged
def test_seeded_sampling_is_deterministic(name):
    model = load_pretrained(name)
    runs = [fastflow.sample(model, 4, steps=5, seed=3, size_distribution=model.size_counts) for _ in range(2)]
    for a, b in zip(runs[0].graphs, runs[1].graphs):
        assert a.atom_types.equal(b.atom_types) and a.bond_types.equal(b.bond_types)
        assert torch.allclose(a.coords, b.coords)


def test_unknown_packaged_model_is_refused():
    with pytest.raises(FileNotFoundError, match="no packaged model"):
        load_pretrained("no-such-model")
