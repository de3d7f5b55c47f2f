"""Training data: QM9 from the qm9pack wheel, packed molecule tensors, size-bucketed batches."""

from fastflow.data.dataset import QM9_BUCKET_LIMITS, MolDataset, bucket_batches, pack_graphs
from fastflow.data.qm9 import (
    INSTALL_HINT,
    MissingDataPackage,
    default_cache_dir,
    load_qm9,
    midi_split,
    preprocess_qm9,
    qm9_split,
    qm9pack_data_dir,
)

__all__ = [
    "INSTALL_HINT", "QM9_BUCKET_LIMITS", "MissingDataPackage", "MolDataset", "bucket_batches",
    "default_cache_dir", "load_qm9", "midi_split", "pack_graphs", "preprocess_qm9", "qm9_split",
    "qm9pack_data_dir",
]
