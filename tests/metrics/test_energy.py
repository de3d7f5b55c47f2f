import numpy as np
import pytest
from rdkit import Chem
from rdkit.Chem import AllChem

from fastflow.chem import graph_to_mol
from fastflow.metrics import kabsch_rmsd, mmff_energy, mmff_evaluate, mmff_strain
from tests.chem.helpers import cdk2_mols, graph


def _minimised(mol):
    mol = Chem.Mol(mol)
    AllChem.MMFFOptimizeMolecule(mol, maxIters=10_000)
    return mol


def _perturbed(mol, sigma=0.1, seed=0):
    mol = Chem.Mol(mol)
    conf = mol.GetConformer()
    noisy = conf.GetPositions() + np.random.default_rng(seed).normal(0, sigma, (mol.GetNumAtoms(), 3))
    for i, xyz in enumerate(noisy):
        conf.SetAtomPosition(i, xyz.tolist())
    return mol


def test_energies_finite_and_strain_non_negative():
    for mol in cdk2_mols()[:10]:
        result = mmff_evaluate(mol)
        assert np.isfinite(result.energy) and np.isfinite(result.opt_energy)
        assert result.strain > -1e-6 and result.opt_rmsd >= 0
        assert result.energy == pytest.approx(mmff_energy(mol))
        assert result.n_atoms == mol.GetNumAtoms()


def test_minimised_pose_has_no_strain_and_noise_raises_it():
    mol = _minimised(cdk2_mols()[0])
    assert mmff_strain(mol) == pytest.approx(0.0, abs=1e-3)
    assert mmff_evaluate(mol).opt_rmsd < 1e-2
    assert mmff_strain(_perturbed(mol)) > 10.0


def test_strain_matches_upstream_recipe():
    mol = cdk2_mols()[1]
    optimised = Chem.Mol(mol)
    AllChem.MMFFOptimizeMolecule(optimised, maxIters=1000)
    assert mmff_strain(mol) == pytest.approx(mmff_energy(mol) - mmff_energy(optimised), abs=1e-6)


def test_does_not_modify_input():
    mol = cdk2_mols()[2]
    before = mol.GetConformer().GetPositions()
    mmff_evaluate(mol)
    np.testing.assert_array_equal(mol.GetConformer().GetPositions(), before)


def test_failures_give_none():
    mercury = graph_to_mol(graph(["Hg"], {}))  # sanitises, but MMFF has no parameters for Hg
    assert mercury is not None
    assert mmff_energy(mercury) is None and mmff_strain(mercury) is None
    assert mmff_energy(None) is None and mmff_evaluate(None).energy is None


def test_kabsch_rmsd():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(10, 3))
    q, _ = np.linalg.qr(rng.normal(size=(3, 3)))
    rotation = q * np.sign(np.linalg.det(q))  # proper rotation
    assert kabsch_rmsd(a, a @ rotation.T + 3.0) == pytest.approx(0.0, abs=1e-6)
    assert kabsch_rmsd(a, -a) > 0.1  # a reflection is not a rotation
