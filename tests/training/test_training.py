"""Training on the bundled QM9 fixture with the tiny preset: objective, loss going down, exact resume, export."""

import json

import pytest
import torch

from fastflow.cli import main
from fastflow.data import MolDataset, qm9_split
from fastflow.data.dataset import pack_graphs
from fastflow.models import SemlaConfig
from fastflow.models.checkpoint import CheckpointError, load_pretrained_dir
from fastflow.training import Objective, TrainConfig, Trainer, equivariant_ot, interpolate, random_rotations
from fastflow.training.export import export_pretrained
from fastflow.training.trainer import CHECKPOINT, LOG
from tests.chem.helpers import graph_from_smiles
from tests.data.helpers import fixture_data, write_fixture_cache

FAST = {
    "preset": "tiny",
    "batch_cost": 160,
    "warmup_steps": 5,
    "lr": 1e-3,
    "val_minutes": 0,
    "log_every": 5,
    "val_molecules": 8,
    "val_steps": 5,
}


def train_set():
    return qm9_split(fixture_data(), "train")


def test_rotations_are_proper():
    R = random_rotations(16, torch.Generator().manual_seed(0))
    assert torch.allclose(R @ R.transpose(1, 2), torch.eye(3).expand(16, 3, 3), atol=1e-5)
    assert torch.allclose(torch.linalg.det(R), torch.ones(16), atol=1e-5)


def test_equivariant_ot_permutes_and_rotates_the_prior():
    g = torch.Generator().manual_seed(0)
    mask = torch.tensor([[True] * 6, [True] * 4 + [False] * 2])
    prior, data = torch.randn(2, 6, 3, generator=g), torch.randn(2, 6, 3, generator=g)
    prior, data = prior * mask[..., None], data * mask[..., None]
    matched = equivariant_ot(prior, data, mask)
    for b, n in enumerate((6, 4)):
        # a permutation and a rotation keep the multiset of distances to the origin
        assert torch.allclose(
            matched[b, :n].norm(dim=-1).sort().values, prior[b, :n].norm(dim=-1).sort().values, atol=1e-5
        )
        assert (matched[b, :n] - data[b, :n]).square().sum() <= (prior[b, :n] - data[b, :n]).square().sum()
    assert (matched[1, 4:] == 0).all()


def test_interpolant_shapes_masks_and_time():
    batch = train_set().batch(list(range(6)))
    noisy = interpolate(batch, torch.Generator().manual_seed(0), Objective(equivariant_ot=True))
    B, N = batch["mask"].shape
    mask = batch["mask"]
    assert noisy["coords"].shape == (B, N, 3) and noisy["bonds"].shape == (B, N, N, 5)
    assert ((noisy["t"] >= 0) & (noisy["t"] <= 1)).all()
    assert torch.allclose(noisy["coords"].sum(1), torch.zeros(B, 3), atol=1e-4)  # zero CoM
    assert (noisy["coords"][~mask] == 0).all() and (noisy["atomics"][~mask] == 0).all()
    assert (noisy["atomics"].sum(-1) == mask).all()
    # the rotated target keeps every molecule's internal distances
    n = int(mask[0].sum())
    assert torch.allclose(
        torch.cdist(noisy["target_coords"][0, :n], noisy["target_coords"][0, :n]),
        torch.cdist(batch["coords"][0, :n], batch["coords"][0, :n]),
        atol=1e-5,
    )


def test_short_training_lowers_the_loss(tmp_path):
    trainer = Trainer(TrainConfig(**FAST), train_set(), tmp_path)
    trainer.run(max_steps=30, progress=False)
    losses = [json.loads(line)["loss"] for line in (tmp_path / LOG).read_text().splitlines()]
    assert len(losses) == 6 and trainer.step == 30
    assert sum(losses[-3:]) / 3 < 0.5 * sum(losses[:2]) / 2
    record = trainer.validate()  # EMA samples: metrics present, whatever their values
    assert record["kind"] == "val" and 0 <= record["validity"] <= 1


def test_resume_continues_identically(tmp_path):
    straight = Trainer(TrainConfig(**FAST), train_set(), tmp_path / "a")
    straight.run(max_steps=6, progress=False)
    first = Trainer(TrainConfig(**FAST), train_set(), tmp_path / "b")
    first.run(max_steps=4, progress=False)
    resumed = Trainer.resume(train_set(), tmp_path / "b")
    assert resumed.step == 4 and resumed.config == first.config
    resumed.run(max_steps=6, progress=False)
    for a, b in zip(straight.model.state_dict().values(), resumed.model.state_dict().values()):
        assert torch.equal(a, b)
    for a, b in zip(straight.ema.state_dict().values(), resumed.ema.state_dict().values()):
        assert torch.equal(a, b)


def test_cosine_decay_of_the_learning_rate_survives_resume(tmp_path):
    trainer = Trainer(TrainConfig(**{**FAST, "warmup_steps": 0}), train_set(), tmp_path)
    assert trainer.learning_rate(50) == pytest.approx(1e-3)
    trainer.set_decay(start=2, steps=4)
    rates = [trainer.learning_rate(step) for step in range(8)]
    assert rates[:3] == pytest.approx([1e-3] * 3)
    assert rates[4] == pytest.approx(1e-3 * (0.1 + 0.9 * 0.5))  # half-way down the cosine
    assert rates[6:] == pytest.approx([1e-4, 1e-4])  # held at 10%
    assert all(a >= b for a, b in zip(rates, rates[1:]))
    trainer.run(max_steps=3, progress=False)
    assert Trainer.resume(train_set(), tmp_path).config.decay_start == 2
    with pytest.raises(ValueError, match="lr decay"):
        trainer.set_decay(start=3, steps=0)
    with pytest.raises(ValueError, match="lr decay peak"):
        trainer.set_decay(start=3, steps=2, peak_lr=float("nan"))


def test_a_warm_restart_anneals_from_a_lower_peak():
    trainer = Trainer(TrainConfig(**{**FAST, "warmup_steps": 0}), train_set(), "unused")
    trainer.set_decay(start=4, steps=2, peak_lr=2e-4)
    rates = [trainer.learning_rate(step) for step in range(8)]
    assert rates[:4] == pytest.approx([1e-3] * 4)  # before the restart: the run's own lr
    assert rates[4:] == pytest.approx([2e-4, 2e-4 * (0.1 + 0.9 * 0.5), 2e-5, 2e-5])


def test_a_changed_loss_weight_is_used_and_saved(tmp_path):
    trainer = Trainer(TrainConfig(**FAST), train_set(), tmp_path)
    batch = trainer.dataset.batch(trainer.epoch_batches(0)[0])
    assert trainer.train_step(batch)["bonds"] > 0
    trainer.set_objective(bond_weight=0.0)
    assert trainer.config.objective.bond_weight == 0.0 and trainer.config.objective.type_weight == 0.2
    assert trainer.train_step(batch)["bonds"] == 0.0
    trainer.run(max_steps=3, progress=False)
    assert Trainer.resume(train_set(), tmp_path).config.objective.bond_weight == 0.0
    with pytest.raises(ValueError, match="bond_weight must be a finite number"):
        trainer.set_objective(bond_weight=float("nan"))
    with pytest.raises(ValueError, match="type_weight must be a finite number"):
        trainer.set_objective(type_weight=-1.0)


def test_kekule_training_rewrites_the_data_and_is_kept_on_resume(tmp_path):
    def aromatic_set():
        return MolDataset(pack_graphs([graph_from_smiles(s) for s in ("c1ccccc1", "c1ccncc1", "c1cc[nH]c1")]))

    trainer = Trainer(TrainConfig(**{**FAST, "batch_cost": 40}), aromatic_set(), tmp_path)
    trainer.run(max_steps=2, progress=False)
    assert (trainer.dataset.tensors["bonds"][:, 2] == 4).any()
    trainer.set_kekulize()
    assert trainer.config.kekulize and not (trainer.dataset.tensors["bonds"][:, 2] == 4).any()
    trainer.run(max_steps=3, progress=False)
    resumed = Trainer.resume(aromatic_set(), tmp_path)
    assert resumed.config.kekulize and resumed.step == 3
    assert torch.equal(resumed.dataset.tensors["bonds"], trainer.dataset.tensors["bonds"])


def test_bad_checkpoints_are_refused(tmp_path):
    with pytest.raises(FileNotFoundError, match="no training checkpoint"):
        Trainer.resume(train_set(), tmp_path)
    (tmp_path / CHECKPOINT).write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="not a readable fastflow training checkpoint"):
        Trainer.resume(train_set(), tmp_path)
    torch.save({"step": 3}, tmp_path / CHECKPOINT)
    with pytest.raises(CheckpointError, match="lacks"):
        Trainer.resume(train_set(), tmp_path)


def test_export_writes_a_loadable_model_folder(tmp_path):
    trainer = Trainer(TrainConfig(**FAST), train_set(), tmp_path / "run")
    trainer.run(max_steps=3, progress=False)
    folder = export_pretrained(tmp_path / "run" / CHECKPOINT, tmp_path / "model")
    assert {p.name for p in folder.iterdir()} == {
        "model.safetensors",
        "config.json",
        "size_counts.json",
        "vocab.json",
        "training.json",
    }
    model = load_pretrained_dir(folder)
    assert model.config == SemlaConfig.preset("tiny") and not model.training
    for a, b in zip(model.state_dict().values(), trainer.ema.state_dict().values()):
        assert torch.equal(a, b)


def test_cli_train_resume_export_and_eval(tmp_path, capsys):
    cache, run = write_fixture_cache(tmp_path), tmp_path / "run"
    common = ["--cache-dir", str(cache), "--out", str(run), "--no-progress"]
    assert (
        main(
            [
                "train",
                "--config",
                "tiny",
                "--steps",
                "3",
                "--val-minutes",
                "0",
                "--batch-cost",
                "200",
                *common,
            ]
        )
        == 0
    )
    assert main(["train", "--steps", "3", *common]) == 2  # a checkpoint exists: refuses to overwrite it
    assert "--resume" in capsys.readouterr().err
    assert main(["train", "--resume", "--steps", "4", "--lr-decay-peak", "1e-4", *common]) == 2
    assert "--lr-decay-peak needs --lr-decay" in capsys.readouterr().err
    assert (
        main(
            [
                "train",
                "--resume",
                "--steps",
                "5",
                "--export-to",
                str(tmp_path / "latest"),
                "--lr-decay",
                "3",
                "4",
                "--lr-decay-peak",
                "1e-4",
                "--bond-weight",
                "1.0",
                "--kekulize",
                *common,
            ]
        )
        == 0
    )
    assert json.loads(capsys.readouterr().out.splitlines()[-1])["step"] == 5
    resumed = Trainer.resume(train_set(), run).config  # the warm restart is saved with the run
    assert (resumed.decay_start, resumed.decay_steps, resumed.decay_peak_lr) == (3, 4, 1e-4)
    assert resumed.objective.bond_weight == 1.0  # qm9's default was 0.5
    assert resumed.kekulize
    assert json.loads((tmp_path / "latest" / "training.json").read_text())["step"] == 5
    assert main(["train", "--export", str(tmp_path / "model"), "--out", str(run)]) == 0
    assert (
        main(
            [
                "eval",
                "--n",
                "4",
                "--steps",
                "2",
                "--no-energy",
                "--json",
                "--cache-dir",
                str(cache),
                "--checkpoint",
                str(run / CHECKPOINT),
            ]
        )
        == 0
    )
    summary = json.loads(capsys.readouterr().out)
    assert summary["n"] == 4 and summary["nfe"] == 8 and "novelty" in summary
    assert (
        summary["data_validity"] == 1.0
        and summary["data_mol_stability"] == 1.0
        and summary["data_novelty"] == 1.0
    )
