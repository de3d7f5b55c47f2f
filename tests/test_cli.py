"""The `fastflow` command line."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fastflow.chem import read_sdf
from fastflow.cli import JSON_KEYS, main


def test_sample_json_and_sdf(tmp_path, capsys):
    out = tmp_path / "mols.sdf"
    code = main(
        ["sample", "--n", "3", "--steps", "2", "--seed", "1", "--config", "tiny", "--json", "--out", str(out)]
    )
    assert code == 0
    summary = json.loads(capsys.readouterr().out)
    assert set(JSON_KEYS) <= set(summary)
    assert summary["n"] == 3 and summary["steps"] == 2 and summary["nfe"] == 6
    assert out.exists() and len(read_sdf(out)) <= 3


def test_sample_table_says_the_model_is_random(capsys):
    assert main(["sample", "--n", "2", "--steps", "1", "--config", "tiny", "--no-energy"]) == 0
    captured = capsys.readouterr()
    assert "atom_stability" in captured.out and "RANDOMLY INITIALISED" in captured.err


def test_bad_requests_exit_with_a_message(tmp_path, capsys):
    assert main(["sample", "--n", "0", "--config", "tiny"]) == 2
    assert "n_molecules must be an integer >= 1" in capsys.readouterr().err
    assert main(["sample", "--n", "1", "--checkpoint", str(tmp_path / "none.ckpt")]) == 2
    assert "checkpoint not found" in capsys.readouterr().err


def test_json_is_strict_when_a_metric_has_nothing_to_measure(capsys):
    """A random tiny model makes no valid molecule: uniqueness is undefined and prints as null, not NaN."""
    assert main(["sample", "--n", "2", "--steps", "1", "--config", "tiny", "--no-energy", "--json"]) == 0
    out = capsys.readouterr().out
    summary = json.loads(out, parse_constant=lambda name: pytest.fail(f"{name} in --json output"))
    assert summary["validity"] == 0.0 and summary["uniqueness"] is None


def test_user_errors_are_one_line_and_exit_2(tmp_path, capsys, monkeypatch):
    """Each of these once ended in a traceback."""
    monkeypatch.setenv(
        "TRITON_INTERPRET", "0"
    )  # tests/conftest.py lets Triton run on CPU; a user's CPU cannot
    weights = tmp_path / "model" / "model.safetensors"
    weights.parent.mkdir()
    weights.write_bytes(b'\x08\x00\x00\x00\x00\x00\x00\x00{"a":')  # truncated header
    (weights.parent / "config.json").write_text("{}")
    stray = tmp_path / "weights.safetensors"
    stray.write_bytes(weights.read_bytes())
    cases = [
        (["sample", "--n", "1", "--config", "tiny", "--kernels", "triton"], "backend 'triton' requested"),
        (["sample", "--n", "1", "--config", "tiny", "--device", "cuda"], "--device cuda"),
        (["sample", "--n", "1", "--config", "tiny", "--device", "nowhere"], "is not a device"),
        (["sample", "--n", "1", "--checkpoint", str(stray)], "pass the directory"),
        (["sample", "--n", "1", "--checkpoint", str(tmp_path / "truncated.ckpt")], "checkpoint not found"),
        (["sample", "--n", "1", "--config", "tiny", "--seed", str(2**70)], "seed must be an integer"),
    ]
    (tmp_path / "truncated.ckpt").write_bytes(b"PK\x03\x04 not a whole zip")
    cases[4] = (cases[4][0], "not a loadable PyTorch checkpoint")
    cases.append((["sample", "--n", "1", "--checkpoint", str(weights)], "Semla config|safetensors"))
    text = tmp_path / "notes.ckpt"
    text.write_text("not a checkpoint\n")
    cases += [
        (["sample", "--n", "1", "--checkpoint", str(text)], "not a loadable PyTorch checkpoint"),
        (["sample", "--n", "1", "--config", "tiny", "--threads", "0"], "--threads must be at least 1"),
        (
            ["sample", "--n", "1", "--config", "tiny", "--out", str(tmp_path / "missing" / "x.sdf")],
            "does not exist",
        ),
        (["eval", "--n", "1", "--threads", "-2"], "--threads must be at least 1"),
    ]
    if torch.cuda.is_available():
        cases = [case for case in cases if "--device" not in case[0] and "triton" not in case[0]]
    for argv, message in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) <= 2 and re.search(message, err), (argv, err)  # model line + the error
        assert "Traceback" not in err
    assert not (tmp_path / "missing").exists()  # refused before any work


def test_packaged_models_by_name(capsys):
    assert main(["sample", "--model", "qm9-small", "--n", "2", "--steps", "2", "--no-energy", "--json"]) == 0
    assert "qm9-small" in json.loads(capsys.readouterr().out)["model"]
    assert main(["sample", "--model", "no-such-model", "--n", "1"]) == 2
    assert "no packaged model 'no-such-model'" in capsys.readouterr().err


def test_python_dash_m_entry_point():
    result = subprocess.run([sys.executable, "-m", "fastflow", "--help"], capture_output=True, text=True)
    assert result.returncode == 0 and "sample" in result.stdout


def test_eval_with_cache_counts_real_evaluations(capsys):
    code = main(
        [
            "eval",
            "--n",
            "3",
            "--steps",
            "6",
            "--seed",
            "0",
            "--no-energy",
            "--json",
            "--cache",
            "taylor",
            "--order",
            "1",
            "--interval",
            "2",
        ]
    )
    assert code == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["nfe"] < 3 * 6 and summary["cache_hit_rate"] > 0


@pytest.fixture
def read_only(tmp_path, monkeypatch):
    """A directory we may not write in: mode 0555, and for root (whom modes do not stop) os.access says so."""
    directory = tmp_path / "read-only"
    directory.mkdir()
    directory.chmod(0o555)
    if os.geteuid() == 0:
        access = os.access
        monkeypatch.setattr(
            os, "access", lambda p, mode: access(p, mode) and not (mode & os.W_OK and Path(p) == directory)
        )
    yield directory
    directory.chmod(0o755)


def _snapshot(root):
    return sorted((str(p), p.stat().st_mtime_ns) for p in root.rglob("*"))


SAMPLE = ["sample", "--n", "1", "--steps", "2", "--config", "tiny", "--no-energy"]
BAD_OUTPUTS = [  # argv with {file} (an existing file), {dir} (an existing directory), {ro} (read-only): message
    (SAMPLE + ["--out", "{file}/x.sdf"], "is a file, not a directory"),
    (SAMPLE + ["--out", "{file}"], "exists and is not a directory"),  # a shard directory is expected
    (SAMPLE + ["--out", "{ro}/x.sdf"], "no permission to write in"),
    (SAMPLE + ["--out", "{ro}/shards"], "no permission to write in"),
    (["merge", "{dir}", "--out", "{dir}"], "is a directory; give the path of a file"),
    (["merge", "{dir}", "--out", "{dir}/missing/x.sdf"], "does not exist"),
    (["merge", "{dir}", "--out", "{ro}/x.sdf"], "no permission to write in"),
    (["merge", "{ro}"], "no permission to write in"),
    (["bench", "kernels", "--out", "{dir}"], "is a directory"),
    (["bench", "kernels", "--out", "{ro}/new/x.json"], "no permission to write in"),
    (["bench", "caching", "--out", "{file}/x.json"], "is a file, not a directory"),
    (["train", "--steps", "1", "--out", "{file}"], "exists and is not a directory"),
    (["train", "--steps", "1", "--out", "{ro}/run"], "no permission to write in"),
    (["train", "--export", "{file}/model"], "is a file, not a directory"),
    (["train", "--steps", "1", "--export-to", "{ro}"], "no permission to write in"),
    (["data", "qm9", "--cache-dir", "{file}"], "exists and is not a directory"),
]


@pytest.mark.parametrize(
    ("argv", "message"), BAD_OUTPUTS, ids=lambda v: " ".join(v) if isinstance(v, list) else ""
)
def test_unwritable_outputs_are_refused_before_any_work(argv, message, tmp_path, read_only, capsys):
    (tmp_path / "notes.txt").write_text("a file\n")
    (tmp_path / "folder").mkdir()
    places = {"file": tmp_path / "notes.txt", "dir": tmp_path / "folder", "ro": read_only}
    before = _snapshot(tmp_path)
    assert main([arg.format(**places) for arg in argv]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err, err
    assert _snapshot(tmp_path) == before  # nothing written, not even a lock or a run folder


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (
            ["--cache", "taylor", "--order", "9", "--steps", "20"],
            "never reached: 20 steps at --interval 2 leave at most order 8",
        ),
        (["--cache", "ab", "--order", "3", "--steps", "4"], "at most order 1"),
        (["--cache", "taylor", "--order", "1", "--interval", "1", "--steps", "5"], "--order 1 is never used"),
        (["--cache", "adaptive", "--tolerance", "0.1", "--order", "6", "--steps", "6"], "at most order 3"),
    ],
)
def test_forecaster_orders_the_run_cannot_reach_are_refused(options, message, tmp_path, capsys):
    out = tmp_path / "x.sdf"
    assert main(["sample", "--n", "1", "--config", "tiny", "--no-energy", "--out", str(out), *options]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err, err
    assert not out.exists()
