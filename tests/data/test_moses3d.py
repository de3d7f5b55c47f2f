"""MOSES3D on a tiny MOSES-like pair of gzipped CSVs written here (no molsets wheel needed): conformers, failure
counts, determinism across workers and chunking, resume, split sizes, the cache-size check, the CLI, training."""

import gzip
import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from fastflow.chem.vocab import CHARGE_INDEX, GEOM_COORD_STD
from fastflow.cli import main
from fastflow.data import DRUG_BUCKET_LIMITS, MissingDataPackage, load_moses3d, moses3d_split, smiles_to_graph
from fastflow.data import moses3d as moses3d_module
from fastflow.models.checkpoint import load_pretrained_dir
from fastflow.training.trainer import CHECKPOINT

VALID_TRAIN = [
    "CC(=O)Nc1ccc(O)cc1",
    "CC(C)Cc1ccc(C(C)C(=O)O)cc1",
    "COc1ccc2[nH]cc(CCNC(C)=O)c2c1",
    "O=[N+]([O-])c1ccc(Cl)cc1",  # charged atoms (+1, -1): kept
    "CN1CCN(c2ccc(F)cc2)CC1",
    "Cc1ccc(S(=O)(=O)N2CCCC2)cc1",
    "O=C(NC1CC1)c1ccc(Br)s1",
    "CCOC(=O)c1cnc2ccccc2c1O",
]
BAD_TRAIN = {
    "C1CC(N": "invalid_smiles",
    "C[Se]c1ccccc1": "unsupported_element",
    "OB(O)c1ccccc1": "mmff_setup_failed",
}  # boron: in ATOM_VOCAB, not in MMFF94
VALID_TEST = ["CC(=O)Oc1ccccc1C(=O)O", "CS(=O)(=O)c1ccc(C#N)cc1", "CC(=O)N1CCc2ccccc21"]
BAD_TEST = {"C[Sn](C)(C)c1ccccc1": "unsupported_element"}
SIZES = {"n_train": 6, "n_val": 2, "n_test": 3}  # every valid molecule of both files
N_READ = len(VALID_TRAIN) + len(BAD_TRAIN) + len(VALID_TEST) + len(BAD_TEST)
FAILURES = {"invalid_smiles": 1, "unsupported_element": 2, "mmff_setup_failed": 1}


def _write_csv(path, bad, valid):
    """Rows placed so that the bad ones come first in the RandomState(0) shuffle: all of them are read."""
    n = len(bad) + len(valid)
    order = np.random.RandomState(moses3d_module.SHUFFLE_SEED).permutation(n)
    rows = [None] * n
    for position, smiles in zip(order, [*bad, *valid]):
        rows[position] = smiles
    with gzip.open(path, "wt") as handle:
        handle.write("SMILES\n" + "".join(f"{s}\n" for s in rows))


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("moses")
    _write_csv(directory / "train.csv.gz", BAD_TRAIN, VALID_TRAIN)
    _write_csv(directory / "test.csv.gz", BAD_TEST, VALID_TEST)
    return directory


@pytest.fixture(scope="module")
def tiny_cache(tiny_dir, tmp_path_factory):
    cache = tmp_path_factory.mktemp("cache")
    data = load_moses3d(cache, **SIZES, workers=1, progress=False, data_dir=tiny_dir, chunk_size=4)
    return cache, data


def _same(a, b):
    assert a["smiles"] == b["smiles"] and a["moses_index"].equal(b["moses_index"])
    assert all(a["tensors"][k].equal(b["tensors"][k]) for k in a["tensors"])
    assert all(a["split"][k].equal(b["split"][k]) for k in a["split"])
    assert (a["n_read"], a["failures"]) == (b["n_read"], b["failures"])


def test_conformers_are_3d_with_hydrogens_and_reproducible():
    graph, key = smiles_to_graph("CC(C)Cc1ccc(C(C)C(=O)O)cc1", seed=7)  # ibuprofen, C13H18O2
    assert key == "CC(C)Cc1ccc(C(C)C(=O)O)cc1" and graph.n_atoms == 33
    assert int((graph.atom_types == 2).sum()) == 18  # explicit hydrogens
    centred = graph.coords - graph.coords.mean(0)
    assert torch.linalg.svdvals(centred)[-1] > 1.0  # not flat: a real 3D conformer
    distances = torch.cdist(graph.coords, graph.coords)
    bonded = distances[graph.bond_types > 0]
    assert bonded.min() > 0.9 and bonded.max() < 1.9  # MMFF-relaxed bond lengths (Å)
    again, _ = smiles_to_graph("CC(C)Cc1ccc(C(C)C(=O)O)cc1", seed=7)
    assert again.coords.equal(graph.coords)
    for smiles, reason in {**BAD_TRAIN, **BAD_TEST, "[O-4]C": "unsupported_charge"}.items():
        assert smiles_to_graph(smiles) == reason


def test_build_counts_failures_and_splits(tiny_cache):
    cache, data = tiny_cache
    assert (data["n_read"], data["n_failed"], data["failures"]) == (N_READ, 4, FAILURES)
    assert {k: len(v) for k, v in data["split"].items()} == {"train": 6, "val": 2, "test": 3}
    assert torch.cat(list(data["split"].values())).sort().values.equal(torch.arange(11))
    train = moses3d_split(data, "train")
    assert train.coord_std == GEOM_COORD_STD
    assert data["size_counts"].equal(torch.bincount(train.sizes)) and int(data["size_counts"].sum()) == 6
    test_keys = {data["smiles"][i] for i in data["split"]["test"].tolist()}
    assert test_keys == set(VALID_TEST)  # MOSES's test file feeds our test split, its train file train + val
    assert (
        CHARGE_INDEX[1] in data["tensors"]["charges"].tolist()
        and CHARGE_INDEX[-1] in data["tensors"]["charges"].tolist()
    )
    assert (cache / "moses3d-v1.pt").is_file() and not (cache / "moses3d-v1.parts").exists()
    batch = train.batch([0, 1])
    assert torch.allclose(
        batch["coords"][0, : train.sizes[0]] * GEOM_COORD_STD,
        train.graph(0).coords - train.graph(0).coords.mean(0),
        atol=1e-4,
    )


def test_same_result_for_any_worker_count_and_chunking(tiny_dir, tiny_cache, tmp_path):
    _, reference = tiny_cache
    for workers, chunk_size in ((2, 500), (1, 3)):
        data = moses3d_module.preprocess_moses3d(
            tmp_path / f"{workers}-{chunk_size}",
            **SIZES,
            workers=workers,
            chunk_size=chunk_size,
            data_dir=tiny_dir,
        )
        _same(data, reference)


def test_resume_skips_finished_chunks(tiny_dir, tiny_cache, tmp_path, monkeypatch):
    convert = moses3d_module._smiles_to_arrays
    calls = []

    def crashing(item):
        if len(calls) == 5:  # dies inside the third chunk of 2
            raise RuntimeError("interrupted")
        calls.append(item)
        return convert(item)

    monkeypatch.setattr(moses3d_module, "_smiles_to_arrays", crashing)
    with pytest.raises(RuntimeError, match="interrupted"):
        load_moses3d(tmp_path, **SIZES, workers=1, progress=False, data_dir=tiny_dir, chunk_size=2)
    parts = sorted(p.name for p in (tmp_path / "moses3d-v1.parts").iterdir())
    assert parts == ["train-0.pt", "train-1.pt"] and not (tmp_path / "moses3d-v1.pt").exists()

    calls.clear()
    monkeypatch.setattr(moses3d_module, "_smiles_to_arrays", lambda item: calls.append(item) or convert(item))
    data = load_moses3d(tmp_path, **SIZES, workers=1, progress=False, data_dir=tiny_dir, chunk_size=2)
    assert len(calls) == N_READ - 4  # the two finished chunks are not converted again
    _same(data, tiny_cache[1])


def test_cache_with_other_sizes_is_refused(tiny_cache):
    cache, data = tiny_cache
    assert load_moses3d(cache)["sizes"] == data["sizes"]  # sizes left out: the cached ones
    with pytest.raises(ValueError, match=r"built with n_train=6, n_val=2, n_test=3, but n_train=24000"):
        load_moses3d(cache, n_train=24_000)


def test_too_few_molecules_is_an_error(tiny_dir, tmp_path):
    with pytest.raises(ValueError, match="only 8 of its 11 molecules converted, fewer than the 9"):
        moses3d_module.preprocess_moses3d(
            tmp_path, n_train=7, n_val=2, n_test=0, workers=1, data_dir=tiny_dir
        )


def test_missing_molsets_says_how_to_install(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(moses3d_module.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(MissingDataPackage, match=r"pip install --no-deps molsets==0\.3\.1"):
        load_moses3d(tmp_path)
    assert main(["data", "moses3d", "--cache-dir", str(tmp_path)]) == 2
    assert "pip install --no-deps molsets==0.3.1" in capsys.readouterr().err


def test_cli_data_summary_and_training_on_moses3d(tiny_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(moses3d_module, "moses_data_dir", lambda: tiny_dir)
    args = ["--n-train", "6", "--n-val", "2", "--n-test", "3", "--workers", "1", "--cache-dir", str(tmp_path)]
    assert main(["data", "moses3d", *args]) == 0
    out = capsys.readouterr().out
    assert (
        f"{N_READ} SMILES read, 4 dropped (invalid_smiles 1, unsupported_element 2, mmff_setup_failed 1)"
        in out
    )
    assert "11 kept; split train 6, val 2, test 3" in out and "s wall" in out

    run, model_dir = tmp_path / "run", tmp_path / "model"
    train = [
        "train",
        "--data",
        "moses3d",
        "--config",
        "tiny",
        "--cache-dir",
        str(tmp_path),
        "--out",
        str(run),
        "--val-minutes",
        "0",
        "--no-progress",
        "--threads",
        "1",
        "--batch-cost",
        "128",
    ]
    assert main([*train, "--steps", "2"]) == 0
    state = torch.load(run / CHECKPOINT, weights_only=True)
    assert state["model_config"]["coord_std"] == GEOM_COORD_STD
    assert state["train_config"]["data"] == "moses3d"
    assert tuple(state["train_config"]["bucket_limits"]) == DRUG_BUCKET_LIMITS
    assert state["size_counts"].equal(load_moses3d(tmp_path)["size_counts"])
    # --resume takes the run's data set (no --data given), and refuses another one
    resume = [
        "train",
        "--resume",
        "--cache-dir",
        str(tmp_path),
        "--out",
        str(run),
        "--no-progress",
        "--threads",
        "1",
    ]
    assert main([*resume, "--steps", "3"]) == 0
    assert torch.load(run / CHECKPOINT, weights_only=True)["step"] == 3
    assert main([*resume, "--data", "qm9", "--steps", "4"]) == 2
    # the exported model folder samples in GEOM units from the MOSES3D size histogram
    assert main(["train", "--out", str(run), "--export", str(model_dir)]) == 0
    assert json.loads((model_dir / "config.json").read_text())["coord_std"] == GEOM_COORD_STD
    model = load_pretrained_dir(model_dir)
    assert model.config.coord_std == GEOM_COORD_STD
    assert model.size_counts == {n: int(c) for n, c in enumerate(state["size_counts"].tolist()) if c}


def test_eval_on_moses3d_with_posebusters(tiny_cache, tmp_path):
    """`fastflow eval --data moses3d --posebusters`: the data row is MOSES3D test molecules (MMFF-relaxed, so
    PoseBusters passes them), and both rows carry the PoseBusters numbers. In a process of its own: PoseBusters
    binds RDKit's log to the sys.stderr of the moment, which pytest's capture closes afterwards."""
    from fastflow.models import Semla, SemlaConfig
    from fastflow.models.checkpoint import save_pretrained

    pytest.importorskip("posebusters")
    cache, _ = tiny_cache
    save_pretrained(Semla(SemlaConfig.preset("tiny", coord_std=GEOM_COORD_STD)), tmp_path / "model")
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "fastflow",
            "eval",
            "--checkpoint",
            str(tmp_path / "model"),
            "--n",
            "2",
            "--steps",
            "2",
            "--no-energy",
            "--json",
            "--data",
            "moses3d",
            "--cache-dir",
            str(cache),
            "--posebusters",
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    summary = json.loads(result.stdout)
    assert summary["data"] == "moses3d"
    assert summary["data_pb_valid"] == 1.0 and summary["data_pb_checked"] == 2
    assert 0.0 <= summary["pb_valid"] <= summary["validity"]
    command = result.args + ["--no-data-row"]
    without = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert without.returncode == 0, without.stderr[-2000:]
    generated_only = json.loads(without.stdout)
    assert not any(key.startswith("data_") for key in generated_only) and "novelty" in generated_only
    assert generated_only["pb_valid"] == summary["pb_valid"]  # same seed, same molecules
