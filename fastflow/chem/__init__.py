"""Chemistry: vocabularies, tensors ⇄ RDKit molecules, SDF I/O."""

from fastflow.chem.convert import canonical_smiles, kekulize_graph, mol_to_graph
from fastflow.chem.graph import MolGraph, graph_to_mol
from fastflow.chem.sdf import read_sdf, write_sdf
from fastflow.chem.vocab import (
    ATOM_INDEX,
    ATOM_VOCAB,
    BOND_ORDERS,
    CHARGE_INDEX,
    CHARGES,
    GEOM_COORD_STD,
    N_ATOM_TYPES,
    N_BOND_TYPES,
    N_CHARGE_TYPES,
    QM9_COORD_STD,
)
