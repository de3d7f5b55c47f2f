"""The `fastflow` command line."""

import json
import re
import subprocess
import sys

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
            "4",
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
    assert summary["nfe"] < 3 * 4 and summary["cache_hit_rate"] > 0
