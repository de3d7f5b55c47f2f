"""``MolGraph``: one generated molecule as unpadded tensors (coordinates, atom types, bonds, charges)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from rdkit import Chem, rdBase
from torch import Tensor

from fastflow.chem.vocab import ATOM_VOCAB, CHARGES, N_ATOM_TYPES, N_BOND_TYPES, N_CHARGE_TYPES


@dataclass
class MolGraph:
    """One molecule with ``n`` atoms, no padding.

    Arguments:
        coords: (n, 3) floating point, Å.
        atom_types: (n,) long, indices into ``ATOM_VOCAB`` (0 ``<PAD>`` and 1 ``<MASK>`` are allowed here;
            such a molecule simply fails to convert).
        bond_types: (n, n) long bond classes (0 none, 1 single, 2 double, 3 triple, 4 aromatic). Only the
            strict lower triangle (i > j) is read, as upstream SemlaFlow does.
        charges: (n,) long, indices into ``CHARGES``.
    """

    coords: Tensor
    atom_types: Tensor
    bond_types: Tensor
    charges: Tensor

    def __post_init__(self) -> None:
        if not isinstance(self.atom_types, Tensor) or self.atom_types.dim() != 1:
            got = f"{type(self.atom_types).__name__} {tuple(getattr(self.atom_types, 'shape', ()))}"
            raise ValueError(f"atom_types must be a tensor of shape (n,), got {got}")
        n = self.atom_types.shape[0]
        if n < 1:
            raise ValueError("a MolGraph needs at least one atom, got n = 0")
        _check("coords", self.coords, (n, 3), floating=True)
        _check("atom_types", self.atom_types, (n,), n_classes=N_ATOM_TYPES)
        _check("bond_types", self.bond_types, (n, n), n_classes=N_BOND_TYPES)
        _check("charges", self.charges, (n,), n_classes=N_CHARGE_TYPES)
        if not torch.isfinite(self.coords).all():
            raise ValueError("coords contain NaN or inf")

    @property
    def n_atoms(self) -> int:
        return self.atom_types.shape[0]

    @classmethod
    def from_predictions(
        cls, coords: Tensor, atom_scores: Tensor, bond_scores: Tensor, charge_scores: Tensor
    ) -> MolGraph:
        """Argmax per-molecule model outputs (logits or probabilities) into a graph.

        Arguments:
            coords: (n, 3); atom_scores: (n, N_ATOM_TYPES); bond_scores: (n, n, N_BOND_TYPES);
            charge_scores: (n, N_CHARGE_TYPES).

        The bond matrix keeps the lower triangle of the argmax and mirrors it, so the stored matrix is
        symmetric with an empty diagonal and reads the same as upstream's lower-triangle convention.
        """
        for name, scores, dims in (
            ("atom_scores", atom_scores, 2),
            ("bond_scores", bond_scores, 3),
            ("charge_scores", charge_scores, 2),
        ):
            if scores.dim() != dims:
                raise ValueError(f"{name} must have {dims} dimensions, got shape {tuple(scores.shape)}")
        return cls(
            coords=coords,
            atom_types=atom_scores.argmax(-1),
            bond_types=mirror_lower(bond_scores.argmax(-1)),
            charges=charge_scores.argmax(-1),
        )

    def symmetric_bonds(self) -> Tensor:
        """(n, n) bond classes read from the strict lower triangle and mirrored (what every consumer uses)."""
        return mirror_lower(self.bond_types)

    def to_rdkit(self, sanitize: bool = True) -> Chem.Mol | None:
        """RDKit molecule with one 3D conformer, or None if it cannot be built (or sanitised)."""
        return graph_to_mol(self, sanitize=sanitize)


def strict_lower(t: Tensor) -> Tensor:
    """Entries with row > column of the last two dims, zero elsewhere."""
    # Not torch.tril: it is OpenMP-parallel even for a 20x20 matrix and takes milliseconds on a busy CPU.
    idx = torch.arange(t.shape[-1], device=t.device)
    return t * (idx[:, None] > idx[None, :])


def mirror_lower(t: Tensor) -> Tensor:
    lower = strict_lower(t)
    return lower + lower.transpose(-1, -2)


def _check(name: str, t: Tensor, shape: tuple[int, ...], floating: bool = False, n_classes: int = 0) -> None:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if tuple(t.shape) != shape:
        raise ValueError(f"{name} must have shape {shape}, got {tuple(t.shape)}")
    if floating:
        if not t.is_floating_point():
            raise TypeError(f"{name} must be a floating point tensor, got {t.dtype}")
        return
    if t.dtype != torch.long:
        raise TypeError(f"{name} must be a torch.long tensor, got {t.dtype}")
    if t.numel() and (t.min() < 0 or t.max() >= n_classes):
        raise ValueError(f"{name} values must lie in [0, {n_classes}), got [{t.min()}, {t.max()}]")


FIRST_ELEMENT = 2  # vocabulary indices 0 and 1 are <PAD> and <MASK>
RDKIT_BOND = {
    1: Chem.BondType.SINGLE,
    2: Chem.BondType.DOUBLE,
    3: Chem.BondType.TRIPLE,
    4: Chem.BondType.AROMATIC,
}
BOND_CLASS = {rdkit_type: cls for cls, rdkit_type in RDKIT_BOND.items()}


def graph_to_mol(graph: MolGraph, sanitize: bool = True) -> Chem.Mol | None:
    """Build an RDKit molecule exactly as SemlaFlow does; None when that fails.

    Atoms from tokens (any ``<PAD>``/``<MASK>`` fails the molecule), formal charges, one 3D conformer, and
    one bond per strict-lower-triangle entry (i > j) with class > 0. Hydrogens are only those in the graph;
    RDKit may still add implicit ones during sanitisation, as upstream. With ``sanitize`` a molecule that
    fails ``SanitizeMol`` gives None. RDKit's log output is silenced.
    """
    atom_types = graph.atom_types.tolist()
    if min(atom_types) < FIRST_ELEMENT:
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
            editable.AddBond(i, j, RDKIT_BOND[cls])
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
