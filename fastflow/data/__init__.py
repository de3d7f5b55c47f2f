"""Training data: QM9 from the qm9pack wheel, MOSES3D (MOSES SMILES + RDKit conformers), packed molecule tensors,
size-bucketed batches."""

from fastflow.data.dataset import DRUG_BUCKET_LIMITS, QM9_BUCKET_LIMITS, MolDataset, bucket_batches, pack_graphs
from fastflow.data.moses3d import INSTALL_HINT as MOSES_INSTALL_HINT
from fastflow.data.moses3d import (
    load_moses3d,
    moses3d_split,
    moses_data_dir,
    preprocess_moses3d,
    smiles_to_graph,
)
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
    "DRUG_BUCKET_LIMITS", "INSTALL_HINT", "QM9_BUCKET_LIMITS", "MOSES_INSTALL_HINT", "MissingDataPackage", "MolDataset", "bucket_batches",
    "default_cache_dir", "load_qm9", "midi_split", "pack_graphs", "preprocess_qm9", "qm9_split",
    "qm9pack_data_dir", "load_moses3d", "moses3d_split", "moses_data_dir", "preprocess_moses3d", "smiles_to_graph",
]
