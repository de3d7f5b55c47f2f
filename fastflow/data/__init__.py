"""Training data: QM9 from the qm9pack wheel, MOSES3D (MOSES SMILES + RDKit conformers), packed molecule tensors,
size-bucketed batches."""

from fastflow.data.dataset import (
    DRUG_BUCKET_LIMITS,
    QM9_BUCKET_LIMITS,
    MolDataset,
    bucket_batches,
    pack_graphs,
)
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
from fastflow.data.registry import DATASETS, DatasetSpec, dataset_spec

__all__ = [
    "DATASETS",
    "DRUG_BUCKET_LIMITS",
    "DatasetSpec",
    "INSTALL_HINT",
    "MOSES_INSTALL_HINT",
    "MissingDataPackage",
    "MolDataset",
    "QM9_BUCKET_LIMITS",
    "bucket_batches",
    "dataset_spec",
    "default_cache_dir",
    "load_moses3d",
    "load_qm9",
    "midi_split",
    "moses3d_split",
    "moses_data_dir",
    "pack_graphs",
    "preprocess_moses3d",
    "preprocess_qm9",
    "qm9_split",
    "qm9pack_data_dir",
    "smiles_to_graph",
]
