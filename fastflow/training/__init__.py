"""Training Semla generators with SemlaFlow's objective, and exporting the EMA weights as a packaged model."""

from fastflow.training.objective import Objective, equivariant_ot, flow_loss, interpolate, random_rotations
from fastflow.training.trainer import TrainConfig, Trainer, load_checkpoint

__all__ = ["Objective", "TrainConfig", "Trainer", "equivariant_ot", "flow_loss", "interpolate",
           "load_checkpoint", "random_rotations"]
