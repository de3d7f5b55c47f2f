"""`fastflow bench caching` end to end on a tiny random model (the measurement itself: bench/caching_pareto.py)."""

import json
import math

import pytest

from fastflow.benchmarks.caching import matched_quality, runs
from fastflow.cli import main

pytestmark = pytest.mark.usefixtures("single_thread")


def test_bench_caching_smoke(tmp_path, capsys):
    out = tmp_path / "caching.json"
    assert (
        main(
            [
                "bench",
                "caching",
                "--quick",
                "--config",
                "tiny",
                "--n",
                "3",
                "--steps",
                "6",
                "--no-plot",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    results = json.loads(out.read_text())
    rows = {row["run"]: row for row in results["rows"]}
    assert list(rows) == [name for name, _, _ in runs(quick=True, steps=6)]
    base = rows["base"]
    assert (
        base["speedup"] == 1.0
        and base["rmsd_to_base_median"] == 0.0
        and base["evaluations_per_molecule"] == 6
    )
    # Fewer-steps baselines sit at the cached runs' evaluation counts (6 steps, D=2: steps 0, 2, 4 and the last).
    assert (
        rows["4 steps"]["evaluations_per_molecule"] == rows["taylor 2 D=2"]["evaluations_per_molecule"] == 4
    )
    assert rows["taylor 2 D=2"]["cache_hit_rate"] == pytest.approx(2 / 6)
    for row in rows.values():
        assert 0 < row["evaluations_per_molecule"] <= 6 and row["seconds"] > 0
        assert {"energy_per_atom_sem", "strain_per_atom_sem", "matched_quality"} <= set(row)
    assert results["metadata"]["n_molecules"] == 3
    assert "adaptive tol=2.0" in capsys.readouterr().out
    assert "error='relative'" in rows["adaptive relative tol=0.1"]["cache"]


def test_matched_quality_is_the_issues_bar():
    base = {"validity": 0.87, "mol_stability": 0.92, "energy_per_atom": 6.0, "strain_per_atom": 5.0}
    assert matched_quality(dict(base), base)
    assert matched_quality({**base, "validity": 0.86, "strain_per_atom": 5.2, "energy_per_atom": 4.0}, base)
    assert not matched_quality({**base, "mol_stability": 0.90}, base)
    assert not matched_quality({**base, "strain_per_atom": 5.3}, base)
    assert not matched_quality({**base, "energy_per_atom": math.nan}, base)


def test_bench_caching_only_runs_the_chosen_rows(tmp_path, capsys):
    out = tmp_path / "adaptive.json"
    assert (
        main(
            [
                "bench",
                "caching",
                "--quick",
                "--config",
                "tiny",
                "--n",
                "2",
                "--steps",
                "4",
                "--no-plot",
                "--only",
                "base",
                "adaptive",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    rows = json.loads(out.read_text())["rows"]
    assert [row["run"] for row in rows] == [
        "base",
        "adaptive tol=0.5",
        "adaptive tol=2.0",
        "adaptive relative tol=0.1",
    ]
    assert (
        main(
            [
                "bench",
                "caching",
                "--quick",
                "--config",
                "tiny",
                "--n",
                "2",
                "--steps",
                "4",
                "--no-plot",
                "--only",
                "adaptive relative",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    assert [row["run"] for row in json.loads(out.read_text())["rows"]] == ["adaptive relative tol=0.1"]
    assert (
        main(["bench", "caching", "--quick", "--config", "tiny", "--only", "nothing", "--out", str(out)]) == 2
    )
    assert "--only nothing matches no row" in capsys.readouterr().err
