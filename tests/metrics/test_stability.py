import pytest
import torch

from fastflow.chem import ATOM_INDEX, mol_to_graph
from fastflow.metrics import atom_stabilities, atom_valences, stability
from tests.chem.helpers import cdk2_mols, graph, graph_from_smiles, star


@pytest.mark.parametrize("table", ["semlaflow", "revisited"])
def test_real_molecules_are_stable(table):
    graphs = [mol_to_graph(m) for m in cdk2_mols()]
    assert stability(graphs, table) == (1.0, 1.0)


@pytest.mark.parametrize("table", ["semlaflow", "revisited"])
def test_over_valent_carbon_is_unstable(table):
    assert atom_stabilities(star("C", 5), table) == [False] + [True] * 5
    assert stability([star("C", 5), star("C", 4)], table) == (10 / 11, 0.5)


def test_three_valent_carbon_upstream_table_quirk():
    # SemlaFlow's table allows neutral C with valence 3 (a radical); the Revisited table does not.
    assert atom_stabilities(star("C", 3)) == [True] * 4
    assert atom_stabilities(star("C", 3), "revisited") == [False] + [True] * 3


@pytest.mark.parametrize("table", ["semlaflow", "revisited"])
def test_charged_ammonium_is_stable(table):
    assert all(atom_stabilities(star("N", 4, charge=1), table))
    assert not atom_stabilities(star("N", 4), table)[0]  # neutral N with 4 bonds


def test_aromatic_bond_counts_one_as_upstream():
    benzene = graph_from_smiles("c1ccccc1")
    assert atom_valences(benzene)[:6].tolist() == [3] * 6  # 2 aromatic (1 each) + 1 H
    pyrrole = graph_from_smiles("c1cc[nH]c1")
    n = pyrrole.atom_types.tolist().index(ATOM_INDEX["N"])
    # 2 aromatic + 1 H = 3: stable upstream; counting 1.5 per aromatic bond would give 4 (unstable).
    assert atom_valences(pyrrole)[n] == 3
    for table in ("semlaflow", "revisited"):
        assert all(atom_stabilities(benzene, table)) and all(atom_stabilities(pyrrole, table))
    assert atom_valences(graph_from_smiles("c1ccccc1", kekulize=True))[:6].tolist() == [4] * 6


def test_only_lower_triangle_counts():
    g = star("C", 4)
    g.bond_types = torch.triu(g.bond_types)
    assert atom_valences(g).tolist() == [0] * 5


def test_special_tokens_and_unknown_charges_are_unstable():
    g = star("C", 4)
    g.atom_types[1] = ATOM_INDEX["<PAD>"]
    assert atom_stabilities(g) == [True, False, True, True, True]
    fluoride_plus = graph(["F"], {}, [1])  # F has no +1 entry
    assert atom_stabilities(fluoride_plus) == [False]
    boron_minus = graph(["B", "H", "H", "H"], {(1, 0): 1, (2, 0): 1, (3, 0): 1}, [-1, 0, 0, 0])
    assert atom_stabilities(boron_minus)[0]  # upstream's B entry ignores the charge


def test_unknown_table_raises():
    with pytest.raises(ValueError, match="valence_table must be"):
        atom_stabilities(star("C", 4), "midi")
