"""QM9 preprocessing, the MiDi split, packed tensors, batches and size buckets, on the bundled fixture."""

import pytest
import torch

from fastflow.chem.vocab import QM9_COORD_STD
from fastflow.cli import main
from fastflow.data import MissingDataPackage, MolDataset, bucket_batches, load_qm9, midi_split, qm9_split
from fastflow.data import qm9 as qm9_module
from fastflow.data.qm9 import read_qm9_csv, xyz_to_graph
from tests.data.helpers import FIXTURE_CSV, N_FAILED, N_ROWS, N_TRAIN, fixture_data


def test_fixture_converts_and_counts_failures():
    data = fixture_data()
    kept = N_ROWS - N_FAILED
    assert (data["n_read"], data["n_failed"]) == (N_ROWS, N_FAILED)
    assert len(data["smiles"]) == len(data["qm9_index"]) == kept and all(data["smiles"])
    assert {k: len(v) for k, v in data["split"].items()} == {"train": N_TRAIN, "val": 10, "test": 4}
    assert torch.cat(list(data["split"].values())).sort().values.equal(torch.arange(kept))
    assert int(data["size_counts"].sum()) == N_TRAIN


def test_midi_split_is_deterministic_with_midi_sizes():
    split = midi_split(124_021)
    assert {k: len(v) for k, v in split.items()} == {"train": 100_000, "val": 11_619, "test": 12_402}
    again = midi_split(124_021)
    assert all((split[k] == again[k]).all() for k in split)
    with pytest.raises(ValueError, match="cannot take"):
        midi_split(10)


def test_xyz_parsing_reads_bare_decimal_points(tmp_path):
    # qm9pack writes "0." and "1." (not JSON); molecule 4 of QM9, acetylene, has such coordinates
    csv = tmp_path / "tiny.csv"
    csv.write_text(
        "Index,Elements,XYZ_Ang\n4,\"['C','C','H','H']\","
        '"[[0.5995394918,0.,1.],[-0.5995394918,0.,1.],[-1.6616385861,0.,1.],[1.6616385861,0.,1.]]"\n'
    )
    (record,) = read_qm9_csv([csv])
    graph, smiles = xyz_to_graph(record)
    assert smiles == "C#C" and graph.bond_types[0, 1] == 3 and graph.coords[0, 2] == 1.0


def test_batches_are_scaled_padded_and_symmetric():
    data = fixture_data()
    train = qm9_split(data, "train")
    batch = train.batch([0, 5, 7])
    sizes = train.sizes[[0, 5, 7]]
    B, N = 3, int(sizes.max())
    assert batch["coords"].shape == (B, N, 3) and batch["bonds"].shape == (B, N, N)
    assert batch["mask"].sum(-1).equal(sizes)
    assert batch["bonds"].equal(batch["bonds"].transpose(1, 2))
    assert (batch["bonds"].diagonal(dim1=1, dim2=2) == 0).all()
    padding = ~batch["mask"]
    assert (batch["coords"][padding] == 0).all() and (batch["atom_types"][padding] == 0).all()
    graph = train.graph(5)  # Å, as stored
    centred = graph.coords - graph.coords.mean(0)
    n = graph.n_atoms
    assert torch.allclose(batch["coords"][1, :n] * QM9_COORD_STD, centred, atol=1e-5)
    assert batch["bonds"][1, :n, :n].equal(graph.bond_types)
    assert batch["atom_types"][1, :n].equal(graph.atom_types)


def test_bucket_batches_cover_each_molecule_once_within_the_cost():
    sizes = torch.tensor([5, 12, 13, 16, 17, 29, 20, 20, 21, 40, 9, 9])
    batches = bucket_batches(sizes, 40, torch.Generator().manual_seed(0))
    assert sorted(i for b in batches for i in b) == list(range(len(sizes)))
    limits = torch.tensor([12, 16, 18, 20, 22, 24, 30, 40])
    for b in batches:
        limit = int(limits[torch.searchsorted(limits, sizes[b].max())])
        assert len(b) == 1 or len(b) * limit <= 40
        assert len(set(torch.searchsorted(limits, sizes[b]).tolist())) == 1  # one bucket per batch
    assert batches == bucket_batches(sizes, 40, torch.Generator().manual_seed(0))


def test_dataset_over_explicit_indices():
    data = fixture_data()
    full = MolDataset(data["tensors"])
    test = qm9_split(data, "test")
    i = int(data["split"]["test"][2])
    assert full.graph(i).atom_types.equal(test.graph(2).atom_types)


def test_missing_qm9pack_says_how_to_install(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(qm9_module.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(MissingDataPackage, match=r"pip install fastflow\[train\].*qm9pack==1\.0\.3"):
        load_qm9(tmp_path)
    assert main(["data", "qm9", "--cache-dir", str(tmp_path)]) == 2
    assert "pip install fastflow[train]" in capsys.readouterr().err


def test_fixture_file_is_small():
    assert FIXTURE_CSV.stat().st_size < 64_000
