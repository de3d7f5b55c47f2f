"""A training run's EMA weights as a model folder (what ``fastflow train --export`` and ``--export-to`` write, and
what :func:`fastflow.load_pretrained` reads)."""

from __future__ import annotations

import json
import os
from pathlib import Path

from fastflow.models import Semla, SemlaConfig
from fastflow.models.checkpoint import load_weights, save_pretrained
from fastflow.pretrained import pretrained_dir, vocabulary
from fastflow.training.checkpoint import load_checkpoint


def export_pretrained(checkpoint: str | os.PathLike, directory: str | os.PathLike | None = None) -> Path:
    """Write a training checkpoint's EMA weights as a packaged model folder (default: the default model's)."""
    state = load_checkpoint(Path(checkpoint))
    directory = Path(directory) if directory is not None else pretrained_dir()
    save_pretrained(ema_model(state), directory)
    counts = state["size_counts"]
    (directory / "size_counts.json").write_text(
        json.dumps({str(n): int(c) for n, c in enumerate(counts.tolist()) if c}) + "\n"
    )
    (directory / "vocab.json").write_text(json.dumps(vocabulary()) + "\n")
    record = {key: state[key] for key in ("step", "epoch", "train_seconds")}
    (directory / "training.json").write_text(
        json.dumps({**record, "train_config": state["train_config"]}, indent=2) + "\n"
    )
    return directory


def ema_model(state: dict) -> Semla:
    """The EMA generator of a training checkpoint dict (``fastflow.training.load_checkpoint``), in eval mode;
    ``size_counts`` as for :func:`load_pretrained`."""
    model = Semla(SemlaConfig.from_dict(state["model_config"]))
    load_weights(model, state["ema"], source="the training checkpoint's EMA weights")
    model.size_counts = {n: int(c) for n, c in enumerate(state["size_counts"].tolist()) if c}
    model.training_data = state["train_config"].get("data", "qm9")
    return model.eval()
