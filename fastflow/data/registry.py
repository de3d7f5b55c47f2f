"""The training sets by name: how each is loaded (built and cached on first use), split and batched."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from fastflow.data.dataset import DRUG_BUCKET_LIMITS, QM9_BUCKET_LIMITS, MolDataset
from fastflow.data.moses3d import load_moses3d, moses3d_split
from fastflow.data.qm9 import load_qm9, qm9_split


@dataclass(frozen=True)
class DatasetSpec:
    name: str
    load: Callable[
        ..., dict
    ]  # load(cache_dir=None, progress=True) -> the cached dict (a MissingDataPackage if not)
    split: Callable[[dict, str], MolDataset]  # split(data, "train" | "val" | "test")
    bucket_limits: tuple[int, ...]  # size buckets of training batches
    bond_loss_weight: float  # upstream's: 0.5 for QM9, 1.0 for GEOM-Drugs (the drug-size setting)


DATASETS = {
    "qm9": DatasetSpec("qm9", load_qm9, qm9_split, QM9_BUCKET_LIMITS, 0.5),
    "moses3d": DatasetSpec("moses3d", load_moses3d, moses3d_split, DRUG_BUCKET_LIMITS, 1.0),
}


def dataset_spec(name: str) -> DatasetSpec:
    if name not in DATASETS:
        raise ValueError(f"unknown data set {name!r}; expected one of {sorted(DATASETS)}")
    return DATASETS[name]
