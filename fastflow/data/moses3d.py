"""MOSES3D: drug-size molecules from the MOSES SMILES sets with RDKit 3D conformers, cached and split.

A GEOM-Drugs-like training set that can be built offline: MOSES's SMILES (ZINC drug-like molecules, C N O S F
Cl Br, ≈40 atoms with hydrogens) ship inside the ``molsets`` wheel. Install it **without its dependencies**
(they pull pomegranate, which does not build on Python 3.11, fcd_torch and an unpinned torch)::

    pip install --no-deps molsets==0.3.1

The package is located with ``importlib.util.find_spec`` and never imported (``import moses`` needs those
dependencies); only ``moses/dataset/data/{train,test}.csv.gz`` are read.

Pipeline (cached as ``<cache_dir>/moses3d-v1.pt``):

1. MOSES's own split: its train file gives our validation and train molecules, its test file our test molecules.
   Each file is shuffled with ``numpy.random.RandomState(0)``; molecules are converted in that order until
   ``n_val`` + ``n_train`` (train file; the first ``n_val`` successes are validation, the next ``n_train``
   train) and ``n_test`` (test file) have succeeded. Growing ``n_train`` keeps the validation set.
2. Per SMILES (in worker processes): ``MolFromSmiles``; molecules with an element outside ``ATOM_VOCAB`` or a
   formal charge outside ``CHARGES`` are dropped; ``AddHs``; ETKDGv3 embedding seeded with the molecule's row
   in its MOSES file (so the result is independent of worker count and chunking); MMFF94 optimisation
   (``MMFFOptimizeMolecule``, ``maxIters`` :data:`MMFF_MAX_ITERS`); :func:`fastflow.chem.mol_to_graph` on the
   sanitised molecule (aromatic bonds stay class 4, as SemlaFlow's GEOM-Drugs pipeline and fastflow's QM9).
   Failures are dropped and counted per reason (:data:`FAILURE_REASONS`).
3. Resumable: the shuffled rows are converted in chunks of :data:`CHUNK_SIZE`; each finished chunk is written
   atomically to ``<cache_dir>/moses3d-v1.parts/<train|test>-<chunk>.pt`` and a rerun skips it. When all are
   done the dataset file is assembled and the parts folder is removed.

Coordinates are stored in Å; :func:`moses3d_split` scales them by :data:`~fastflow.chem.vocab.GEOM_COORD_STD`.
"""

from __future__ import annotations

import csv
import gzip
import importlib.util
import os
import shutil
import time
from collections import Counter
from contextlib import nullcontext
from multiprocessing import Pool
from pathlib import Path

import numpy as np
import torch

from fastflow.chem import MolGraph
from fastflow.chem.vocab import GEOM_COORD_STD
from fastflow.data.dataset import MolDataset, pack_graphs
from fastflow.data.qm9 import MissingDataPackage, default_cache_dir

CACHE_VERSION = "moses3d-v1"
MOSES_VERSION = "0.3.1"
MOSES_FILES = {"train": "train.csv.gz", "test": "test.csv.gz"}  # MOSES file → the splits it feeds
INSTALL_HINT = (
    f"pip install --no-deps molsets=={MOSES_VERSION}  (--no-deps: its own requirements do not install)"
)
DEFAULT_SIZES = {"train": 24_000, "val": 500, "test": 1_000}
SHUFFLE_SEED = 0
CHUNK_SIZE = 500
MMFF_MAX_ITERS = 1000
FAILURE_REASONS = (
    "invalid_smiles",
    "unsupported_element",
    "unsupported_charge",
    "embedding_failed",
    "mmff_setup_failed",
    "conversion_failed",
)


def moses_data_dir() -> Path:
    """The installed ``moses/dataset/data`` folder, located without importing ``moses``."""
    spec = importlib.util.find_spec("moses")
    if spec is None or not spec.submodule_search_locations:
        raise MissingDataPackage(
            f"MOSES3D needs the MOSES SMILES from the molsets wheel, which is not installed: {INSTALL_HINT}"
        )
    data_dir = Path(next(iter(spec.submodule_search_locations))) / "dataset" / "data"
    missing = [name for name in MOSES_FILES.values() if not (data_dir / name).is_file()]
    if missing:
        raise MissingDataPackage(
            f"the moses package at {data_dir.parents[1]} lacks {missing}: reinstall it ({INSTALL_HINT})"
        )
    return data_dir


def read_moses_smiles(path: str | os.PathLike) -> list[str]:
    """The SMILES column of one of MOSES's gzipped CSV files (header ``SMILES``), in file order."""
    with gzip.open(path, "rt", newline="") as handle:
        reader = csv.reader(handle)
        header = next(reader)
        if not header or header[0] != "SMILES":
            raise ValueError(f"{path}: expected a 'SMILES' column first, found {header}")
        return [row[0] for row in reader if row]


def smiles_to_graph(smiles: str, seed: int = 0):
    """(MolGraph in Å with explicit hydrogens, canonical key) of one SMILES embedded with ETKDGv3 (``seed``) and
    MMFF94-optimised; or the failure reason (one of :data:`FAILURE_REASONS`) as a string."""
    status, arrays, key, _ = _smiles_to_arrays((seed, smiles))
    return status if arrays is None else (MolGraph(*map(torch.from_numpy, arrays)), key)


def _smiles_to_arrays(item: tuple[int, str]):
    """(status, arrays or None, canonical key or None, MMFF converged) of one ``(seed, smiles)``; numpy arrays,
    as in qm9.py's ``_xyz_to_arrays`` (torch tensors would travel between processes as shared-memory file
    descriptors)."""
    from rdkit import Chem, rdBase
    from rdkit.Chem import AllChem

    from fastflow.chem import mol_to_graph
    from fastflow.chem.vocab import ATOM_INDEX, CHARGE_INDEX
    from fastflow.metrics import molecule_key

    seed, smiles = item
    with rdBase.BlockLogs():
        mol = Chem.MolFromSmiles(smiles)
        if mol is None or mol.GetNumAtoms() == 0:
            return "invalid_smiles", None, None, False
        if any(ATOM_INDEX.get(atom.GetSymbol(), 0) < 2 for atom in mol.GetAtoms()):  # 0/1: <PAD>/<MASK>
            return "unsupported_element", None, None, False
        if any(atom.GetFormalCharge() not in CHARGE_INDEX for atom in mol.GetAtoms()):
            return "unsupported_charge", None, None, False
        mol = Chem.AddHs(mol)
        params = AllChem.ETKDGv3()
        params.randomSeed = int(seed)
        params.numThreads = 1
        if AllChem.EmbedMolecule(mol, params) != 0:
            return "embedding_failed", None, None, False
        if not AllChem.MMFFHasAllMoleculeParams(mol):
            return "mmff_setup_failed", None, None, False
        result = AllChem.MMFFOptimizeMolecule(mol, maxIters=MMFF_MAX_ITERS)
        if result == -1:
            return "mmff_setup_failed", None, None, False
        try:
            graph = mol_to_graph(mol)
        except ValueError:
            return "conversion_failed", None, None, False
        key = molecule_key(mol)
    arrays = (graph.coords, graph.atom_types, graph.bond_types, graph.charges)
    return "ok", tuple(a.numpy() for a in arrays), key, result == 0


# -- chunks ---------------------------------------------------------------------------------------------------
def _convert_chunk(rows: np.ndarray, smiles: list[str], pool) -> dict:
    """One chunk's part dict: per row its status, and the successful molecules packed."""
    tic = time.monotonic()
    items = [(int(row), smiles[row]) for row in rows]
    if pool is None:
        results = list(map(_smiles_to_arrays, items))
    else:
        results = pool.map(_smiles_to_arrays, items, chunksize=max(1, len(items) // 32))
    graphs = [
        MolGraph(*(torch.from_numpy(a) for a in arrays)) for status, arrays, _, _ in results if status == "ok"
    ]
    return {
        "version": CACHE_VERSION,
        "rows": torch.from_numpy(np.asarray(rows, dtype=np.int64)),
        "status": [status for status, _, _, _ in results],
        "keys": [key for status, _, key, _ in results if status == "ok"],
        "converged": [converged for status, _, _, converged in results if status == "ok"],
        "tensors": pack_graphs(graphs) if graphs else None,
        "seconds": time.monotonic() - tic,
    }


def _load_part(path: Path, rows: np.ndarray) -> dict | None:
    """A finished part for exactly these rows, or None (missing, unreadable or from another chunking)."""
    if not path.is_file():
        return None
    try:
        part = torch.load(path, weights_only=True)
    except Exception:  # a foreign or damaged file is recomputed
        return None
    if part.get("version") != CACHE_VERSION or not torch.equal(part["rows"], torch.from_numpy(rows)):
        return None
    return part


def _save_atomic(obj, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _convert_file(
    name: str, smiles: list[str], n_needed: int, parts_dir: Path, chunk_size: int, pool, bar
) -> dict:
    """Convert the shuffled rows of one MOSES file until ``n_needed`` succeed (resuming from finished parts).

    Returns the first ``n_needed`` successes in shuffled order (graphs in Å, keys, rows), and the rows read and
    failures counted up to the last of them (the same whatever the chunking or worker count)."""
    order = np.random.RandomState(SHUFFLE_SEED).permutation(len(smiles))
    chunk_size = max(1, min(chunk_size, n_needed))  # a small request converts little more than it needs
    graphs, keys, rows, failures = [], [], [], Counter()
    n_read = unconverged = 0
    seconds = 0.0
    for chunk, start in enumerate(range(0, len(order), chunk_size)):
        if len(graphs) >= n_needed:
            break
        chunk_rows = order[start : start + chunk_size]
        path = parts_dir / f"{name}-{chunk}.pt"
        part = _load_part(path, chunk_rows)
        if part is None:
            part = _convert_chunk(chunk_rows, smiles, pool)
            _save_atomic(part, path)
        seconds += part["seconds"]
        packed = MolDataset(part["tensors"]) if part["tensors"] is not None else None
        ok = 0
        for row, status in zip(part["rows"].tolist(), part["status"]):
            if len(graphs) == n_needed:
                break
            n_read += 1
            if status != "ok":
                failures[status] += 1
                continue
            graphs.append(packed.graph(ok))
            keys.append(part["keys"][ok])
            unconverged += not part["converged"][ok]
            rows.append(row)
            ok += 1
        bar.update(ok)
    if len(graphs) < n_needed:
        raise ValueError(
            f"MOSES {MOSES_FILES[name]}: only {len(graphs)} of its {len(smiles)} molecules converted, "
            f"fewer than the {n_needed} asked for"
        )
    return {
        "graphs": graphs,
        "keys": keys,
        "rows": rows,
        "n_read": n_read,
        "failures": failures,
        "unconverged": unconverged,
        "seconds": seconds,
    }


# -- the dataset ----------------------------------------------------------------------------------------------
def _sizes(n_train: int | None, n_val: int | None, n_test: int | None) -> dict[str, int]:
    sizes = {"train": n_train, "val": n_val, "test": n_test}
    sizes = {k: DEFAULT_SIZES[k] if v is None else int(v) for k, v in sizes.items()}
    if sizes["train"] < 1 or sizes["val"] < 0 or sizes["test"] < 0:
        raise ValueError(f"MOSES3D split sizes must be train >= 1, val >= 0, test >= 0; got {sizes}")
    return sizes


def preprocess_moses3d(
    cache_dir: str | os.PathLike | None = None,
    n_train: int | None = None,
    n_val: int | None = None,
    n_test: int | None = None,
    workers: int = 2,
    chunk_size: int = CHUNK_SIZE,
    progress: bool = False,
    data_dir: str | os.PathLike | None = None,
) -> dict:
    """Build the MOSES3D dict (see :func:`load_moses3d`) from MOSES's files (default: the installed molsets
    package), resuming from / writing chunk parts under ``<cache_dir>/moses3d-v1.parts`` (left in place)."""
    from tqdm.auto import tqdm

    sizes = _sizes(n_train, n_val, n_test)
    data_dir = Path(data_dir) if data_dir is not None else moses_data_dir()
    parts_dir = Path(cache_dir or default_cache_dir()) / f"{CACHE_VERSION}.parts"
    parts_dir.mkdir(parents=True, exist_ok=True)
    needed = {"train": sizes["val"] + sizes["train"], "test": sizes["test"]}
    # the pool is terminated on leaving (also on Ctrl-C): every finished chunk is already on disk
    with (
        Pool(workers) if workers > 1 else nullcontext() as pool,
        tqdm(
            total=sum(needed.values()),
            desc="MOSES3D conformers",
            unit="mol",
            disable=not progress,
            mininterval=2.0,
        ) as bar,
    ):
        converted = {
            name: _convert_file(
                name, read_moses_smiles(data_dir / file), needed[name], parts_dir, chunk_size, pool, bar
            )
            for name, file in MOSES_FILES.items()
        }
    source, test = converted["train"], converted["test"]
    n_val = sizes["val"]
    # layout: train, val (both from MOSES train), test (MOSES test)
    order = list(range(n_val, len(source["graphs"]))) + list(range(n_val))
    graphs = [source["graphs"][i] for i in order] + test["graphs"]
    n_train_, n_test_ = sizes["train"], sizes["test"]
    split = {
        "train": torch.arange(n_train_),
        "val": torch.arange(n_train_, n_train_ + n_val),
        "test": torch.arange(n_train_ + n_val, n_train_ + n_val + n_test_),
    }
    failures = source["failures"] + test["failures"]
    train_sizes = torch.tensor([graphs[i].n_atoms for i in split["train"].tolist()])
    data = {
        "version": CACHE_VERSION,
        "tensors": pack_graphs(graphs),
        "smiles": [source["keys"][i] for i in order] + test["keys"],
        "moses_index": torch.tensor(
            [source["rows"][i] for i in order] + test["rows"]
        ),  # row in its MOSES file
        "split": split,
        "sizes": sizes,
        "size_counts": torch.bincount(train_sizes),
        "n_read": source["n_read"] + test["n_read"],
        "n_failed": sum(failures.values()),
        "failures": {reason: failures[reason] for reason in FAILURE_REASONS if failures[reason]},
        "mmff_unconverged": source["unconverged"] + test["unconverged"],
        "seconds": round(source["seconds"] + test["seconds"], 3),
    }
    return data


def moses3d_cache_path(cache_dir: str | os.PathLike | None = None) -> Path:
    return Path(cache_dir or default_cache_dir()) / f"{CACHE_VERSION}.pt"


def load_moses3d(
    cache_dir: str | os.PathLike | None = None,
    n_train: int | None = None,
    n_val: int | None = None,
    n_test: int | None = None,
    workers: int = 2,
    progress: bool = True,
    keep_parts: bool = False,
    **kwargs,
) -> dict:
    """The MOSES3D dict, built (resumably) and cached on first use.

    Sizes left at None take the cached dataset's (or, when building, :data:`DEFAULT_SIZES`: 24,000 train,
    500 val, 1,000 test); a cache built with other sizes than those given raises ``ValueError``.

    Keys: ``tensors`` (packed molecules, Å), ``smiles`` (canonical keys as used for novelty), ``moses_index``
    (row in its MOSES file), ``split`` {train, val, test → molecule indices}, ``sizes``, ``size_counts``
    (atom-count histogram of train), ``n_read``, ``n_failed``, ``failures`` {reason → count},
    ``mmff_unconverged`` (kept molecules whose MMFF run hit ``maxIters``), ``seconds`` (wall time of the
    conversion, summed over chunks and resumed runs). ``kwargs`` go to :func:`preprocess_moses3d` (``chunk_size``,
    ``data_dir``); the chunk parts are removed once the dataset file is written, unless ``keep_parts``.
    """
    path = moses3d_cache_path(cache_dir)
    asked = {"train": n_train, "val": n_val, "test": n_test}
    if path.is_file():
        data = torch.load(path, weights_only=True)
        if data.get("version") != CACHE_VERSION:
            raise ValueError(
                f"{path} is not a {CACHE_VERSION} cache (found {data.get('version')!r}): delete it"
            )
        mismatch = {k: v for k, v in asked.items() if v is not None and v != data["sizes"][k]}
        if mismatch:
            built = ", ".join(f"n_{k}={v}" for k, v in data["sizes"].items())
            wanted = ", ".join(f"n_{k}={v}" for k, v in mismatch.items())
            raise ValueError(
                f"the MOSES3D cache {path} was built with {built}, but {wanted} was asked for: "
                "delete that file (finished conformers are not kept) or use another cache folder"
            )
        return data
    data = preprocess_moses3d(cache_dir, n_train, n_val, n_test, workers=workers, progress=progress, **kwargs)
    path.parent.mkdir(parents=True, exist_ok=True)
    _save_atomic(data, path)
    if not keep_parts:
        shutil.rmtree(path.parent / f"{CACHE_VERSION}.parts", ignore_errors=True)
    return data


def moses3d_split(data: dict, split: str) -> MolDataset:
    """One split ("train", "val" or "test") of :func:`load_moses3d`'s dict as a :class:`MolDataset` (GEOM std)."""
    return MolDataset(data["tensors"], data["split"][split], coord_std=GEOM_COORD_STD)
