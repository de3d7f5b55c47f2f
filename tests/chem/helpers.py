"""Small molecules for chem and metrics tests: RDKit's bundled 3D set and hand-built graphs."""

import os
from functools import lru_cache

import torch
from rdkit import Chem, RDConfig
from rdkit.Chem import AllChem

from fastflow.chem import ATOM_INDEX, CHARGE_INDEX, MolGraph, mol_to_graph, read_sdf

# 47 molecules, 3D, explicit H
CDK2_SDF = os.path.join(RDConfig.RDContribDir, "Fastcluster", "testdata", "cdk2.sdf")


@lru_cache
def cdk2_mols() -> tuple[Chem.Mol, ...]:
    return tuple(read_sdf(CDK2_SDF))


def graph_from_smiles(smiles: str, kekulize: bool = False, seed: int = 0) -> MolGraph:
    """Embedded (ETKDG) molecule with explicit H as a graph; aromatic bonds stay class 4 unless kekulized."""
    mol = Chem.AddHs(Chem.MolFromSmiles(smiles))
    assert AllChem.EmbedMolecule(mol, randomSeed=seed) == 0
    if kekulize:
        Chem.Kekulize(mol, clearAromaticFlags=True)
    return mol_to_graph(mol)


def graph(symbols: list[str], bonds: dict[tuple[int, int], int], charges: list[int] | None = None):
    """Hand-built graph with arbitrary coordinates; ``bonds`` maps (i, j) to a bond class."""
    n = len(symbols)
    bond_types = torch.zeros(n, n, dtype=torch.long)
    for (i, j), cls in bonds.items():
        bond_types[i, j] = bond_types[j, i] = cls
    return MolGraph(
        coords=torch.randn(n, 3, generator=torch.Generator().manual_seed(0)) * 2,
        atom_types=torch.tensor([ATOM_INDEX[s] for s in symbols]),
        bond_types=bond_types,
        charges=torch.tensor([CHARGE_INDEX[c] for c in charges or [0] * n]),
    )


def star(center: str, n_h: int, charge: int = 0) -> MolGraph:
    """``center`` bonded to ``n_h`` hydrogens (CH4, CH5, NH4+, ...)."""
    return graph([center] + ["H"] * n_h, {(k, 0): 1 for k in range(1, n_h + 1)}, [charge] + [0] * n_h)
