"""Sharded, resumable, deterministic sampling: ``fastflow sample --out DIR``, alone or under torchrun.

A request (n molecules, steps, schedule, seed, cache settings, model) is cut into fixed-size shards of
contiguous request indices, independent of the number of processes: shard k holds molecules
``[k·S, min((k+1)·S, n))`` for the shard size S. Molecule i's sample depends only on (seed, i, its size)
(keyed random streams, :mod:`fastflow.rng`; ``sample(..., indices=)``), so the molecules are the same
whatever the world size, the batch size or the rank that samples a shard (coordinates up to fp32 rounding).

Directory layout::

    DIR/manifest.json      format, request (the identity compared on reruns: n, steps, schedule, seed,
                           shard_size, cache, energy, model_fingerprint), model description, the shard list,
                           and one entry per sampling run (world size, shards, wall time)
    DIR/shard-00042.sdf    the shard's molecules; each record's fastflow_index is its request index
    DIR/shard-00042.pt     every molecule's graph (RDKit failures included), compact: :func:`load_graphs`
    DIR/shard-00042.json   start/stop, nfe, seconds, kernels backend, cache counters, the shard's own metrics,
                           the SDF's size and sha256, and per-molecule records (atom count, stable atoms,
                           validity, connected validity, canonical SMILES, MMFF numbers) from which ``merge``
                           recomputes the metrics of the whole request exactly (set-level ones included)
    DIR/molecules.sdf      written by merge: every shard's records in request order
    DIR/metrics.json       written by merge: the summary (metrics of all molecules, nfe, seconds, runs)

Files are written under a temporary name and renamed when complete; a shard's JSON is written after its SDF
and is the shard's commit mark. A rerun of the same request samples only the shards without a valid JSON
(killed ranks or jobs lose at most the shards in flight; nothing is duplicated); a directory whose manifest
holds another request is refused, naming the differing keys, unless ``overwrite`` (``--overwrite``) starts
over. One job per directory at a time: rank 0 holds an exclusive lock on ``DIR/.lock`` (:class:`DirectoryLock`)
for the whole job, and a second job (or ``fastflow merge``) into the same directory is refused while it runs.

Coordination (torch.distributed, only to coordinate; molecules never cross it): gloo on CPU, nccl on CUDA.
Rank 0 checks or writes the manifest, removes stale temporary files, lists the shards still missing and
broadcasts that list; rank r samples ``missing[r::world_size]`` (so a resume is balanced too); rank 0 shows
one progress bar over all ranks (it counts finished shard files), and after a final barrier merges.
The shard directory must be on a file system every rank sees (multi-node: a shared file system).

Test hook: ``FASTFLOW_TEST_STOP_AFTER_SHARDS="R:K"`` makes rank R leave a half-written temporary file and exit
at once (``os._exit(3)``, no clean-up) after finishing K shards of this run, reproducibly simulating a
killed rank.
"""

from __future__ import annotations

import dataclasses
import fcntl
import hashlib
import json
import os
import re
import socket
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta
from functools import partial
from importlib.metadata import version
from pathlib import Path

import torch

FORMAT = "fastflow-shards/1"
MANIFEST = "manifest.json"
LOCK = ".lock"
MERGED_SDF = "molecules.sdf"
MERGED_JSON = "metrics.json"
DEFAULT_SHARD_SIZE = 1000
STOP_HOOK = "FASTFLOW_TEST_STOP_AFTER_SHARDS"
# Ranks wait at barriers for the slowest rank's last shard: far longer than torch's 30-minute default.
BARRIER_TIMEOUT = timedelta(hours=24)
IDENTITY_KEYS = ("n", "steps", "schedule", "seed", "shard_size", "cache", "energy", "model_fingerprint")
_OUR_FILES = re.compile(
    r"^\.?shard-\d+\..*$|^\.?manifest\.json.*$|^\.?molecules\.sdf.*$|^\.?metrics\.json.*$"
)
_TMP = re.compile(r"^\.?(shard-\d+|manifest\.json|molecules\.sdf|metrics\.json).*\.tmp$")


class MissingShards(ValueError):
    """``merge`` found shards that are not complete (listed in ``missing``)."""

    def __init__(self, directory: Path, missing: list[Shard], total: int):
        self.missing = missing
        shown = ", ".join(f"{s.name} (molecules {s.start}-{s.stop - 1})" for s in missing[:20])
        more = f", and {len(missing) - 20} more" if len(missing) > 20 else ""
        super().__init__(
            f"{len(missing)} of {total} shards missing in {directory}: {shown}{more}; rerun the "
            f"same `fastflow sample` command to sample them"
        )


class OtherRankFailed(RuntimeError):
    """Raised on ranks other than 0 when rank 0 refused the request (rank 0 raises the ValueError)."""


class DirectoryLock:
    """One job per shard directory: an exclusive ``flock`` on ``DIR/.lock``, held from :meth:`acquire` until
    :meth:`release` (or the process's end, however it ends: the kernel drops the lock, so a killed job leaves
    no stale lock; the file stays, naming the last holder). On NFS, Linux maps flock to POSIX locks, so jobs on
    different nodes exclude each other too."""

    def __init__(self, directory: Path, fd: int):
        self.directory, self._fd = directory, fd

    @classmethod
    def acquire(cls, directory: Path, purpose: str = "sampling", create: bool = True) -> DirectoryLock:
        directory = Path(directory)
        if directory.exists() and not directory.is_dir():
            raise ValueError(f"{directory} exists and is not a directory")
        if not create and not directory.is_dir():
            raise FileNotFoundError(f"shard directory {directory} not found")
        directory.mkdir(parents=True, exist_ok=True)
        fd = os.open(directory / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as error:
            holder = os.pread(fd, 4096, 0).decode(errors="replace").strip() or "holder unknown"
            os.close(fd)
            if isinstance(error, BlockingIOError):
                raise ValueError(
                    f"{directory} is in use by another fastflow job ({holder}); one job per shard "
                    f"directory: wait for it to finish, or choose another directory"
                ) from None
            raise ValueError(f"cannot lock {directory / LOCK}: {error}") from None
        os.ftruncate(fd, 0)
        os.pwrite(
            fd,
            json.dumps(
                {"purpose": purpose, "pid": os.getpid(), "host": socket.gethostname(), "since": _now()}
            ).encode(),
            0,
        )
        return cls(directory, fd)

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # drops the flock
            self._fd = None


# -- shards and the manifest -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Shard:
    """Molecules ``start … stop−1`` of the request."""

    index: int
    start: int
    stop: int

    @property
    def name(self) -> str:
        return f"shard-{self.index:05d}"

    @property
    def sdf(self) -> str:
        return f"{self.name}.sdf"

    @property
    def json(self) -> str:
        return f"{self.name}.json"

    @property
    def pt(self) -> str:
        return f"{self.name}.pt"

    @property
    def n(self) -> int:
        return self.stop - self.start


def plan_shards(n_molecules: int, shard_size: int) -> list[Shard]:
    """Contiguous shards of ``shard_size`` molecules (the last one may be smaller)."""
    for name, value in (("n", n_molecules), ("shard_size", shard_size)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    return [
        Shard(k, start, min(start + shard_size, n_molecules))
        for k, start in enumerate(range(0, n_molecules, shard_size))
    ]


def shard_directory(out: Path | None, shard_size: int | None) -> Path | None:
    """The shard directory ``sample`` writes, or None for the single-process, single-SDF path.

    ``--out`` is a shard directory unless it ends in ``.sdf`` (and is not an existing directory); under torchrun
    (``WORLD_SIZE`` set) it must be one.
    """
    distributed = "WORLD_SIZE" in os.environ
    if out is None:
        if distributed or shard_size is not None:
            raise ValueError("sharded sampling (torchrun, --shard-size) writes a directory: give --out DIR")
        return None
    if out.suffix.lower() == ".sdf" and not out.is_dir():
        if distributed:
            raise ValueError(f"under torchrun --out must be a shard directory, not an .sdf file ({out})")
        if shard_size is not None:
            raise ValueError("--shard-size goes with --out DIR (a path that does not end in .sdf)")
        return None
    return out


def model_fingerprint(model: torch.nn.Module) -> str:
    """sha256 over the state dict (names, dtypes, shapes, bytes) and the model's size histogram, if any.

    Take it before ``patch_model`` (fused modules rename nothing, but hash what was loaded)."""
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        flat = tensor.detach().cpu().contiguous().reshape(-1)
        digest.update(f"{name}:{flat.dtype}:{tuple(tensor.shape)};".encode())
        digest.update(flat.view(torch.uint8).numpy().tobytes())
    counts = getattr(model, "size_counts", None)
    if counts is not None:
        from fastflow.sampling.sampler import size_counts

        digest.update(b"size_counts;" + size_counts(counts).numpy().tobytes())
    return digest.hexdigest()


@dataclass(frozen=True)
class ShardedRequest:
    """What a shard directory holds; ``identity()`` is compared on reruns."""

    n: int
    steps: int
    schedule: str
    seed: int
    shard_size: int
    model_fingerprint: str
    cache: object | None = None  # a fastflow.cache.CacheConfig, or None
    energy: bool = True

    def identity(self) -> dict:
        cache = dataclasses.asdict(self.cache) if self.cache is not None else None
        if cache is not None and cache.get("clock") == "time":  # the default, absent from directories written
            del cache["clock"]  # before the step clock existed: they still resume
        return {
            "n": self.n,
            "steps": self.steps,
            "schedule": self.schedule,
            "seed": self.seed,
            "shard_size": self.shard_size,
            "cache": cache,
            "energy": self.energy,
            "model_fingerprint": self.model_fingerprint,
        }


def build_manifest(request: ShardedRequest, model: str, cache_label: str) -> dict:
    return {
        "format": FORMAT,
        "request": request.identity(),
        "model": model,
        "cache": cache_label,
        "fastflow": version("fastflow"),
        "created": _now(),
        "shards": [dataclasses.asdict(s) for s in plan_shards(request.n, request.shard_size)],
        "runs": [],
    }


def load_manifest(directory: Path) -> dict:
    path = Path(directory) / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(f"{directory} is not a shard directory: no {MANIFEST}")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{path} is not valid JSON ({error}); pass --overwrite to start over") from None
    if manifest.get("format") != FORMAT:
        raise ValueError(f"{path} has format {manifest.get('format')!r}, not {FORMAT!r}")
    return manifest


def manifest_differences(old: dict, new: dict) -> list[str]:
    """``key: old -> new`` for each identity key that differs."""
    if old.get("format") != new.get("format"):
        return [f"format: {old.get('format')!r} -> {new.get('format')!r}"]
    a, b = old.get("request", {}), new["request"]
    return [
        f"{key}: {_short(a.get(key))} -> {_short(b.get(key))}"
        for key in IDENTITY_KEYS
        if a.get(key) != b.get(key)
    ]


def prepare_directory(directory: Path, manifest: dict, overwrite: bool = False) -> list[Shard]:
    """Rank 0 before sampling, holding the directory's lock: refuse another request (unless overwrite), write
    the manifest, remove stale temporary files; returns the shards still to sample."""
    directory = Path(directory)
    ours = sorted(p.name for p in directory.iterdir() if _OUR_FILES.match(p.name))
    if (directory / MANIFEST).exists() and not overwrite:
        old = load_manifest(directory)
        differences = manifest_differences(old, manifest)
        if differences:
            raise ValueError(
                f"{directory} holds another request ({'; '.join(differences)}): rerun with the "
                f"same options to resume it, or pass --overwrite to discard its shards and start "
                f"over"
            )
        manifest = old
    elif ours and not overwrite:
        raise ValueError(
            f"{directory} holds shard files but no {MANIFEST}: pass --overwrite to discard them "
            f"and start over, or choose another --out"
        )
    else:
        for name in ours:
            (directory / name).unlink()
        write_json(directory / MANIFEST, manifest)
    for path in directory.iterdir():
        if _TMP.match(path.name):
            path.unlink(missing_ok=True)
    shards = [Shard(**s) for s in manifest["shards"]]
    return [shard for shard in shards if read_shard_info(directory, shard) is None]


def read_shard_info(directory: Path, shard: Shard, verify: bool = False) -> dict | None:
    """The shard's JSON if the shard is complete (JSON matches the shard; SDF and graphs present with the
    recorded sizes, and with ``verify`` their sha256), else None."""
    try:
        info = json.loads((Path(directory) / shard.json).read_text())
        if (info.get("start"), info.get("stop")) != (shard.start, shard.stop):
            return None
        for kind in ("sdf", "pt"):
            path = Path(directory) / getattr(shard, kind)
            if not path.is_file() or path.stat().st_size != info.get(f"{kind}_bytes"):
                return None
            if verify and _sha256(path) != info.get(f"{kind}_sha256"):
                return None
        return info
    except (OSError, ValueError):
        return None


# -- per-molecule records and metrics ------------------------------------------------------------------------


def molecule_records(graphs: Sequence, mols: Sequence, energy: bool = True) -> dict[str, list]:
    """Per-molecule columns from which :func:`aggregate_metrics` gives ``compute_metrics(graphs, mols,
    energy=energy)`` exactly, for any concatenation of shards."""
    from fastflow.metrics import atom_stabilities, is_valid, mmff_evaluate, molecule_key

    records: dict[str, list] = {"n_atoms": [], "stable_atoms": [], "valid": [], "connected": [], "smiles": []}
    for graph, mol in zip(graphs, mols, strict=True):
        stable = atom_stabilities(graph)
        valid = is_valid(mol)
        records["n_atoms"].append(len(stable))
        records["stable_atoms"].append(sum(stable))
        records["valid"].append(valid)
        records["connected"].append(valid and is_valid(mol, connected=True))
        records["smiles"].append(molecule_key(mol) if valid else None)
    if energy:
        results = [mmff_evaluate(mol) for mol in mols]
        records["mmff_atoms"] = [r.n_atoms for r in results]
        records["energy"] = [r.energy for r in results]
        records["opt_energy"] = [r.opt_energy for r in results]
        records["opt_rmsd"] = [r.opt_rmsd for r in results]
    return records


def aggregate_metrics(records: dict[str, list], energy: bool = True) -> dict[str, float]:
    """:func:`fastflow.metrics.compute_metrics` from per-molecule records (same keys, order and numbers)."""
    from fastflow.metrics.energy import MMFFResult
    from fastflow.metrics.report import summarise_mmff

    n = len(records["n_atoms"])
    if n == 0:
        raise ValueError("no molecules to aggregate")
    keys = [key for key, valid in zip(records["smiles"], records["valid"]) if valid and key is not None]
    metrics = {
        "n": n,
        "atom_stability": sum(records["stable_atoms"]) / sum(records["n_atoms"]),
        "mol_stability": sum(s == a for s, a in zip(records["stable_atoms"], records["n_atoms"])) / n,
        "validity": sum(records["valid"]) / n,
        "connected_validity": sum(records["connected"]) / n,
        "uniqueness": len(set(keys)) / len(keys) if keys else float("nan"),
    }
    if energy:
        metrics.update(
            summarise_mmff(
                [
                    MMFFResult(*row)
                    for row in zip(
                        records["mmff_atoms"], records["energy"], records["opt_energy"], records["opt_rmsd"]
                    )
                ]
            )
        )
    return metrics


# -- coordination ----------------------------------------------------------------------------------------------


class Coordinator:
    """Rank, world size and the few collectives sharded sampling needs (a no-op world of one without
    torchrun). ``from_env`` joins torchrun's process group: gloo on CPU, nccl when ``device`` is CUDA (each
    rank then takes ``cuda:LOCAL_RANK``)."""

    def __init__(
        self,
        rank: int = 0,
        world_size: int = 1,
        device: torch.device | None = None,
        distributed: bool = False,
    ):
        self.rank, self.world_size, self.device, self.distributed = rank, world_size, device, distributed

    @classmethod
    def from_env(cls, device: str | None = None) -> Coordinator:
        device = torch.device(device) if device is not None else None
        if "WORLD_SIZE" not in os.environ:
            return cls(0, 1, device)
        import torch.distributed as dist

        cuda = device is not None and device.type == "cuda"
        if cuda:
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if cuda else "gloo", timeout=BARRIER_TIMEOUT)
        return cls(dist.get_rank(), dist.get_world_size(), device, True)

    def broadcast(self, obj):
        """Rank 0's ``obj`` on every rank."""
        if not self.distributed:
            return obj
        import torch.distributed as dist

        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def barrier(self) -> None:
        if self.distributed:
            import torch.distributed as dist

            if dist.get_backend() == "nccl":
                dist.barrier(device_ids=[self.device.index])
            else:
                dist.barrier()

    def close(self) -> None:
        if self.distributed:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()


# -- sampling ------------------------------------------------------------------------------------------------


def sample_sharded(
    model: torch.nn.Module,
    directory: Path,
    request: ShardedRequest,
    coordinator: Coordinator | None = None,
    *,
    handle=None,
    description: str = "",
    cache_label: str = "none",
    batch_size: int = 128,
    size_distribution=None,
    overwrite: bool = False,
    progress: bool | None = None,
) -> dict | None:
    """Sample this rank's share of the missing shards of ``request`` into ``directory``; rank 0 then merges
    and returns the summary (:func:`merge`), other ranks return None.

    handle: the ``patch_model`` handle (kernels backend and cache counters per shard), or None.
    description, cache_label: the model and cache as the single-process summary names them.
    """
    coordinator = coordinator or Coordinator()
    directory = Path(directory)
    started = time.time()
    status, lock = None, None
    if coordinator.rank == 0:
        try:
            lock = DirectoryLock.acquire(directory)
            manifest = build_manifest(request, description, cache_label)
            status = ("ok", [s.index for s in prepare_directory(directory, manifest, overwrite)])
        except (ValueError, OSError) as error:
            status = ("error", str(error))
    try:
        status = coordinator.broadcast(status)
        if status[0] == "error":
            if coordinator.rank == 0:
                raise ValueError(status[1])
            raise OtherRankFailed(status[1])
        return _sample_missing(
            model,
            directory,
            request,
            coordinator,
            status[1],
            started,
            handle,
            batch_size,
            size_distribution,
            progress,
        )
    finally:
        if lock is not None:
            lock.release()


def _sample_missing(
    model,
    directory,
    request,
    coordinator,
    missing_indices,
    started,
    handle,
    batch_size,
    size_distribution,
    progress,
) -> dict | None:
    """This rank's share of the missing shards, then (rank 0) the run record and the merge."""
    rank, world = coordinator.rank, coordinator.world_size
    shards = plan_shards(request.n, request.shard_size)
    missing = [shards[k] for k in missing_indices]
    mine = missing[rank::world]
    show = rank == 0 and (sys.stderr.isatty() if progress is None else progress)
    bar = _Progress(directory, shards, missing, world, show) if rank == 0 else None
    stop_after = _stop_hook(rank)
    try:
        for count, shard in enumerate(mine):
            _sample_shard(
                model, directory, shard, request, handle, batch_size, size_distribution, rank, world
            )
            if stop_after is not None and count + 1 >= stop_after:
                _die(directory, mine[count + 1] if count + 1 < len(mine) else shard)
        coordinator.barrier()
    finally:
        if bar is not None:
            bar.close()
    if rank != 0:
        return None
    _record_run(
        directory,
        {
            "world_size": world,
            "started": _iso(started),
            "finished": _now(),
            "wall_seconds": time.time() - started,
            "shards_sampled": len(missing),
            "molecules_sampled": sum(s.n for s in missing),
        },
    )
    return merge(directory)


def _sample_shard(
    model, directory, shard, request, handle, batch_size, size_distribution, rank, world
) -> None:
    from fastflow.chem.sdf import INDEX_PROP, write_sdf
    from fastflow.sampling.sampler import sample

    if handle is not None:
        handle.reset()
    started = time.time()
    result = sample(
        model,
        shard.n,
        steps=request.steps,
        schedule=request.schedule,
        seed=request.seed,
        batch_size=batch_size,
        progress=False,
        size_distribution=size_distribution,
        indices=torch.arange(shard.start, shard.stop),
    )
    records = molecule_records(result.graphs, result.molecules, energy=request.energy)
    cache = handle.stats() if handle is not None else {}
    sdf, pt = directory / shard.sdf, directory / shard.pt
    written = write_sdf(
        sdf, result.molecules, props=[{INDEX_PROP: i} for i in range(shard.start, shard.stop)]
    )
    save_graphs(pt, result.graphs)
    info = {
        "shard": shard.index,
        "start": shard.start,
        "stop": shard.stop,
        "n": shard.n,
        "steps": request.steps,
        "nfe": result.stats["nfe"],
        "sampling_seconds": result.stats["sampling_seconds"],
        "wall_seconds": time.time() - started,
        "kernels": handle.report()["kernels"]["backend"] if handle is not None else "reference",
        "cache_evaluations": cache.get("evaluations", 0),
        "cache_forecasts": cache.get("forecasts", 0),
        "cache_hit_rate": cache.get("hit_rate", 0.0),
        "rank": rank,
        "world_size": world,
        "host": socket.gethostname(),
        "threads": torch.get_num_threads(),
        "device": str(next(model.parameters()).device),
        "batch_size": batch_size,
        "finished": _now(),
        "sdf": shard.sdf,
        "written": written,
        "sdf_bytes": sdf.stat().st_size,
        "sdf_sha256": _sha256(sdf),
        "pt": shard.pt,
        "pt_bytes": pt.stat().st_size,
        "pt_sha256": _sha256(pt),
        "metrics": aggregate_metrics(records, request.energy),
        "molecules": records,
    }
    write_json(directory / shard.json, info)


class _Progress:
    """Rank 0's bar over every rank's molecules: polls which shard JSONs exist (no collective, no sync)."""

    def __init__(self, directory, shards, missing, world, show):
        from tqdm.auto import tqdm

        self.directory, self.pending = directory, list(missing)
        done = sum(s.n for s in shards) - sum(s.n for s in missing)
        self.bar = tqdm(
            total=sum(s.n for s in shards),
            initial=done,
            unit="mol",
            disable=not show,
            desc=f"sampling ({world} rank{'s' if world > 1 else ''})",
        )
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True) if show else None
        if self.thread is not None:
            self.thread.start()

    def _poll(self) -> None:
        finished = [s for s in self.pending if (self.directory / s.json).exists()]
        if finished:
            self.pending = [s for s in self.pending if s not in finished]
            self.bar.update(sum(s.n for s in finished))

    def _run(self) -> None:
        while not self.stopped.wait(1.0):
            self._poll()

    def close(self) -> None:
        self.stopped.set()
        if self.thread is not None:
            self.thread.join()
            self._poll()
        self.bar.close()


def _stop_hook(rank: int) -> int | None:
    value = os.environ.get(STOP_HOOK)
    if not value:
        return None
    which, count = value.split(":")
    return int(count) if int(which) == rank else None


def _die(directory: Path, shard: Shard) -> None:
    (directory / f"{shard.sdf}.{os.getpid()}.tmp").write_text("half-written\n")
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(3)


def _record_run(directory: Path, run: dict) -> None:
    manifest = load_manifest(directory)
    manifest.setdefault("runs", []).append(run)
    write_json(directory / MANIFEST, manifest)


# -- graphs ----------------------------------------------------------------------------------------------------


def save_graphs(path: Path, graphs: Sequence) -> None:
    """MolGraphs as flat tensors (float32 coordinates, uint8 classes, n×n bond matrices), atomically."""
    path = Path(path)
    sizes = torch.tensor([g.n_atoms for g in graphs], dtype=torch.int32)
    data = {
        "sizes": sizes,
        "coords": torch.cat([g.coords.detach().cpu().float() for g in graphs]),
        "atom_types": torch.cat([g.atom_types.cpu() for g in graphs]).to(torch.uint8),
        "charges": torch.cat([g.charges.cpu() for g in graphs]).to(torch.uint8),
        "bonds": torch.cat([g.bond_types.cpu().reshape(-1) for g in graphs]).to(torch.uint8),
    }
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    try:
        torch.save(data, tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def read_graphs(path: Path) -> list:
    """The MolGraphs :func:`save_graphs` wrote."""
    from fastflow.chem import MolGraph

    data = torch.load(path, weights_only=True)
    sizes = data["sizes"].tolist()
    coords = data["coords"].split(sizes)
    atom_types = data["atom_types"].long().split(sizes)
    charges = data["charges"].long().split(sizes)
    bonds = data["bonds"].long().split([n * n for n in sizes])
    return [
        MolGraph(c, a, b.reshape(n, n), q)
        for n, c, a, b, q in zip(sizes, coords, atom_types, bonds, charges, strict=True)
    ]


def load_graphs(directory: Path) -> list:
    """Every molecule's graph of a complete shard directory, in request order (raises MissingShards)."""
    directory = Path(directory)
    shards = [Shard(**s) for s in load_manifest(directory)["shards"]]
    missing = [shard for shard in shards if read_shard_info(directory, shard) is None]
    if missing:
        raise MissingShards(directory, missing, len(shards))
    return [graph for shard in shards for graph in read_graphs(directory / shard.pt)]


# -- merge -----------------------------------------------------------------------------------------------------

_PROPERTY_HEADER = re.compile(rb"^(>  <[^\n]*>  \()(\d+)(\) ?)$", re.MULTILINE)


def _renumber(match: re.Match, offset: int) -> bytes:
    return match.group(1) + str(int(match.group(2)) + offset).encode() + match.group(3)


def merge(directory: Path, out: Path | None = None) -> dict:
    """Combine the shards of ``directory`` into one SDF (default ``DIR/molecules.sdf``) and the summary of the
    whole request (written to ``DIR/metrics.json`` and returned): metrics recomputed over all molecules —
    the numbers of a single-process run — plus nfe, cache hit rate and summed sampling seconds.

    Raises :class:`MissingShards` (nothing written) if a shard is missing or its SDF does not match its JSON.
    """
    directory = Path(directory)
    manifest = load_manifest(directory)
    request = manifest["request"]
    shards = [Shard(**s) for s in manifest["shards"]]
    infos = [read_shard_info(directory, shard, verify=True) for shard in shards]
    missing = [shard for shard, info in zip(shards, infos) if info is None]
    if missing:
        raise MissingShards(directory, missing, len(shards))

    out = Path(out) if out is not None else directory / MERGED_SDF
    if out.is_dir():
        raise ValueError(f"merge output {out} is a directory; give the path of an SDF file")
    records: dict[str, list] = {}
    written = 0
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as merged:
            for shard, info in zip(shards, infos):
                # SDWriter numbers property headers per file, "(k)": renumber them to the merged file's count.
                text = (directory / shard.sdf).read_bytes()
                merged.write(_PROPERTY_HEADER.sub(partial(_renumber, offset=written), text))
                written += info["written"]
                for key, column in info["molecules"].items():
                    records.setdefault(key, []).extend(column)
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)

    metrics = aggregate_metrics(records, energy=request["energy"])
    evaluations = sum(info["cache_evaluations"] for info in infos)
    forecasts = sum(info["cache_forecasts"] for info in infos)
    seconds = sum(info["sampling_seconds"] for info in infos)
    threads = sorted({info["threads"] for info in infos})
    summary = {
        **metrics,
        "steps": request["steps"],
        "nfe": sum(info["nfe"] for info in infos),
        "cache": manifest.get("cache", "none"),
        "cache_hit_rate": forecasts / max(evaluations + forecasts, 1),
        "kernels": ",".join(sorted({info["kernels"] for info in infos})),
        "seconds": seconds,
        "molecules_per_second": request["n"] / seconds if seconds > 0 else float("nan"),
        "seed": request["seed"],
        "schedule": request["schedule"],
        "model": manifest.get("model", ""),
        "threads": threads[0] if len(threads) == 1 else threads,
        "sdf": str(out),
        "written": written,
        "directory": str(directory),
        "shards": len(shards),
        "shard_size": request["shard_size"],
        "world_sizes": sorted({info["world_size"] for info in infos}),
        "model_fingerprint": request["model_fingerprint"],
        "runs": manifest.get("runs", []),
    }
    write_json(directory / MERGED_JSON, summary)
    return summary


def print_summary(summary: dict, as_json: bool, json_keys: Sequence[str] = ()) -> None:
    """As ``fastflow sample`` prints a single-process run: one JSON object, or the metrics table and a line."""
    from fastflow.metrics import format_metrics_table, summary_json

    if as_json:
        print(summary_json(summary, json_keys))
        return
    metrics = {key: summary[key] for key in summary if key not in _NOT_METRICS}
    print(format_metrics_table({"generated": metrics}))
    print(
        f"{summary['n']} molecules, {summary['steps']} steps, {summary['nfe']} network evaluations, "
        f"{summary['seconds']:.2f} s of sampling in {summary['shards']} shards "
        f"({summary['molecules_per_second']:.1f} molecules/s per process, {summary['threads']} threads); "
        f"{summary['written']} molecules in {summary['sdf']}"
    )


_NOT_METRICS = {
    "steps",
    "nfe",
    "cache",
    "cache_hit_rate",
    "kernels",
    "seconds",
    "molecules_per_second",
    "seed",
    "schedule",
    "model",
    "threads",
    "sdf",
    "written",
    "directory",
    "shards",
    "shard_size",
    "world_sizes",
    "model_fingerprint",
    "runs",
}


# -- small helpers ---------------------------------------------------------------------------------------------


def write_json(path: Path, obj) -> None:
    """Write ``obj`` as JSON under a temporary name, fsync, rename into place."""
    path = Path(path)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "w") as file:
            json.dump(obj, file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _short(value) -> str:
    if isinstance(value, str) and len(value) > 24:  # fingerprints
        return value[:12] + "…"
    if isinstance(value, dict):  # cache settings: the ones that are set
        return "{" + ", ".join(f"{k}={v}" for k, v in value.items() if v not in (None, False)) + "}"
    return json.dumps(value)


def _now() -> str:
    return _iso(time.time())


def _iso(seconds: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(seconds))


__all__ = [
    "DEFAULT_SHARD_SIZE",
    "FORMAT",
    "MANIFEST",
    "MERGED_JSON",
    "MERGED_SDF",
    "Coordinator",
    "DirectoryLock",
    "MissingShards",
    "OtherRankFailed",
    "Shard",
    "ShardedRequest",
    "aggregate_metrics",
    "build_manifest",
    "load_graphs",
    "load_manifest",
    "manifest_differences",
    "merge",
    "model_fingerprint",
    "molecule_records",
    "plan_shards",
    "prepare_directory",
    "print_summary",
    "read_graphs",
    "read_shard_info",
    "sample_sharded",
    "save_graphs",
    "shard_directory",
    "write_json",
]
