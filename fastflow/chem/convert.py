"""Tensors ⇄ RDKit molecules with SemlaFlow's semantics (upstream ``util/rdkit.py: mol_from_atoms``)."""

from __future__ import annotations

import torch
from rdkit import Chem, rdBase

from fastflow.chem.graph import MolGraph, strict_lower
from fastflow.chem.vocab import ATOM_INDEX, ATOM_VOCAB, CHARGE_INDEX, CHARGES

_FIRST_ELEMENT = 2  # vocabulary indices 0 and 1 are <PAD> and <MASK>
_RDKIT_BOND = {
    1: Chem.BondType.SINGLE,
    2: Chem.BondType.DOUBLE,
    3: Chem.BondType.TRIPLE,
    4: Chem.BondType.AROMATIC,
}
_BOND_CLASS = {rdkit_type: cls for cls, rdkit_type in _RDKIT_BOND.items()}


def graph_to_mol(graph: MolGraph, sanitize: bool = True) -> Chem.Mol | None:
    """Build an RDKit molecule exactly as SemlaFlow does; None when that fails.

    Atoms from tokens (any ``<PAD>``/``<MASK>`` fails the molecule), formal charges, one 3D conformer, and
    one bond per strict-lower-triangle entry (i > j) with class > 0. Hydrogens are only those in the graph;
    RDKit may still add implicit ones during sanitisation, as upstream. With ``sanitize`` a molecule that
    fails ``SanitizeMol`` gives None. RDKit's log output is silenced.
    """
    atom_types = graph.atom_types.tolist()
    if min(atom_types) < _FIRST_ELEMENT:
        return None
    charges = graph.charges.tolist()
    bonds = strict_lower(graph.bond_types.cpu())
    starts, ends = bonds.nonzero(as_tuple=True)  # row-major, as upstream's bond list

    with rdBase.BlockLogs():
        editable = Chem.RWMol()
        for type_idx, charge_idx in zip(atom_types, charges):
            atom = Chem.Atom(ATOM_VOCAB[type_idx])
            atom.SetFormalCharge(CHARGES[charge_idx])
            editable.AddAtom(atom)
        for i, j, cls in zip(starts.tolist(), ends.tolist(), bonds[starts, ends].tolist()):
            editable.AddBond(i, j, _RDKIT_BOND[cls])
        mol = editable.GetMol()

        conformer = Chem.Conformer(graph.n_atoms)
        for idx, xyz in enumerate(graph.coords.double().tolist()):
            conformer.SetAtomPosition(idx, xyz)
        conformer.Set3D(True)
        mol.AddConformer(conformer, assignId=True)

        try:
            for atom in mol.GetAtoms():
                atom.UpdatePropertyCache(strict=False)
            if sanitize:
                Chem.SanitizeMol(mol)
        except Exception:
            return None
    return mol


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
        if symbol not in ATOM_INDEX or ATOM_INDEX[symbol] < _FIRST_ELEMENT:
            raise ValueError(f"element {symbol!r} is not in ATOM_VOCAB")
        if charge not in CHARGE_INDEX:
            raise ValueError(f"formal charge {charge} on atom {atom.GetIdx()} is not in CHARGES")
        atom_types.append(ATOM_INDEX[symbol])
        charges.append(CHARGE_INDEX[charge])

    n = mol.GetNumAtoms()
    bond_types = torch.zeros(n, n, dtype=torch.long)
    for bond in mol.GetBonds():
        if bond.GetBondType() not in _BOND_CLASS:
            raise ValueError(f"unsupported bond type {bond.GetBondType()} on bond {bond.GetIdx()}")
        i, j = bond.GetBeginAtomIdx(), bond.GetEndAtomIdx()
        bond_types[i, j] = bond_types[j, i] = _BOND_CLASS[bond.GetBondType()]

    return MolGraph(
        coords=torch.tensor(mol.GetConformer().GetPositions(), dtype=torch.float32),
        atom_types=torch.tensor(atom_types, dtype=torch.long),
        bond_types=bond_types,
        charges=torch.tensor(charges, dtype=torch.long),
    )


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
