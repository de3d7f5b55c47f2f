"""The packaged default model (fastflow/assets/qm9-small): integrity, config and seeded determinism."""

import json

import pytest
import torch

import fastflow
from fastflow.chem.vocab import ATOM_VOCAB
from fastflow.models import SemlaConfig
from fastflow.pretrained import has_pretrained, load_pretrained, pretrained_dir

pytestmark = pytest.mark.skipif(
    not has_pretrained(),
    reason="no packaged model exported yet (fastflow train --out RUN --export fastflow/assets/qm9-small)",
)


def test_packaged_model_loads_in_eval_mode_with_its_config():
    model = fastflow.load_pretrained()
    assert not model.training
    assert model.config == SemlaConfig.preset("small")
    assert sum(p.numel() for p in model.parameters()) == sum(
        p.numel() for p in fastflow.Semla(SemlaConfig.preset("small")).parameters()
    )
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert min(model.size_counts) >= 1 and max(model.size_counts) < model.config.max_atoms
    vocab = json.loads((pretrained_dir() / "vocab.json").read_text())
    assert vocab["atoms"] == list(ATOM_VOCAB)


def test_packaged_model_is_small_enough_to_ship():
    assert (pretrained_dir() / "model.safetensors").stat().st_size <= 25 * 2**20


def test_seeded_sampling_is_deterministic():
    model = load_pretrained()
    runs = [fastflow.sample(model, 4, steps=5, seed=3, size_distribution=model.size_counts) for _ in range(2)]
    for a, b in zip(runs[0].graphs, runs[1].graphs):
        assert a.atom_types.equal(b.atom_types) and a.bond_types.equal(b.bond_types)
        assert torch.allclose(a.coords, b.coords)


def test_unknown_packaged_model_is_refused():
    with pytest.raises(FileNotFoundError, match="no packaged model"):
        load_pretrained("no-such-model")
