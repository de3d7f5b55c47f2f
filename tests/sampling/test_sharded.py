"""Sharded, resumable sampling (`fastflow sample --out DIR`, torchrun with gloo) and `fastflow merge`."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fastflow.chem import read_sdf
from fastflow.chem.sdf import INDEX_PROP
from fastflow.cli import main, shard_directory
from fastflow.metrics import compute_metrics
from fastflow.models import Semla, SemlaConfig
from fastflow.pretrained import has_pretrained, load_pretrained
from fastflow.sampling import sample
from fastflow.sampling.coordination import STOP_HOOK
from fastflow.sampling.shards import MANIFEST, Shard, load_graphs, model_fingerprint, plan_shards

N, STEPS, SHARD_SIZE = 10, 8, 3  # 4 shards: 3 + 3 + 3 + 1 molecules
DISCRETE = (
    "n",
    "atom_stability",
    "mol_stability",
    "validity",
    "connected_validity",
    "uniqueness",
    "energy_validity",
    "opt_energy_validity",
)
needs_packaged = pytest.mark.skipif(not has_pretrained(), reason="no packaged model")


def _reference(steps=STEPS):
    """In-process, single-process sample of the request the CLI runs below (packaged model, seed 0)."""
    model = load_pretrained()
    return sample(
        model, N, steps=steps, seed=0, batch_size=128, progress=False, size_distribution=model.size_counts
    )


def _same_number(a, b, rel=0.0):
    if isinstance(a, float) and math.isnan(a):
        return isinstance(b, float) and math.isnan(b)
    return a == b if rel == 0 else math.isclose(a, b, rel_tol=rel)


def _assert_same_molecules(directory: Path, reference):
    graphs = load_graphs(directory)
    assert len(graphs) == N
    for got, want in zip(graphs, reference.graphs):
        assert torch.equal(got.atom_types, want.atom_types) and torch.equal(got.charges, want.charges)
        assert torch.equal(got.bond_types, want.bond_types)
        assert torch.allclose(got.coords, want.coords, atol=1e-4, rtol=0)  # fp32 rounding, other batching
    records = read_sdf(directory / "molecules.sdf")
    indices = [mol.GetIntProp(INDEX_PROP) for mol in records]
    assert indices == [
        i for i, mol in enumerate(reference.molecules) if mol is not None
    ]  # each once, in order
    for mol in records:
        want = reference.molecules[mol.GetIntProp(INDEX_PROP)]
        assert mol.GetNumAtoms() == want.GetNumAtoms()
        assert torch.allclose(
            torch.tensor(mol.GetConformer().GetPositions()),
            torch.tensor(want.GetConformer().GetPositions()),
            atol=2e-4,
            rtol=0,
        )


def _assert_same_metrics(summary: dict, reference_metrics: dict):
    assert set(reference_metrics) <= set(summary)
    for key, want in reference_metrics.items():
        assert _same_number(summary[key], want, rel=0 if key in DISCRETE else 1e-4), key


def test_shards_and_the_out_rule(monkeypatch, tmp_path):
    shards = plan_shards(10, 3)
    assert [(s.start, s.stop) for s in shards] == [(0, 3), (3, 6), (6, 9), (9, 10)]
    assert shards[1].sdf == "shard-00001.sdf" and shards[3].n == 1
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert shard_directory(None, None) is None and shard_directory(tmp_path / "a.sdf", None) is None
    assert shard_directory(tmp_path / "run", None) == tmp_path / "run"
    with pytest.raises(ValueError, match="--shard-size goes with --out DIR"):
        shard_directory(tmp_path / "a.sdf", 3)
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ValueError, match="under torchrun --out must be a shard directory"):
        shard_directory(tmp_path / "a.sdf", None)
    with pytest.raises(ValueError, match="give --out DIR"):
        shard_directory(None, None)


def test_indices_sample_a_shard_of_the_request():
    torch.manual_seed(0)
    model = Semla(SemlaConfig.preset("tiny")).eval()
    whole = sample(model, 7, steps=3, seed=4, progress=False)
    part = sample(model, 3, steps=3, seed=4, progress=False, indices=torch.arange(3, 6))
    assert part.sizes == whole.sizes[3:6]
    for got, want in zip(part.graphs, whole.graphs[3:6]):
        assert torch.equal(got.atom_types, want.atom_types) and torch.equal(got.bond_types, want.bond_types)
        assert torch.allclose(got.coords, want.coords, atol=1e-4, rtol=0)
    with pytest.raises(ValueError, match="distinct"):
        sample(model, 2, steps=1, indices=[4, 4])
    other = Semla(SemlaConfig.preset("tiny"))
    assert model_fingerprint(model) == model_fingerprint(model) != model_fingerprint(other)


def _torchrun(out: Path, *extra: str, env: dict | None = None) -> subprocess.CompletedProcess:
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc-per-node=2",
        "--standalone",
        "-m",
        "fastflow",
        "--",  # "--": torchrun's own parser would take --n for an abbreviation
        "sample",
        "--n",
        str(N),
        "--steps",
        str(STEPS),
        "--seed",
        "0",
        "--out",
        str(out),
        "--shard-size",
        str(SHARD_SIZE),
        "--threads",
        "1",
        "--kernels",
        "reference",
        "--json",
        *extra,
    ]
    environment = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    environment.pop("WORLD_SIZE", None)
    return subprocess.run(command, capture_output=True, text=True, env=environment, timeout=300, check=False)


@needs_packaged
def test_torchrun_killed_rank_resumes_to_the_single_process_result(tmp_path, capsys):
    out = tmp_path / "run"
    # Rank 1 dies abruptly after its first shard (leaving a half-written file); torchrun stops the job.
    killed = _torchrun(out, env={STOP_HOOK: "1:1"})
    assert killed.returncode != 0
    assert any(path.name.endswith(".tmp") for path in out.iterdir())
    assert main(["merge", str(out)]) == 1
    assert "shard-00003 (molecules 9-9)" in capsys.readouterr().err

    resumed = _torchrun(out)
    assert resumed.returncode == 0, resumed.stderr
    summary = json.loads(resumed.stdout)
    reference = _reference()
    _assert_same_molecules(out, reference)
    _assert_same_metrics(summary, compute_metrics(reference.graphs, reference.molecules, energy=True))
    assert summary["nfe"] == reference.stats["nfe"] == N * STEPS
    assert not any(path.name.endswith(".tmp") for path in out.iterdir())
    shards = [json.loads((out / f"shard-{k:05d}.json").read_text()) for k in range(4)]
    assert sorted(i for s in shards for i in range(s["start"], s["stop"])) == list(range(N))
    assert {s["world_size"] for s in shards} == {2} and {s["rank"] for s in shards} == {0, 1}
    manifest = json.loads((out / MANIFEST).read_text())
    assert manifest["runs"][-1]["world_size"] == 2 and manifest["runs"][-1]["shards_sampled"] < 4


@needs_packaged
def test_one_process_directory_resume_refusal_and_merge(tmp_path, capsys):
    out = tmp_path / "run"
    args = [
        "sample",
        "--n",
        str(N),
        "--steps",
        str(STEPS),
        "--seed",
        "0",
        "--threads",
        "1",
        "--no-energy",
        "--cache",
        "taylor",
        "--order",
        "1",
        "--interval",
        "2",
        "--json",
    ]
    assert main([*args, "--out", str(tmp_path / "single.sdf")]) == 0
    single = json.loads(capsys.readouterr().out)
    assert main([*args, "--out", str(out), "--shard-size", str(SHARD_SIZE)]) == 0
    sharded = json.loads(capsys.readouterr().out)
    for key in (*DISCRETE[:6], "steps", "nfe", "cache_hit_rate", "seed", "schedule", "kernels", "cache"):
        assert _same_number(sharded[key], single[key]), key
    assert sharded["cache_hit_rate"] > 0 and sharded["written"] == len(read_sdf(tmp_path / "single.sdf"))

    # Another request in the same directory: refused, naming what differs; --overwrite starts over.
    assert main([*args, "--out", str(out), "--shard-size", str(SHARD_SIZE), "--seed", "1"]) == 2
    error = capsys.readouterr().err
    assert "holds another request" in error and "seed: 0 -> 1" in error and "--overwrite" in error
    assert (
        main([*args, "--out", str(out), "--shard-size", str(SHARD_SIZE), "--seed", "1", "--overwrite"]) == 0
    )
    assert json.loads(capsys.readouterr().out)["seed"] == 1
    assert json.loads((out / MANIFEST).read_text())["request"]["seed"] == 1

    # A lost shard: merge names it and fails; the same command samples that shard alone.
    (out / Shard(1, 3, 6).json).unlink()
    kept = (out / Shard(2, 6, 9).json).stat().st_mtime_ns
    assert main(["merge", str(out)]) == 1
    assert "1 of 4 shards missing" in capsys.readouterr().err
    assert main([*args, "--out", str(out), "--shard-size", str(SHARD_SIZE), "--seed", "1"]) == 0
    resumed = json.loads(capsys.readouterr().out)
    assert (out / Shard(2, 6, 9).json).stat().st_mtime_ns == kept
    assert json.loads((out / MANIFEST).read_text())["runs"][-1]["shards_sampled"] == 1
    assert main(["merge", str(out), "--json"]) == 0
    merged = json.loads(capsys.readouterr().out)
    assert all(_same_number(merged[key], resumed[key]) for key in DISCRETE[:6])

    # Shard files without a manifest are not ours to overwrite.
    (out / MANIFEST).unlink()
    assert main([*args, "--out", str(out)]) == 2
    assert "no manifest.json" in capsys.readouterr().err


def test_one_job_per_directory_and_a_killed_holder_leaves_no_stale_lock(tmp_path, capsys):
    """A second job into a directory that a running job holds is refused before it touches anything; once the
    holder dies (SIGKILL: no clean-up), the directory is free again."""
    directory = tmp_path / "shards"
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; from fastflow.sampling.coordination import DirectoryLock; "
            f"DirectoryLock.acquire({str(directory)!r}); print('locked', flush=True); time.sleep(120)",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        request = [
            "sample",
            "--config",
            "tiny",
            "--n",
            "2",
            "--steps",
            "2",
            "--no-energy",
            "--out",
            str(directory),
        ]
        assert main(request) == 2
        err = capsys.readouterr().err
        assert "in use by another fastflow job" in err and f'"pid": {holder.pid}' in err
        assert main(["merge", str(directory)]) == 2
        assert sorted(p.name for p in directory.iterdir()) == [".lock"]  # nothing half-written
    finally:
        holder.kill()
        holder.wait()
    assert main(request) == 0
    assert (directory / MANIFEST).is_file() and (directory / "molecules.sdf").is_file()


def test_merge_into_a_directory_is_a_clear_error(tmp_path, capsys):
    directory = tmp_path / "shards"
    assert (
        main(
            [
                "sample",
                "--config",
                "tiny",
                "--n",
                "2",
                "--steps",
                "2",
                "--no-energy",
                "--shard-size",
                "1",
                "--out",
                str(directory),
            ]
        )
        == 0
    )
    (tmp_path / "somewhere").mkdir()
    capsys.readouterr()
    assert main(["merge", str(directory), "--out", str(tmp_path / "somewhere")]) == 2
    assert "is a directory" in capsys.readouterr().err
    assert main(["merge", str(tmp_path / "missing")]) == 2


def test_a_cache_with_the_default_clock_has_the_identity_it_had_before_the_clock():
    """Shard directories written before CacheConfig had a clock must still resume: the default clock is left out
    of the request identity; the step clock is part of it."""
    from fastflow.cache import CacheConfig
    from fastflow.sampling.shards import ShardedRequest

    def identity(cache):
        return ShardedRequest(
            n=4,
            steps=3,
            schedule="log",
            seed=0,
            shard_size=2,
            model_fingerprint="x",
            cache=cache,
            energy=False,
        ).identity()["cache"]

    assert "clock" not in identity(CacheConfig(interval=2))
    assert identity(CacheConfig(interval=2, clock="steps"))["clock"] == "steps"
