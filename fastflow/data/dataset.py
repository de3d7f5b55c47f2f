"""Molecules packed into flat tensors, padded batches, and size-bucketed batch plans.

Packed layout (``pack_graphs``): atoms of all molecules concatenated — ``coords [A,3]`` (Å), ``atom_types [A]``,
``charges [A]`` with ``atom_ptr [M+1]`` offsets; bonds as a list ``bonds [E,3]`` of (i, j, class) with i > j
(molecule-local indices) and ``bond_ptr [M+1]``. Small on disk, and a batch is built by slicing.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from rdkit import Chem

from fastflow.chem import MolGraph, kekulize_graph
from fastflow.chem.graph import BOND_CLASS, strict_lower
from fastflow.chem.vocab import QM9_COORD_STD
from fastflow.sampling.prior import zero_com

QM9_BUCKET_LIMITS = (12, 16, 18, 20, 22, 24, 30)  # SemlaFlow's QM9 size buckets
# Drug-size molecules (MOSES3D, GEOM-Drugs): SemlaFlow's GEOM-Drugs buckets. MOSES molecules have ≈13-62 atoms
# with H (mean 39.6, 5-95% 30-49 in a 20k sample): 4-atom buckets keep padding low; 72-192 serve GEOM-sized data.
DRUG_BUCKET_LIMITS = (24, 28, 32, 36, 40, 44, 48, 52, 56, 60, 64, 72, 96, 192)


def pack_graphs(graphs: Sequence[MolGraph]) -> dict[str, torch.Tensor]:
    """Flat tensors for a list of graphs (see the module docstring)."""
    sizes = torch.tensor([g.n_atoms for g in graphs])
    bonds = []
    for g in graphs:
        lower = strict_lower(g.bond_types)
        i, j = lower.nonzero(as_tuple=True)
        bonds.append(torch.stack([i, j, lower[i, j]], dim=1))
    n_bonds = torch.tensor([len(b) for b in bonds])
    return {
        "coords": torch.cat([g.coords.float() for g in graphs]),
        "atom_types": torch.cat([g.atom_types for g in graphs]).to(torch.int8),
        "charges": torch.cat([g.charges for g in graphs]).to(torch.int8),
        "atom_ptr": torch.cat([torch.zeros(1, dtype=torch.long), sizes.cumsum(0)]),
        "bonds": torch.cat(bonds).to(torch.int8),
        "bond_ptr": torch.cat([torch.zeros(1, dtype=torch.long), n_bonds.cumsum(0)]),
    }


class MolDataset:
    """A subset (``indices``) of packed molecules; batches come out padded, with coordinates in model units
    (Å / ``coord_std``, centre of mass removed)."""

    def __init__(
        self,
        tensors: dict[str, torch.Tensor],
        indices: torch.Tensor | None = None,
        coord_std: float = QM9_COORD_STD,
    ):
        self.tensors = tensors
        n_total = len(tensors["atom_ptr"]) - 1
        self.indices = torch.arange(n_total) if indices is None else torch.as_tensor(indices).long()
        self.coord_std = coord_std
        ptr = tensors["atom_ptr"]
        self.sizes = (ptr[1:] - ptr[:-1])[self.indices]

    def __len__(self) -> int:
        return len(self.indices)

    def _slices(self, i: int) -> tuple[slice, slice]:
        m = int(self.indices[i])
        atom_ptr, bond_ptr = self.tensors["atom_ptr"], self.tensors["bond_ptr"]
        return slice(int(atom_ptr[m]), int(atom_ptr[m + 1])), slice(int(bond_ptr[m]), int(bond_ptr[m + 1]))

    def graph(self, i: int) -> MolGraph:
        """Molecule ``i`` of the subset as a :class:`MolGraph` in Å (symmetric bond matrix)."""
        atoms, bond_rows = self._slices(i)
        n = atoms.stop - atoms.start
        bonds = self.tensors["bonds"][bond_rows].long()
        bond_types = torch.zeros(n, n, dtype=torch.long)
        bond_types[bonds[:, 0], bonds[:, 1]] = bonds[:, 2]
        bond_types[bonds[:, 1], bonds[:, 0]] = bonds[:, 2]
        return MolGraph(
            self.tensors["coords"][atoms].clone(),
            self.tensors["atom_types"][atoms].long(),
            bond_types,
            self.tensors["charges"][atoms].long(),
        )

    def kekulized(self) -> MolDataset:
        """The subset with aromatic bonds written as Kekulé single/double bonds (:func:`kekulize_graph`); the
        packed tensors are copied, so ``self`` is unchanged. Raises ``ValueError`` naming a molecule that has no
        Kekulé structure."""
        bonds = self.tensors["bonds"].clone()
        aromatic = int(BOND_CLASS[Chem.BondType.AROMATIC])
        for i in range(len(self)):
            _, bond_rows = self._slices(i)
            edges = bonds[bond_rows]
            if not (edges[:, 2] == aromatic).any():
                continue
            try:
                kekule = kekulize_graph(self.graph(i)).bond_types
            except ValueError as error:
                raise ValueError(f"molecule {int(self.indices[i])}: {error}") from None
            edges[:, 2] = kekule[edges[:, 0].long(), edges[:, 1].long()].to(edges.dtype)
            bonds[bond_rows] = edges
        return MolDataset({**self.tensors, "bonds": bonds}, self.indices, self.coord_std)

    def batch(self, batch_indices: Sequence[int]) -> dict[str, torch.Tensor]:
        """Padded batch of subset molecules: coords ``[B,N,3]`` (model units, zero CoM), atom_types ``[B,N]``,
        bonds ``[B,N,N]`` (symmetric classes, empty diagonal), charges ``[B,N]``, mask ``[B,N]`` bool; padding
        is zero."""
        batch_indices = list(batch_indices)
        n_atoms = int(self.sizes[batch_indices].max())
        B = len(batch_indices)
        coords = torch.zeros(B, n_atoms, 3)
        atom_types = torch.zeros(B, n_atoms, dtype=torch.long)
        charges = torch.zeros(B, n_atoms, dtype=torch.long)
        bonds = torch.zeros(B, n_atoms, n_atoms, dtype=torch.long)
        mask = torch.zeros(B, n_atoms, dtype=torch.bool)
        for b, i in enumerate(batch_indices):
            atoms, bond_rows = self._slices(i)
            n = atoms.stop - atoms.start
            coords[b, :n] = self.tensors["coords"][atoms]
            atom_types[b, :n] = self.tensors["atom_types"][atoms].long()
            charges[b, :n] = self.tensors["charges"][atoms].long()
            edges = self.tensors["bonds"][bond_rows].long()
            bonds[b, edges[:, 0], edges[:, 1]] = edges[:, 2]
            bonds[b, edges[:, 1], edges[:, 0]] = edges[:, 2]
            mask[b, :n] = True
        coords = zero_com(coords / self.coord_std, mask)
        return {"coords": coords, "atom_types": atom_types, "bonds": bonds, "charges": charges, "mask": mask}


def bucket_batches(
    sizes: torch.Tensor,
    batch_cost: int,
    generator: torch.Generator,
    bucket_limits: Sequence[int] = QM9_BUCKET_LIMITS,
) -> list[list[int]]:
    """One epoch of batches: molecules grouped by size bucket, shuffled, cut into batches of
    ⌊batch_cost / bucket limit⌋ molecules (so a batch holds ≈ batch_cost padded atoms), batch order shuffled.
    Molecules larger than the last limit form a bucket of their own."""
    limits = torch.tensor([*bucket_limits, max(int(sizes.max()), bucket_limits[-1])])
    bucket_of = torch.searchsorted(limits, sizes)
    batches = []
    for bucket, limit in enumerate(limits.tolist()):
        members = (bucket_of == bucket).nonzero().flatten()
        members = members[torch.randperm(len(members), generator=generator)]
        per_batch = max(1, batch_cost // limit)
        batches += [chunk.tolist() for chunk in members.split(per_batch) if len(chunk)]
    order = torch.randperm(len(batches), generator=generator)
    return [batches[k] for k in order.tolist()]
