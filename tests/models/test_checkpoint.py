"""Loading upstream SemlaFlow Lightning checkpoints and fastflow's own safetensors model directories."""

import pytest
import torch

from fastflow.models import Semla, SemlaConfig
from fastflow.models.checkpoint import (
    CheckpointError,
    load_pretrained_dir,
    load_semlaflow_checkpoint,
    save_pretrained,
)

from .conftest import perturbed_model, random_inputs

TINY = SemlaConfig.preset("tiny")


def upstream_hparams(config: SemlaConfig) -> dict:
    """hyper_parameters as upstream's MolecularCFM saves them (gen.hparams + dynamics + integrator + extras)."""
    return {
        "lr": 3e-4,
        "coord_scale": 1.723299503326416,
        "type_loss_weight": 0.2,
        "bond_loss_weight": 0.5,
        "type_strategy": "ce",
        "bond_strategy": "ce",
        "self_condition": True,
        "use_ema": True,
        "d_model": config.d_model,
        "vocab_size": 18,
        "n_atom_feats": 19,
        "d_edge": config.d_edge,
        "n_edge_types": 5,
        "self_cond": True,
        "size_emb": config.size_emb,
        "max_atoms": config.max_atoms,
        "d_message": config.d_message,
        "n_coord_sets": config.n_coord_sets,
        "n_layers": config.n_layers,
        "n_attn_heads": config.n_attn_heads,
        "d_message_hidden": config.d_message_hidden,
        "bond_refine": True,
        "coord_norm": "length",
        "eps": 1e-6,
        "integration-steps": 100,
        "integration-type-strategy": "uniform-sample",
        "architecture": "semla",
        "dataset": "qm9",
    }


def write_lightning_checkpoint(path, ema: Semla, raw: Semla, hparams=None):
    state = {f"gen.{k}": v for k, v in raw.state_dict().items()}
    state.update({f"ema_gen.module.{k}": v for k, v in ema.state_dict().items()})
    state["ema_gen.n_averaged"] = torch.tensor(1000)
    torch.save(
        {
            "epoch": 3,
            "global_step": 1000,
            "pytorch-lightning_version": "2.2.1",
            "state_dict": state,
            "hyper_parameters": hparams or upstream_hparams(TINY),
            "optimizer_states": [],
        },
        path,
    )


def test_loads_ema_weights_and_config(tmp_path):
    ema, raw = perturbed_model(TINY, seed=1), perturbed_model(TINY, seed=2)
    path = tmp_path / "last.ckpt"
    write_lightning_checkpoint(path, ema, raw)
    model = load_semlaflow_checkpoint(path)
    assert not model.training
    assert model.config.d_model == TINY.d_model and model.config.self_cond
    assert model.config.coord_std == pytest.approx(1.723299503326416)
    inputs = random_inputs(TINY, [5, 3])
    with torch.no_grad():
        for got, expected in zip(model(**inputs), ema(**inputs)):
            torch.testing.assert_close(got, expected, rtol=0, atol=0)
    raw_model = load_semlaflow_checkpoint(path, use_ema=False)
    torch.testing.assert_close(
        raw_model.state_dict()["feat_proj.0.weight"], raw.state_dict()["feat_proj.0.weight"]
    )


def test_compiled_generator_prefix_is_understood(tmp_path):
    ema = perturbed_model(TINY, seed=3)
    state = {f"ema_gen.module._orig_mod.{k}": v for k, v in ema.state_dict().items()}
    path = tmp_path / "compiled.ckpt"
    torch.save({"state_dict": state, "hyper_parameters": upstream_hparams(TINY)}, path)
    model = load_semlaflow_checkpoint(path)
    torch.testing.assert_close(model.state_dict()["size_emb.weight"], ema.state_dict()["size_emb.weight"])


def test_missing_and_misshaped_weights_are_named(tmp_path):
    ema = perturbed_model(TINY)
    state = {f"ema_gen.module.{k}": v for k, v in ema.state_dict().items()}
    del state["ema_gen.module.size_emb.weight"]
    state["ema_gen.module.feat_proj.0.weight"] = torch.zeros(3, 3)
    path = tmp_path / "broken.ckpt"
    torch.save({"state_dict": state, "hyper_parameters": upstream_hparams(TINY)}, path)
    with pytest.raises(CheckpointError, match=r"1 missing: size_emb.weight.*wrong shape: feat_proj.0.weight"):
        load_semlaflow_checkpoint(path)


def test_corrupt_and_foreign_files_are_refused(tmp_path):
    corrupt = tmp_path / "corrupt.ckpt"
    corrupt.write_bytes(b"\x80\x04not really a checkpoint")
    with pytest.raises(CheckpointError, match="not a loadable PyTorch checkpoint"):
        load_semlaflow_checkpoint(corrupt)

    pickled_module = tmp_path / "module.ckpt"  # needs code execution to unpickle: refused by weights_only
    torch.save(torch.nn.Linear(2, 2), pickled_module)
    with pytest.raises(CheckpointError, match="weights_only=True"):
        load_semlaflow_checkpoint(pickled_module)

    foreign = tmp_path / "foreign.ckpt"
    torch.save({"model": {"w": torch.zeros(2)}}, foreign)
    with pytest.raises(CheckpointError, match="not a Lightning checkpoint"):
        load_semlaflow_checkpoint(foreign)

    other_arch = tmp_path / "eqgat.ckpt"
    torch.save({"state_dict": {}, "hyper_parameters": {"architecture": "eqgat"}}, other_arch)
    with pytest.raises(CheckpointError, match="architecture is 'eqgat'"):
        load_semlaflow_checkpoint(other_arch)

    with pytest.raises(FileNotFoundError):
        load_semlaflow_checkpoint(tmp_path / "absent.ckpt")


def test_missing_ema_warns_and_uses_raw_weights(tmp_path):
    raw = perturbed_model(TINY, seed=4)
    path = tmp_path / "noema.ckpt"
    torch.save(
        {
            "state_dict": {f"gen.{k}": v for k, v in raw.state_dict().items()},
            "hyper_parameters": upstream_hparams(TINY),
        },
        path,
    )
    with pytest.warns(UserWarning, match="no EMA generator weights"):
        model = load_semlaflow_checkpoint(path)
    torch.testing.assert_close(model.state_dict()["size_emb.weight"], raw.state_dict()["size_emb.weight"])


def test_save_and_load_pretrained_round_trip(tmp_path):
    model = perturbed_model(SemlaConfig.preset("tiny", self_cond=False))
    save_pretrained(model, tmp_path / "m")
    loaded = load_pretrained_dir(tmp_path / "m")
    assert loaded.config == model.config
    inputs = random_inputs(model.config, [4, 6])
    with torch.no_grad():
        for got, expected in zip(loaded(**inputs), model(**inputs)):
            torch.testing.assert_close(got, expected, rtol=0, atol=0)
    assert not hasattr(loaded, "size_counts")
    (tmp_path / "m" / "size_counts.json").write_text('{"3": 5, "4": 2}')
    assert load_pretrained_dir(tmp_path / "m").size_counts == {3: 5, 4: 2}
    (tmp_path / "m" / "model.safetensors").write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        load_pretrained_dir(tmp_path / "m")
