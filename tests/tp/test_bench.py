"""`fastflow bench tp` end to end on a tiny case (the full benchmark is run by hand: bench/bench_tp.py)."""

import json

import pytest

from fastflow.cli import main

pytestmark = pytest.mark.usefixtures("single_thread")


def test_bench_tp_smoke(tmp_path, capsys):
    out = tmp_path / "tp.json"
    assert (
        main(
            [
                "bench",
                "tp",
                "--configs",
                "l1",
                "--edges",
                "60",
                "--degree",
                "6",
                "--repeats",
                "1",
                "--no-compile",
                "--backend",
                "reference",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    results = json.loads(out.read_text())
    rows = results["rows"]
    assert {(r["op"], r["pass"]) for r in rows} == {
        (op, p) for op in ("tensor_product", "tp_conv") for p in ("forward", "forward+backward")
    }
    for row in rows:
        assert row["fastflow_ms"] > 0 and row["e3nn_ms"] > 0 and row["max_rel_error"] < 1e-5
        assert row["skipped"].get("e3nn_compiled") == "--no-compile"
        assert row["irreps_out"].count("x") == row["paths"] == 9
    assert "machine" in results and "tp_conv" in capsys.readouterr().out
