"""Sharded, resumable, deterministic sampling into a shard directory, alone or under torchrun, and the merge.

Molecule i's sample depends only on (seed, i, its size) (keyed random streams, :mod:`fastflow.rng`;
``sample(..., indices=)``), so the molecules are the same whatever the world size, the batch size or the rank
that samples a shard (coordinates up to fp32 rounding). The directory's layout and manifest are
:mod:`fastflow.sampling.shards`; locks, ranks and progress :mod:`fastflow.sampling.coordination`.

A rerun of the same request samples only the shards without a valid JSON (killed ranks or jobs lose at most the
shards in flight; nothing is duplicated); a directory whose manifest holds another request is refused, naming
the differing keys, unless ``overwrite`` starts over. One job per directory at a time: rank 0 holds the
directory's lock for the whole job. Rank 0 checks or writes the manifest, removes stale temporary files, lists
the shards still missing and broadcasts that list; rank r samples ``missing[r::world_size]`` (so a resume is
balanced too); rank 0 shows one progress bar over all ranks, and after a final barrier merges.
"""

from __future__ import annotations

import socket
import sys
import time
from pathlib import Path

import torch

from fastflow.chem.graph_io import save_graphs
from fastflow.chem.sdf import INDEX_PROP, concatenate_sdf, write_sdf
from fastflow.metrics import aggregate_metrics, molecule_records, run_summary
from fastflow.sampling.coordination import (
    Coordinator,
    DirectoryLock,
    OtherRankFailed,
    Progress,
    die_mid_shard,
    stop_after_shards,
)
from fastflow.sampling.sampler import sample
from fastflow.sampling.shards import (
    MERGED_JSON,
    MERGED_SDF,
    Shard,
    ShardedRequest,
    build_manifest,
    complete_shards,
    load_manifest,
    plan_shards,
    prepare_directory,
    record_run,
    sha256,
    timestamp,
    write_json,
)


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

    handle: the ``patch_model`` handle (kernels backend, precision and cache counters per shard), or None.
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
        shards = plan_shards(request.n, request.shard_size)
        missing = [shards[k] for k in status[1]]
        sample_one = _ShardSampler(
            model, directory, request, handle, batch_size, size_distribution, coordinator
        )
        _sample_missing(sample_one, shards, missing, coordinator, progress)
        if coordinator.rank != 0:
            return None
        run = {
            "world_size": coordinator.world_size,
            "started": timestamp(started),
            "finished": timestamp(),
            "wall_seconds": time.time() - started,
            "shards_sampled": len(missing),
            "molecules_sampled": sum(s.n for s in missing),
        }
        record_run(directory, run)
        return merge(directory)
    finally:
        if lock is not None:
            lock.release()


def _sample_missing(sample_one, shards, missing, coordinator, progress) -> None:
    """This rank's share of the missing shards (rank 0 shows the bar of all ranks), then the final barrier."""
    rank, world = coordinator.rank, coordinator.world_size
    mine = missing[rank::world]
    show = rank == 0 and (sys.stderr.isatty() if progress is None else progress)
    bar = Progress(sample_one.directory, shards, missing, world, show) if rank == 0 else None
    stop_after = stop_after_shards(rank)
    try:
        for count, shard in enumerate(mine):
            sample_one(shard)
            if stop_after is not None and count + 1 >= stop_after:
                die_mid_shard(sample_one.directory, mine[count + 1] if count + 1 < len(mine) else shard)
        coordinator.barrier()
    finally:
        if bar is not None:
            bar.close()


class _ShardSampler:
    """Samples one shard into its SDF, graphs and (last, the commit mark) JSON."""

    def __init__(self, model, directory, request, handle, batch_size, size_distribution, coordinator):
        self.model, self.directory, self.request, self.handle = model, directory, request, handle
        self.batch_size, self.size_distribution, self.coordinator = batch_size, size_distribution, coordinator

    def __call__(self, shard: Shard) -> None:
        request, handle = self.request, self.handle
        if handle is not None:
            handle.reset()
        started = time.time()
        result = sample(
            self.model,
            shard.n,
            steps=request.steps,
            schedule=request.schedule,
            seed=request.seed,
            batch_size=self.batch_size,
            progress=False,
            size_distribution=self.size_distribution,
            indices=torch.arange(shard.start, shard.stop),
        )
        records = molecule_records(result.graphs, result.molecules, energy=request.energy)
        cache = handle.stats() if handle is not None else {}
        sdf, pt = self.directory / shard.sdf, self.directory / shard.pt
        props = [{INDEX_PROP: i} for i in range(shard.start, shard.stop)]
        written = write_sdf(sdf, result.molecules, props=props)
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
            "precision": handle.precision if handle is not None else "fp32",
            "cache_evaluations": cache.get("evaluations", 0),
            "cache_forecasts": cache.get("forecasts", 0),
            "cache_hit_rate": cache.get("hit_rate", 0.0),
            "rank": self.coordinator.rank,
            "world_size": self.coordinator.world_size,
            "host": socket.gethostname(),
            "threads": torch.get_num_threads(),
            "device": str(next(self.model.parameters()).device),
            "batch_size": self.batch_size,
            "finished": timestamp(),
            "sdf": shard.sdf,
            "written": written,
            "sdf_bytes": sdf.stat().st_size,
            "sdf_sha256": sha256(sdf),
            "pt": shard.pt,
            "pt_bytes": pt.stat().st_size,
            "pt_sha256": sha256(pt),
            "metrics": aggregate_metrics(records),
            "molecules": records,
        }
        write_json(self.directory / shard.json, info)


def merge(directory: Path, out: Path | None = None) -> dict:
    """Combine the shards of ``directory`` into one SDF (default ``DIR/molecules.sdf``) and the summary of the
    whole request (written to ``DIR/metrics.json`` and returned): metrics aggregated from every molecule's
    records — the numbers of a single-process run — plus nfe, cache hit rate and summed sampling seconds.

    Raises :class:`~fastflow.sampling.shards.MissingShards` (nothing written) if a shard is missing or its SDF
    does not match its JSON.
    """
    directory = Path(directory)
    manifest = load_manifest(directory)
    request = manifest["request"]
    shards, infos = complete_shards(directory, verify=True)
    out = Path(out) if out is not None else directory / MERGED_SDF
    if out.is_dir():
        raise ValueError(f"merge output {out} is a directory; give the path of an SDF file")
    written = concatenate_sdf([directory / shard.sdf for shard in shards], out)
    records: dict[str, list] = {}
    for info in infos:
        for key, column in info["molecules"].items():
            records.setdefault(key, []).extend(column)
    evaluations = sum(info["cache_evaluations"] for info in infos)
    forecasts = sum(info["cache_forecasts"] for info in infos)
    threads = sorted({info["threads"] for info in infos})
    summary = run_summary(
        aggregate_metrics(records),
        steps=request["steps"],
        nfe=sum(info["nfe"] for info in infos),
        seconds=sum(info["sampling_seconds"] for info in infos),
        seed=request["seed"],
        schedule=request["schedule"],
        model=manifest.get("model", ""),
        cache=manifest.get("cache", "none"),
        cache_hit_rate=forecasts / max(evaluations + forecasts, 1),
        kernels=",".join(sorted({info["kernels"] for info in infos})),
        precision=",".join(sorted({info.get("precision", "fp32") for info in infos})),
        threads=threads[0] if len(threads) == 1 else threads,
        sdf=str(out),
        written=written,
        directory=str(directory),
        shards=len(shards),
        shard_size=request["shard_size"],
        world_sizes=sorted({info["world_size"] for info in infos}),
        model_fingerprint=request["model_fingerprint"],
        runs=manifest.get("runs", []),
    )
    write_json(directory / MERGED_JSON, summary)
    return summary
