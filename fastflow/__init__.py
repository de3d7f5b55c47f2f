"""fastflow: fast sampling for SE(3)-equivariant flow-matching molecule generators (Semla / SemlaFlow).

Public API:
    Semla, SemlaConfig                 the SemlaFlow generator (upstream-checkpoint compatible) and its presets
    load_semlaflow_checkpoint(path)    an upstream Lightning checkpoint's EMA generator, in eval mode
    load_pretrained()                  the packaged QM9 model (fastflow/assets/qm9-small), in eval mode
    sample(model, n_molecules, ...)    SemlaFlow's sampler: per-molecule random streams, RDKit molecules out
    compute_metrics(graphs, mols)      stability, validity, uniqueness, novelty, MMFF energy / strain
    patch_model(model, kernels, cache) install fused modules and the predictive feature cache (CacheConfig)
"""

from importlib.metadata import version

from fastflow import _extension
from fastflow.cache import CacheConfig
from fastflow.metrics import compute_metrics
from fastflow.models import Semla, SemlaConfig
from fastflow.models.checkpoint import load_pretrained_dir, load_semlaflow_checkpoint, save_pretrained
from fastflow.patch import PatchHandle, patch_model
from fastflow.pretrained import load_pretrained
from fastflow.sampling import SampleResult, sample

__version__ = version("fastflow")  # pyproject.toml's

_extension.load_prebuilt()  # the C++ ops registered at import (TorchScript files that call them then load)

__all__ = [
    "SampleResult",
    "Semla",
    "SemlaConfig",
    "compute_metrics",
    "load_pretrained_dir",
    "load_semlaflow_checkpoint",
    "sample",
    "save_pretrained",
    "__version__",
    "load_pretrained",
    "CacheConfig",
    "PatchHandle",
    "patch_model",
]
