"""RDKit molecules → tensors (:func:`mol_to_graph`) and canonical SMILES; tensors → RDKit is
:meth:`MolGraph.to_rdkit` (:func:`fastflow.chem.graph.graph_to_mol`)."""

from __future__ import annotations

import torch
from rdkit import Chem, rdBase

from fastflow.chem.graph import BOND_CLASS, FIRST_ELEMENT, MolGraph
from fastflow.chem.vocab import ATOM_INDEX, CHARGE_INDEX


def mol_to_graph(mol: Chem.Mol) -> MolGraph:
    """Tensors from an RDKit molecule whose hydrogens are explicit atoms and whose conformer 0 is 3D.

    Bond types are taken as they are (aromatic stays class 4, as upstream's ``GeometricMol.from_rdkit``);
    kekulize the molecule first for a kekulized graph. Raises ``ValueError`` for anything the vocabularies
    cannot represent.
    """
    if mol.GetNumAtoms() == 0:
        raise ValueError("molecule has no atoms")
    if mol.GetNumConformers() == 0 or not mol.GetConformer().Is3D():
        raise ValueError("molecule needs a 3D conformer")
    probe = Chem.Mol(mol)
    probe.UpdatePropertyCache(strict=False)
    if any(atom.GetTotalNumHs() > 0 for atom in probe.GetAtoms()):
        raise ValueError("molecule has implicit hydrogens; call Chem.AddHs(mol, addCoords=True) first")

    atom_types, charges = [], []
    for atom in mol.GetAtoms():
        symbol, charge = atom.GetSymbol(), atom.GetFormalCharge()
        if symbol not in ATOM_INDEX or ATOM_INDEX[symbol] < FIRST_ELEMENT:
            raise ValueError(f"element {symbol!r} is not in ATOM_VOCAB")
        if charge not in CHARGE_INDEX:
            raise ValueError(f"formal charge {charge} on atom {atom.GetIdx()} is not in CHARGES")
        atom_types.append(ATOM_INDEX[symbol])
        charges.append(CHARGE_INDEX[charge])

    n = mol.GetNumAtoms()
    bond_types = torch.zeros(n, n, dtype=torch.long)
    for bond in mol.GetBonds():
        if bond.GetBondType() not in BOND_CLASS:
            raise ValueError(f"unsupported bond type {bond.GetBondType()} on bond {bond.GetIdx()}")
        i, j = bond.GetBeginAtomIdx(), bond.GetEndAtomIdx()
        bond_types[i, j] = bond_types[j, i] = BOND_CLASS[bond.GetBondType()]

    return MolGraph(
        coords=torch.tensor(mol.GetConformer().GetPositions(), dtype=torch.float32),
        atom_types=torch.tensor(atom_types, dtype=torch.long),
        bond_types=bond_types,
        charges=torch.tensor(charges, dtype=torch.long),
    )


def kekulize_graph(graph: MolGraph) -> MolGraph:
    """The same molecule with its aromatic bonds (class 4) written as RDKit's Kekulé single and double bonds.

    For training on Kekulé structures (FlowMol-style): the model then never predicts an aromatic ring that has
    no Kekulé form. Raises ``ValueError`` if the graph does not sanitise or has no Kekulé structure.
    """
    bonds = graph.symmetric_bonds()
    if not (bonds == BOND_CLASS[Chem.BondType.AROMATIC]).any():
        return graph
    mol = graph.to_rdkit(sanitize=True)  # sanitising kekulizes: a molecule that passes has a Kekulé structure
    if mol is None:
        raise ValueError("the molecule does not sanitise, so it has no Kekulé structure")
    Chem.Kekulize(mol, clearAromaticFlags=True)
    kekule = torch.zeros_like(bonds)
    for bond in mol.GetBonds():
        i, j = bond.GetBeginAtomIdx(), bond.GetEndAtomIdx()
        kekule[i, j] = kekule[j, i] = BOND_CLASS[bond.GetBondType()]
    return MolGraph(graph.coords, graph.atom_types, kekule, graph.charges)


def canonical_smiles(mol: Chem.Mol | None, explicit_hs: bool = False, isomeric: bool = True) -> str | None:
    """Canonical SMILES, or None if ``mol`` is None or RDKit fails.

    ``explicit_hs=False`` removes hydrogens first (heavy-atom SMILES); ``True`` writes every hydrogen as
    an atom (``AddHs`` first). ``isomeric=False`` drops stereo and isotope labels.
    """
    if mol is None:
        return None
    with rdBase.BlockLogs():
        try:
            if not isomeric:  # first, so RemoveHs also drops Hs that only defined double-bond stereo
                mol = Chem.Mol(mol)
                Chem.RemoveStereochemistry(mol)
            mol = Chem.AddHs(mol) if explicit_hs else Chem.RemoveHs(mol)
            return Chem.MolToSmiles(mol, isomericSmiles=isomeric)
        except Exception:
            return None
