"""MolDataset on hand-built molecules: the Kekulé rewrite of a subset's aromatic bonds."""

import pytest
import torch

from fastflow.chem import kekulize_graph
from fastflow.data import MolDataset
from fastflow.data.dataset import pack_graphs
from tests.chem.helpers import graph, graph_from_smiles


def test_kekulized_dataset_rewrites_only_its_subset_and_copies():
    graphs = [graph_from_smiles(s) for s in ("c1ccccc1", "c1ccncc1", "CCO", "c1cc[nH]c1")]
    packed = pack_graphs(graphs)
    subset = MolDataset(packed, indices=[0, 2, 3])
    kekule = subset.kekulized()
    for i, original in enumerate([graphs[0], graphs[2], graphs[3]]):
        rewritten = kekule.graph(i)
        assert not (rewritten.bond_types == 4).any()
        assert torch.equal(rewritten.bond_types, kekulize_graph(original).bond_types)
    assert (subset.graph(0).bond_types == 4).any()  # the source is unchanged
    outside = MolDataset(kekule.tensors, indices=[1]).graph(0)  # not in the subset: kept aromatic
    assert (outside.bond_types == 4).any()
    batch = kekule.batch([0, 1, 2])
    assert not (batch["bonds"] == 4).any() and torch.equal(batch["bonds"], batch["bonds"].transpose(1, 2))


def test_kekulized_dataset_names_a_molecule_without_a_kekule_structure():
    ring = {(i, (i + 1) % 5): 4 for i in range(5)}
    impossible = graph(["C"] * 5 + ["H"] * 5, {**ring, **{(i, i + 5): 1 for i in range(5)}})
    dataset = MolDataset(pack_graphs([graph_from_smiles("CCO"), impossible]))
    with pytest.raises(ValueError, match="molecule 1: .*no Kekulé structure"):
        dataset.kekulized()
