import numpy as np
import pytest
import torch
from rdkit import Chem
from rdkit.Chem import AllChem

from fastflow.chem import ATOM_INDEX, canonical_smiles, graph_to_mol, kekulize_graph, mol_to_graph

from .helpers import cdk2_mols, graph, graph_from_smiles, star


def test_round_trip_keeps_molecules():
    for mol in cdk2_mols():
        g = mol_to_graph(mol)
        back = graph_to_mol(g)
        assert back is not None
        assert back.GetNumAtoms() == mol.GetNumAtoms() == g.n_atoms
        assert canonical_smiles(back, isomeric=False) == canonical_smiles(mol, isomeric=False)
        assert [a.GetFormalCharge() for a in back.GetAtoms()] == [a.GetFormalCharge() for a in mol.GetAtoms()]
        positions = back.GetConformer().GetPositions()
        np.testing.assert_allclose(positions, mol.GetConformer().GetPositions(), atol=1e-5)


def test_mol_to_graph_keeps_aromatic_bonds_as_class_4():
    g = graph_from_smiles("c1ccccc1")
    ring = g.bond_types[:6, :6]
    assert (ring == 4).sum() == 12 and torch.equal(ring, ring.T)
    kekule = graph_from_smiles("c1ccccc1", kekulize=True)
    assert sorted(kekule.bond_types[:6, :6].unique().tolist()) == [0, 1, 2]


@pytest.mark.parametrize("smiles", ["c1ccccc1O", "c1cc[nH]c1", "c1ccc2ccccc2c1", "Cc1nc(-c2ccsc2)co1"])
def test_kekulize_graph_writes_single_and_double_bonds_for_the_same_molecule(smiles):
    aromatic = graph_from_smiles(smiles)
    kekule = kekulize_graph(aromatic)
    assert (aromatic.bond_types == 4).any() and not (kekule.bond_types == 4).any()
    assert torch.equal(kekule.bond_types, kekule.bond_types.T)
    assert torch.equal((kekule.bond_types > 0), (aromatic.bond_types > 0))  # same bonds, new orders
    assert kekule.coords is aromatic.coords and torch.equal(kekule.atom_types, aromatic.atom_types)
    assert canonical_smiles(graph_to_mol(kekule)) == canonical_smiles(graph_to_mol(aromatic))


def test_kekulize_graph_keeps_graphs_without_aromatic_bonds_and_refuses_impossible_rings():
    ethanol = graph_from_smiles("CCO")
    assert kekulize_graph(ethanol) is ethanol
    ring = {(i, (i + 1) % 5): 4 for i in range(5)}  # an all-carbon aromatic 5-ring, each C with one H
    cyclopentadienyl = graph(["C"] * 5 + ["H"] * 5, {**ring, **{(i, i + 5): 1 for i in range(5)}})
    with pytest.raises(ValueError, match="no Kekulé structure"):
        kekulize_graph(cyclopentadienyl)


def test_aromatic_bond_classes_sanitise_like_upstream():
    mol = graph_to_mol(graph_from_smiles("c1ccncc1"))
    assert canonical_smiles(mol) == "c1ccncc1"


@pytest.mark.parametrize("token", ["<PAD>", "<MASK>"])
def test_special_token_gives_none(token):
    g = star("C", 4)
    g.atom_types[2] = ATOM_INDEX[token]
    assert graph_to_mol(g) is None
    assert graph_to_mol(g, sanitize=False) is None


def test_upper_triangle_is_ignored():
    g = star("C", 4)
    g.bond_types = torch.triu(g.bond_types)  # keep only the upper triangle
    assert graph_to_mol(g).GetNumBonds() == 0


def test_sanitize_failure_gives_none_and_unsanitised_mol_is_returned():
    over_valent = star("C", 5)
    assert graph_to_mol(over_valent) is None
    assert graph_to_mol(over_valent, sanitize=False).GetNumAtoms() == 6


def test_charges_and_conformer():
    mol = graph_to_mol(star("N", 4, charge=1))
    assert mol.GetAtomWithIdx(0).GetFormalCharge() == 1
    assert mol.GetNumConformers() == 1 and mol.GetConformer().Is3D()


def test_mol_to_graph_errors():
    no_conformer = Chem.AddHs(Chem.MolFromSmiles("CO"))
    with pytest.raises(ValueError, match="3D conformer"):
        mol_to_graph(no_conformer)
    implicit_h = Chem.MolFromSmiles("CO")
    AllChem.EmbedMolecule(implicit_h, randomSeed=0)
    with pytest.raises(ValueError, match="implicit hydrogens"):
        mol_to_graph(implicit_h)
    sodium = Chem.MolFromSmiles("[Na+]")
    AllChem.EmbedMolecule(sodium, randomSeed=0)
    with pytest.raises(ValueError, match="'Na' is not in ATOM_VOCAB"):
        mol_to_graph(sodium)


def test_canonical_smiles():
    mol = graph_to_mol(graph_from_smiles("C[C@H](N)O"))  # no stereo perceived from the graph
    assert canonical_smiles(mol) == "CC(N)O"
    assert canonical_smiles(mol, explicit_hs=True).count("[H]") == 7
    assert canonical_smiles(Chem.MolFromSmiles("C[C@H](N)O"), isomeric=False) == "CC(N)O"
    assert canonical_smiles(None) is None
