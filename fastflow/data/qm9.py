"""QM9 from the ``qm9pack`` wheel: XYZ geometries → bonded molecules → a cached, split tensor dataset.

Pipeline (one pass, cached on disk as ``<cache_dir>/qm9-v1.pt``):

1. read ``qm9pack/data/qm9_part{1,2,3}.csv`` straight from the installed package (130,831 DFT geometries);
2. per molecule: RDKit molecule from the XYZ block, ``rdDetermineBonds.DetermineBonds(charge=0)``, sanitise;
   hydrogens are explicit atoms; the ≈5% that fail are dropped and counted;
3. MiDi-style split of the **successful** molecules (in qm9pack's order): permutation with
   ``numpy.random.RandomState(42)`` (what MiDi's ``DataFrame.sample(frac=1, random_state=42)`` draws), then the
   first 100,000 are train, the last ⌊0.1·n⌋ test and the rest validation.

Coordinates are stored in Å; :class:`~fastflow.data.dataset.MolDataset` scales them by the QM9 std.
"""

from __future__ import annotations

import csv
import importlib.util
import json
import os
import re
from multiprocessing import Pool
from pathlib import Path

import numpy as np
import torch

from fastflow.chem import MolGraph
from fastflow.data.dataset import MolDataset, pack_graphs

CACHE_VERSION = "qm9-v1"
QM9PACK_VERSION = "1.0.3"
QM9_CSV_FILES = ("qm9_part1.csv", "qm9_part2.csv", "qm9_part3.csv")
MIDI_SEED, MIDI_N_TRAIN, MIDI_TEST_FRACTION = 42, 100_000, 0.1
_BARE_POINT = re.compile(r"\.(?![0-9])")
INSTALL_HINT = f"pip install fastflow[train]  (or: pip install qm9pack=={QM9PACK_VERSION})"


class MissingDataPackage(ImportError):
    """The optional data package is not installed (the message says how to install it)."""


def default_cache_dir() -> Path:
    return Path(os.environ.get("FASTFLOW_CACHE", Path.home() / ".cache" / "fastflow"))


def qm9pack_data_dir() -> Path:
    """The installed ``qm9pack/data`` folder, located without importing the package (its API needs pandas)."""
    spec = importlib.util.find_spec("qm9pack")
    if spec is None or not spec.submodule_search_locations:
        raise MissingDataPackage(
            f"QM9 needs the qm9pack data package, which is not installed: {INSTALL_HINT}"
        )
    data_dir = Path(next(iter(spec.submodule_search_locations))) / "data"
    missing = [name for name in QM9_CSV_FILES if not (data_dir / name).is_file()]
    if missing:
        raise MissingDataPackage(
            f"qm9pack at {data_dir.parent} lacks {missing}: reinstall it ({INSTALL_HINT})"
        )
    return data_dir


def read_qm9_csv(paths: list[Path]) -> list[tuple[int, list[str], list[list[float]]]]:
    """(QM9 index, element symbols, coordinates in Å) per row of qm9pack's CSV files."""
    csv.field_size_limit(1 << 24)
    records = []
    for path in paths:
        with open(path, newline="") as handle:
            for row in csv.DictReader(handle):
                elements = json.loads(row["Elements"].replace("'", '"'))
                coords = json.loads(_BARE_POINT.sub(".0", row["XYZ_Ang"]))  # "1." is not JSON
                records.append((int(row["Index"]), elements, coords))
    return records


def xyz_to_graph(record: tuple[int, list[str], list[list[float]]]):
    """(MolGraph, canonical SMILES) of one XYZ record, or None when bond perception or sanitisation fails."""
    arrays = _xyz_to_arrays(record)
    return None if arrays is None else (MolGraph(*map(torch.from_numpy, arrays[0])), arrays[1])


def _xyz_to_arrays(record):
    """:func:`xyz_to_graph` with numpy arrays: what worker processes send back (torch tensors would travel as
    shared-memory file descriptors, which a pool of this size runs out of)."""
    from rdkit import Chem, rdBase
    from rdkit.Chem import rdDetermineBonds

    from fastflow.chem import mol_to_graph
    from fastflow.metrics import molecule_key

    _, elements, coords = record
    block = f"{len(elements)}\n\n" + "\n".join(
        f"{e} {x:.10f} {y:.10f} {z:.10f}" for e, (x, y, z) in zip(elements, coords)
    )
    with rdBase.BlockLogs():
        try:
            mol = Chem.MolFromXYZBlock(block)
            rdDetermineBonds.DetermineBonds(mol, charge=0)
            Chem.SanitizeMol(mol)
            graph = mol_to_graph(mol)
        except Exception:  # RDKit raises several types (ValueError, RuntimeError, its own) for these cases
            return None
    arrays = (graph.coords, graph.atom_types, graph.bond_types, graph.charges)
    return tuple(a.numpy() for a in arrays), molecule_key(mol)


def midi_split(
    n: int, n_train: int = MIDI_N_TRAIN, test_fraction: float = MIDI_TEST_FRACTION, seed: int = MIDI_SEED
) -> dict[str, np.ndarray]:
    """Indices of the MiDi split of ``n`` molecules: shuffled with ``seed``; train first, test last."""
    n_test = int(test_fraction * n)
    if n_train + n_test > n:
        raise ValueError(f"cannot take {n_train} train and {n_test} test molecules out of {n}")
    order = np.random.RandomState(seed).permutation(n)
    return {
        "train": np.sort(order[:n_train]),
        "val": np.sort(order[n_train : n - n_test]),
        "test": np.sort(order[n - n_test :]),
    }


def preprocess_qm9(
    csv_paths: list[Path] | None = None, workers: int = 2, n_train: int = MIDI_N_TRAIN, progress: bool = False
) -> dict:
    """Convert qm9pack's CSVs into the cached dataset dict (see :func:`load_qm9`)."""
    from tqdm.auto import tqdm

    csv_paths = csv_paths or [qm9pack_data_dir() / name for name in QM9_CSV_FILES]
    records = read_qm9_csv(csv_paths)
    bar = {"total": len(records), "desc": "QM9 bonds", "disable": not progress}
    if workers > 1:
        with Pool(workers) as pool:
            results = list(tqdm(pool.imap(_xyz_to_arrays, records, chunksize=256), **bar))
    else:
        results = list(tqdm(map(_xyz_to_arrays, records), **bar))
    kept = [(record[0], result) for record, result in zip(records, results) if result is not None]
    graphs = [MolGraph(*map(torch.from_numpy, arrays)) for _, (arrays, _) in kept]
    split = midi_split(len(graphs), n_train=n_train)
    train_sizes = torch.tensor([graphs[i].n_atoms for i in split["train"]])
    return {
        "version": CACHE_VERSION,
        "tensors": pack_graphs(graphs),
        "qm9_index": torch.tensor([index for index, _ in kept]),
        "smiles": [smiles for _, (_, smiles) in kept],
        "split": {name: torch.from_numpy(indices) for name, indices in split.items()},
        "size_counts": torch.bincount(train_sizes),
        "n_read": len(records),
        "n_failed": len(records) - len(kept),
    }


def load_qm9(cache_dir: str | os.PathLike | None = None, progress: bool = True) -> dict:
    """The preprocessed QM9 dict, built and cached on first use.

    Keys: ``tensors`` (packed molecules, Å), ``qm9_index``, ``smiles`` (canonical keys as used for novelty),
    ``split`` {train, val, test → molecule indices}, ``size_counts`` (atom-count histogram of train),
    ``n_read``, ``n_failed``.
    """
    path = Path(cache_dir or default_cache_dir()) / f"{CACHE_VERSION}.pt"
    if path.is_file():
        return torch.load(path, weights_only=True)
    data = preprocess_qm9(progress=progress)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save(data, tmp)
    os.replace(tmp, path)
    return data


def qm9_split(data: dict, split: str) -> MolDataset:
    """One split ("train", "val" or "test") of :func:`load_qm9`'s dict as a :class:`MolDataset`."""
    return MolDataset(data["tensors"], data["split"][split])
