"""The Semla architecture (SemlaFlow-checkpoint compatible), its configs and checkpoint loading."""

from fastflow.models.config import PRESETS, SemlaConfig
from fastflow.models.semla import Semla

__all__ = ["PRESETS", "Semla", "SemlaConfig"]
