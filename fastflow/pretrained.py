"""The packaged default model: ``fastflow/assets/<name>/`` holds a Semla trained by ``fastflow train``.

Folder contents: ``model.safetensors`` (EMA weights) + ``config.json`` (written by ``save_pretrained``),
``size_counts.json`` (atom-count histogram of the training split, what the sampler draws sizes from),
``vocab.json`` (atom, bond and charge vocabularies the weights were trained with) and ``training.json``
(steps, epochs, CPU-hours and the objective, for the record).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from fastflow.chem.vocab import ATOM_VOCAB, BOND_ORDERS, CHARGES
from fastflow.models import Semla, SemlaConfig
from fastflow.models.checkpoint import CheckpointError, load_pretrained_dir, load_weights, save_pretrained

ASSETS = Path(__file__).parent / "assets"
DEFAULT_MODEL = "qm9-small"


def vocabulary() -> dict:
    return {"atoms": list(ATOM_VOCAB), "bond_orders": list(BOND_ORDERS), "charges": list(CHARGES)}


def pretrained_dir(name: str = DEFAULT_MODEL) -> Path:
    return ASSETS / name


def has_pretrained(name: str = DEFAULT_MODEL) -> bool:
    return (pretrained_dir(name) / "model.safetensors").is_file()


def load_pretrained(name: str = DEFAULT_MODEL, map_location: str | torch.device = "cpu") -> Semla:
    """The packaged model ``name`` in eval mode; ``model.size_counts`` is its training-set size histogram
    (pass it to ``sample(..., size_distribution=model.size_counts)``)."""
    directory = pretrained_dir(name)
    if not has_pretrained(name):
        known = sorted(p.name for p in ASSETS.glob("*/model.safetensors")) if ASSETS.is_dir() else []
        raise FileNotFoundError(f"no packaged model {name!r} in {ASSETS} (available: {known or 'none'})")
    saved_vocab = json.loads((directory / "vocab.json").read_text())
    if saved_vocab != vocabulary():
        raise CheckpointError(f"{directory} was trained with another vocabulary than this fastflow's")
    return load_pretrained_dir(directory, map_location)


def export_pretrained(checkpoint: str | os.PathLike, directory: str | os.PathLike | None = None) -> Path:
    """Write a training checkpoint's EMA weights as a packaged model folder (default: the default model's)."""
    from fastflow.training.trainer import load_checkpoint

    state = load_checkpoint(Path(checkpoint))
    directory = Path(directory) if directory is not None else pretrained_dir()
    save_pretrained(ema_model(state), directory)
    counts = state["size_counts"]
    (directory / "size_counts.json").write_text(
        json.dumps({str(n): int(c) for n, c in enumerate(counts.tolist()) if c}) + "\n")
    (directory / "vocab.json").write_text(json.dumps(vocabulary()) + "\n")
    record = {key: state[key] for key in ("step", "epoch", "train_seconds")}
    (directory / "training.json").write_text(json.dumps({**record, "train_config": state["train_config"]},
                                                        indent=2) + "\n")
    return directory


def ema_model(state: dict) -> Semla:
    """The EMA generator of a training checkpoint dict (``fastflow.training.load_checkpoint``), in eval mode;
    ``size_counts`` as for :func:`load_pretrained`."""
    model = Semla(SemlaConfig.from_dict(state["model_config"]))
    load_weights(model, state["ema"], source="the training checkpoint's EMA weights")
    model.size_counts = {n: int(c) for n, c in enumerate(state["size_counts"].tolist()) if c}
    model.training_data = state["train_config"].get("data", "qm9")
    return model.eval()
