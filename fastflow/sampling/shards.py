"""A shard directory's contract: how a request is cut into shards, the manifest that names the request, and when a
shard counts as complete. Sampling into it is :mod:`fastflow.sampling.sharded`; who may write it, and when,
is :mod:`fastflow.sampling.coordination`.

A request (n molecules, steps, schedule, seed, cache settings, model) is cut into fixed-size shards of
contiguous request indices, independent of the number of processes: shard k holds molecules
``[k·S, min((k+1)·S, n))`` for the shard size S.

Directory layout::

    DIR/manifest.json      format, request (the identity compared on reruns: n, steps, schedule, seed,
                           shard_size, cache, energy, model_fingerprint), model description, the shard list,
                           and one entry per sampling run (world size, shards, wall time)
    DIR/shard-00042.sdf    the shard's molecules; each record's fastflow_index is its request index
    DIR/shard-00042.pt     every molecule's graph (RDKit failures included), compact: :func:`load_graphs`
    DIR/shard-00042.json   start/stop, nfe, seconds, kernels backend, cache counters, the shard's own metrics,
                           the SDF's size and sha256, and per-molecule records
                           (:func:`fastflow.metrics.molecule_records`) from which a merge recomputes the
                           metrics of the whole request exactly (set-level ones included)
    DIR/molecules.sdf      written by merge: every shard's records in request order
    DIR/metrics.json       written by merge: the summary (metrics of all molecules, nfe, seconds, runs)

Files are written under a temporary name and renamed when complete; a shard's JSON is written after its SDF
and is the shard's commit mark.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import time
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path

import torch

from fastflow.chem.graph_io import read_graphs
from fastflow.sampling.sampler import size_counts

FORMAT = "fastflow-shards/1"
MANIFEST = "manifest.json"
MERGED_SDF = "molecules.sdf"
MERGED_JSON = "metrics.json"
DEFAULT_SHARD_SIZE = 1000
IDENTITY_KEYS = ("n", "steps", "schedule", "seed", "shard_size", "cache", "energy", "model_fingerprint")
_OUR_FILES = re.compile(
    r"^\.?shard-\d+\..*$|^\.?manifest\.json.*$|^\.?molecules\.sdf.*$|^\.?metrics\.json.*$"
)
_TMP = re.compile(r"^\.?(shard-\d+|manifest\.json|molecules\.sdf|metrics\.json).*\.tmp$")


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


class MissingShards(ValueError):
    """A merge found shards that are not complete (listed in ``missing``)."""

    def __init__(self, directory: Path, missing: list[Shard], total: int):
        self.missing = missing
        shown = ", ".join(f"{s.name} (molecules {s.start}-{s.stop - 1})" for s in missing[:20])
        more = f", and {len(missing) - 20} more" if len(missing) > 20 else ""
        super().__init__(
            f"{len(missing)} of {total} shards missing in {directory}: {shown}{more}; rerun the "
            f"same `fastflow sample` command to sample them"
        )


def plan_shards(n_molecules: int, shard_size: int) -> list[Shard]:
    """Contiguous shards of ``shard_size`` molecules (the last one may be smaller)."""
    for name, value in (("n", n_molecules), ("shard_size", shard_size)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    return [
        Shard(k, start, min(start + shard_size, n_molecules))
        for k, start in enumerate(range(0, n_molecules, shard_size))
    ]


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
        "created": timestamp(),
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


def record_run(directory: Path, run: dict) -> None:
    """Append one sampling run (world size, times, shards sampled) to the manifest."""
    manifest = load_manifest(directory)
    manifest.setdefault("runs", []).append(run)
    write_json(directory / MANIFEST, manifest)


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
            if verify and sha256(path) != info.get(f"{kind}_sha256"):
                return None
        return info
    except (OSError, ValueError):
        return None


def complete_shards(directory: Path, verify: bool = False) -> tuple[list[Shard], list[dict]]:
    """Every shard of the directory and its JSON, in request order; raises :class:`MissingShards` if any is
    incomplete."""
    shards = [Shard(**s) for s in load_manifest(directory)["shards"]]
    infos = [read_shard_info(directory, shard, verify) for shard in shards]
    missing = [shard for shard, info in zip(shards, infos) if info is None]
    if missing:
        raise MissingShards(directory, missing, len(shards))
    return shards, infos


def load_graphs(directory: Path) -> list:
    """Every molecule's graph of a complete shard directory, in request order (raises MissingShards)."""
    directory = Path(directory)
    shards, _ = complete_shards(directory)
    return [graph for shard in shards for graph in read_graphs(directory / shard.pt)]


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


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def timestamp(seconds: float | None = None) -> str:
    """UTC ISO 8601 to the second (now by default)."""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() if seconds is None else seconds))


def _short(value) -> str:
    if isinstance(value, str) and len(value) > 24:  # fingerprints
        return value[:12] + "…"
    if isinstance(value, dict):  # cache settings: the ones that are set
        return "{" + ", ".join(f"{k}={v}" for k, v in value.items() if v not in (None, False)) + "}"
    return json.dumps(value)
