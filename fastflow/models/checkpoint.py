"""Loading weights: upstream SemlaFlow Lightning checkpoints (safely) and fastflow's own safetensors files."""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

import torch

from fastflow.models.config import SemlaConfig
from fastflow.models.semla import Semla

EMA_PREFIX = "ema_gen.module."
GEN_PREFIX = "gen."
COMPILED_PREFIX = "_orig_mod."  # torch.compile wraps the generator: gen._orig_mod.<name>


class CheckpointError(ValueError):
    """A checkpoint file that cannot be loaded as a Semla generator (the message says why)."""


def load_semlaflow_checkpoint(
    path: str | os.PathLike, map_location: str | torch.device = "cpu", use_ema: bool = True
) -> Semla:
    """Load the generator of an upstream SemlaFlow Lightning ``.ckpt`` as a :class:`Semla` in eval mode.

    The file is read with ``torch.load(weights_only=True)``: tensors and plain containers only, no code runs.
    The config comes from the stored ``hyper_parameters``; the EMA generator weights (``ema_gen.module.*``) are
    used, as upstream samples with them (``use_ema=False`` takes the raw ``gen.*`` weights).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        checkpoint = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as error:  # a file that does not load is the file's problem, whatever the reader raised
        raise CheckpointError(
            f"{path} is not a loadable PyTorch checkpoint (read with weights_only=True, "
            f"which refuses pickled code): {type(error).__name__}: {_first_line(error)}"
        ) from None
    if (
        not isinstance(checkpoint, dict)
        or "state_dict" not in checkpoint
        or "hyper_parameters" not in checkpoint
    ):
        keys = sorted(checkpoint)[:8] if isinstance(checkpoint, dict) else type(checkpoint).__name__
        raise CheckpointError(
            f"{path} is not a Lightning checkpoint with 'state_dict' and 'hyper_parameters' (found {keys})"
        )
    try:
        config = SemlaConfig.from_hparams(checkpoint["hyper_parameters"])
    except (TypeError, ValueError, KeyError) as error:
        raise CheckpointError(
            f"{path}: cannot build a Semla config from its hyper_parameters: {error}"
        ) from None

    state_dict = checkpoint["state_dict"]
    prefix = EMA_PREFIX if use_ema else GEN_PREFIX
    weights = _strip_prefix(state_dict, prefix)
    if not weights and use_ema:
        weights = _strip_prefix(state_dict, GEN_PREFIX)
        if not weights:
            raise CheckpointError(
                f"{path} holds neither '{EMA_PREFIX}*' nor '{GEN_PREFIX}*' generator weights"
            )
        warnings.warn(
            f"{path} has no EMA generator weights ('{EMA_PREFIX}*'); loading the raw '{GEN_PREFIX}*' "
            "weights instead",
            stacklevel=2,
        )
    if not weights:
        raise CheckpointError(f"{path} holds no '{prefix}*' generator weights")
    model = Semla(config)
    load_weights(model, weights, source=str(path))
    return model.to(map_location).eval()


def load_weights(model: Semla, weights: dict[str, torch.Tensor], source: str = "weights") -> None:
    """``load_state_dict`` with one error naming every missing, unexpected and mis-shaped parameter."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(weights))
    unexpected = sorted(set(weights) - set(expected))
    mis_shaped = [
        f"{k}: expected {list(expected[k].shape)}, found {list(weights[k].shape)}"
        for k in sorted(set(expected) & set(weights))
        if expected[k].shape != weights[k].shape
    ]
    problems = []
    for label, items in (("missing", missing), ("unexpected", unexpected), ("wrong shape", mis_shaped)):
        if items:
            problems.append(f"{len(items)} {label}: {', '.join(items[:6])}{' …' if len(items) > 6 else ''}")
    if problems:
        raise CheckpointError(f"{source} does not match the Semla config: " + "; ".join(problems))
    with torch.no_grad():
        model.load_state_dict(weights)


def save_pretrained(model: Semla, directory: str | os.PathLike) -> Path:
    """Write ``model.safetensors`` and ``config.json`` into ``directory`` (atomically: temp files, then rename)."""
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    weights = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    tmp_weights, tmp_config = directory / "model.safetensors.tmp", directory / "config.json.tmp"
    save_file(weights, tmp_weights)
    tmp_config.write_text(json.dumps(model.config.to_dict(), indent=2) + "\n")
    os.replace(tmp_weights, directory / "model.safetensors")
    os.replace(tmp_config, directory / "config.json")
    return directory


def load_pretrained_dir(directory: str | os.PathLike, map_location: str | torch.device = "cpu") -> Semla:
    """Load a model written by :func:`save_pretrained`, in eval mode; with a ``size_counts.json`` beside it
    (written by ``fastflow train --export``), ``model.size_counts`` holds that size histogram, and with a
    ``training.json``, ``model.training_data`` names its training set ("qm9", "moses3d")."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    directory = Path(directory)
    config_path, weights_path = directory / "config.json", directory / "model.safetensors"
    for required in (config_path, weights_path):
        if not required.is_file():
            raise FileNotFoundError(
                f"{required} not found (a fastflow model directory holds config.json and model.safetensors)"
            )
    try:
        config = SemlaConfig.from_dict(json.loads(config_path.read_text()))
    except (json.JSONDecodeError, TypeError, ValueError) as error:
        raise CheckpointError(f"{config_path} is not a valid Semla config: {error}") from None
    try:
        weights = load_file(weights_path, device=str(map_location))
    except (SafetensorError, OSError) as error:
        raise CheckpointError(f"{weights_path} is not a readable safetensors file: {error}") from None
    model = Semla(config)
    load_weights(model, weights, source=str(weights_path))
    counts_path = directory / "size_counts.json"
    if counts_path.is_file():  # the training split's atom-count histogram, what the sampler draws sizes from
        model.size_counts = {int(n): count for n, count in json.loads(counts_path.read_text()).items()}
    training_path = directory / "training.json"
    if training_path.is_file():  # the data set it was trained on: what `fastflow eval` compares it with
        model.training_data = json.loads(training_path.read_text()).get("train_config", {}).get("data", "qm9")
    return model.to(map_location).eval()


def _first_line(error: Exception) -> str:
    """The reader's own first line: torch.load's weights_only errors run to a page of advice."""
    return next((line.strip() for line in str(error).splitlines() if line.strip()), type(error).__name__)


def _strip_prefix(state_dict: dict, prefix: str) -> dict[str, torch.Tensor]:
    stripped = {}
    for key, value in state_dict.items():
        if key.startswith(prefix) and torch.is_tensor(value):
            name = key[len(prefix) :]
            stripped[name[len(COMPILED_PREFIX) :] if name.startswith(COMPILED_PREFIX) else name] = value
    return stripped
