"""Reading a training checkpoint (written by :meth:`fastflow.training.Trainer.save`)."""

from __future__ import annotations

from pathlib import Path

import torch

from fastflow.models.checkpoint import CheckpointError


def load_checkpoint(path: Path) -> dict:
    """A training checkpoint written by :meth:`Trainer.save`, read with ``weights_only=True``."""
    if not path.is_file():
        raise FileNotFoundError(f"no training checkpoint at {path} (start without --resume)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises many types for truncated / foreign files
        raise CheckpointError(f"{path} is not a readable fastflow training checkpoint: {error}") from None
    required = {"model", "ema", "optimizer", "generator", "step", "train_config", "model_config"}
    if not isinstance(state, dict) or not required <= set(state):
        raise CheckpointError(
            f"{path} is not a fastflow training checkpoint (it lacks "
            f"{sorted(required - set(state)) if isinstance(state, dict) else required})"
        )
    return state
