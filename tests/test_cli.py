"""The `fastflow` command line."""

import json
import subprocess
import sys

from fastflow.cli import JSON_KEYS, main
from fastflow.chem import read_sdf


def test_sample_json_and_sdf(tmp_path, capsys):
    out = tmp_path / "mols.sdf"
    code = main(["sample", "--n", "3", "--steps", "2", "--seed", "1", "--config", "tiny", "--json", "--out", str(out)])
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


def test_python_dash_m_entry_point():
    result = subprocess.run([sys.executable, "-m", "fastflow", "--help"], capture_output=True, text=True)
    assert result.returncode == 0 and "sample" in result.stdout


def test_eval_with_cache_counts_real_evaluations(capsys):
    code = main(["eval", "--n", "3", "--steps", "4", "--seed", "0", "--no-energy", "--json",
                 "--cache", "taylor", "--order", "1", "--interval", "2"])
    assert code == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["nfe"] < 3 * 4 and summary["cache_hit_rate"] > 0
