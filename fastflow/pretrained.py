"""The packaged default model: ``fastflow/assets/<name>/`` holds a Semla trained by ``fastflow train``.

Folder contents: ``model.safetensors`` (EMA weights) + ``config.json`` (written by ``save_pretrained``),
``size_counts.json`` (atom-count histogram of the training split, what the sampler draws sizes from),
``vocab.json`` (atom, bond and charge vocabularies the weights were trained with) and ``training.json``
(steps, epochs, CPU-hours and the objective, for the record).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from fastflow.chem.vocab import ATOM_VOCAB, BOND_ORDERS, CHARGES
from fastflow.models import Semla
from fastflow.models.checkpoint import CheckpointError, load_pretrained_dir

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
