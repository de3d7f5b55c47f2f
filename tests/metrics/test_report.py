import math

import pytest
import torch
from rdkit import Chem

from fastflow.chem import ATOM_INDEX, mol_to_graph
from fastflow.metrics import (
    aggregate_metrics,
    compute_metrics,
    format_metrics_table,
    mmff_energy,
    molecule_records,
    run_summary,
    summary_metrics,
)
from fastflow.metrics.molecules import SANITIZE_FAILURES
from tests.chem.helpers import cdk2_mols, star

FAILURE_KEYS = {f"invalid_{kind}" for kind in SANITIZE_FAILURES}
GRAPH_KEYS = {
    "n",
    "atom_stability",
    "mol_stability",
    "validity",
    "connected_validity",
    "uniqueness",
} | FAILURE_KEYS
ENERGY_KEYS = {
    "energy_validity",
    "opt_energy_validity",
    "energy",
    "energy_per_atom",
    "strain",
    "strain_per_atom",
    "opt_rmsd",
    "energy_per_atom_sem",
    "strain_per_atom_sem",
}


def test_real_molecules():
    graphs = [mol_to_graph(m) for m in cdk2_mols()[:12]]
    train = [Chem.MolToSmiles(m) for m in cdk2_mols()[:3]]
    metrics = compute_metrics(graphs, train_smiles=train)
    assert set(metrics) == GRAPH_KEYS | ENERGY_KEYS | {"novelty"}
    assert metrics["n"] == 12
    for key in (
        "atom_stability",
        "mol_stability",
        "validity",
        "connected_validity",
        "uniqueness",
        "energy_validity",
        "opt_energy_validity",
    ):
        assert metrics[key] == 1.0, key
    assert metrics["novelty"] == 0.75
    assert metrics["strain"] > 0 and metrics["strain_per_atom"] > 0 and math.isfinite(metrics["energy"])
    per_atom = torch.tensor([mmff_energy(g.to_rdkit()) / g.n_atoms for g in graphs], dtype=torch.float64)
    assert metrics["energy_per_atom"] == pytest.approx(per_atom.mean().item())
    assert metrics["energy_per_atom_sem"] == pytest.approx(per_atom.std().item() / math.sqrt(12))


def test_failures_count_in_denominators_only():
    graphs = [mol_to_graph(m) for m in cdk2_mols()[:3]]
    bad = star("C", 4)
    bad.atom_types[0] = ATOM_INDEX["<PAD>"]
    metrics = compute_metrics(graphs + [bad, graphs[0]])
    assert "novelty" not in metrics
    assert metrics["validity"] == metrics["energy_validity"] == 4 / 5
    assert metrics["invalid_unbuildable"] == 1 / 5 and metrics["invalid_valence"] == 0
    assert metrics["mol_stability"] == 4 / 5
    assert metrics["uniqueness"] == 3 / 4
    full = compute_metrics(graphs + [graphs[0]])
    assert metrics["energy"] == pytest.approx(full["energy"])  # the failed molecule is left out


def test_mols_argument_and_errors():
    graphs = [mol_to_graph(m) for m in cdk2_mols()[:2]]
    metrics = compute_metrics(graphs, mols=[None, None], energy=False)
    assert set(metrics) == GRAPH_KEYS
    assert metrics["validity"] == 0.0 and math.isnan(metrics["uniqueness"])
    with pytest.raises(ValueError, match="one to one"):
        compute_metrics(graphs, mols=[None])
    with pytest.raises(ValueError, match="at least one"):
        compute_metrics([])


def test_format_metrics_table():
    table = format_metrics_table(
        {
            "generated": {"n": 10, "validity": 0.91234, "novelty": float("nan")},
            "data": {"n": 5, "validity": 1.0},
        }
    )
    lines = table.splitlines()
    assert lines[0].split() == ["metric", "generated", "data"]
    assert lines[2].split() == ["n", "10", "5"]
    assert lines[3].split() == ["validity", "0.9123", "1.0000"]
    assert lines[4].split() == ["novelty", "-", "-"]


def test_records_of_parts_give_the_metrics_of_the_whole_set():
    """A shard merge aggregates the concatenated records of its shards: the numbers of one run over all."""
    graphs = [mol_to_graph(mol) for mol in cdk2_mols()[:6]]
    graphs += graphs[:2]  # duplicates: uniqueness and novelty are set-level
    mols = [graph.to_rdkit() for graph in graphs]
    mols[3] = None  # a molecule RDKit could not build
    train = [Chem.MolToSmiles(cdk2_mols()[0])]
    whole = compute_metrics(graphs, mols, train_smiles=train, energy=True)
    parts = [molecule_records(graphs[a:b], mols[a:b]) for a, b in ((0, 3), (3, 5), (5, 8))]
    merged = aggregate_metrics({key: [v for part in parts for v in part[key]] for key in parts[0]}, train)
    assert 0 < whole["uniqueness"] < 1 and whole["validity"] < 1 and 0 < whole["novelty"] < 1
    assert list(merged) == list(whole)
    for key, value in merged.items():  # exactly: the same sums in the same order
        assert value == whole[key] or (math.isnan(value) and math.isnan(whole[key])), key


def test_run_summary_puts_the_metrics_first_and_the_rate_from_n():
    metrics = {"n": 10, "validity": 0.9}
    run = dict(seed=0, schedule="log", model="m", cache="none", cache_hit_rate=0.0, kernels="cpp")
    summary = run_summary(metrics, steps=5, nfe=50, seconds=4.0, precision="fp32", threads=2, **run, shards=3)
    assert summary_metrics(summary) == metrics
    assert summary["molecules_per_second"] == 2.5 and list(summary)[-1] == "shards"
