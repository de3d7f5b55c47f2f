"""PoseBusters numbers of generated molecules: PB-valid over all molecules, per-check failure rates over the
molecules RDKit could build."""

import pytest
from rdkit import Chem
from rdkit.Chem import AllChem

from fastflow.metrics import compute_metrics
from fastflow.metrics.posebusters import posebusters_metrics

pytest.importorskip("posebusters")


def relaxed(smiles: str, seed: int = 3) -> Chem.Mol:
    mol = Chem.AddHs(Chem.MolFromSmiles(smiles))
    assert AllChem.EmbedMolecule(mol, randomSeed=seed) == 0
    AllChem.MMFFOptimizeMolecule(mol)
    return mol


def squashed(mol: Chem.Mol, factor: float = 0.6) -> Chem.Mol:
    """Every coordinate scaled by ``factor``: bonds far too short, atoms clashing."""
    mol = Chem.Mol(mol)
    conformer = mol.GetConformer()
    for i in range(mol.GetNumAtoms()):
        conformer.SetAtomPosition(i, conformer.GetAtomPosition(i) * factor)
    return mol


def test_relaxed_molecules_pass_and_a_squashed_one_fails_its_geometry():
    good = [relaxed("CC(=O)Nc1ccc(O)cc1"), relaxed("CCOC(=O)c1ccccc1")]
    metrics = posebusters_metrics(good + [squashed(good[0]), None])
    assert metrics["pb_checked"] == 3
    assert metrics["pb_valid"] == pytest.approx(2 / 4)  # the unbuildable molecule counts as a failure
    assert metrics["pb_valid_of_valid"] == pytest.approx(2 / 3)
    assert metrics["pb_fail_bond_lengths"] == pytest.approx(1 / 3)
    assert metrics["pb_fail_sanitization"] == 0.0


def test_compute_metrics_adds_them_only_when_asked():
    from fastflow.chem import mol_to_graph

    mols = [relaxed("CC(=O)Nc1ccc(O)cc1")]
    graphs = [mol_to_graph(mols[0])]
    assert "pb_valid" not in compute_metrics(graphs, mols, energy=False)
    assert compute_metrics(graphs, mols, energy=False, posebusters=True)["pb_valid"] == 1.0


def test_nothing_to_check_is_an_error_and_nothing_buildable_is_zero():
    with pytest.raises(ValueError, match="at least one molecule"):
        posebusters_metrics([])
    metrics = posebusters_metrics([None, None])
    assert metrics["pb_valid"] == 0.0 and metrics["pb_checked"] == 0
