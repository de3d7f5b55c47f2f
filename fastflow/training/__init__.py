"""Training Semla generators with SemlaFlow's objective, and exporting the EMA weights as a packaged model."""

from fastflow.training.checkpoint import load_checkpoint
from fastflow.training.export import ema_model, export_pretrained
from fastflow.training.objective import Objective, equivariant_ot, flow_loss, interpolate, random_rotations
from fastflow.training.trainer import TrainConfig, Trainer

__all__ = [
    "Objective",
    "TrainConfig",
    "Trainer",
    "ema_model",
    "equivariant_ot",
    "export_pretrained",
    "flow_loss",
    "interpolate",
    "load_checkpoint",
    "random_rotations",
]
