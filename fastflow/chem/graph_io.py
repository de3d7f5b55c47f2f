"""Molecular graphs on disk, compactly: every graph of a list (RDKit failures included) as a few flat tensors."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import torch

from fastflow.chem.graph import MolGraph


def save_graphs(path: Path, graphs: Sequence[MolGraph]) -> None:
    """MolGraphs as flat tensors (float32 coordinates, uint8 classes, n×n bond matrices), atomically."""
    path = Path(path)
    sizes = torch.tensor([g.n_atoms for g in graphs], dtype=torch.int32)
    data = {
        "sizes": sizes,
        "coords": torch.cat([g.coords.detach().cpu().float() for g in graphs]),
        "atom_types": torch.cat([g.atom_types.cpu() for g in graphs]).to(torch.uint8),
        "charges": torch.cat([g.charges.cpu() for g in graphs]).to(torch.uint8),
        "bonds": torch.cat([g.bond_types.cpu().reshape(-1) for g in graphs]).to(torch.uint8),
    }
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    try:
        torch.save(data, tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def read_graphs(path: Path) -> list[MolGraph]:
    """The MolGraphs :func:`save_graphs` wrote."""
    data = torch.load(path, weights_only=True)
    sizes = data["sizes"].tolist()
    coords = data["coords"].split(sizes)
    atom_types = data["atom_types"].long().split(sizes)
    charges = data["charges"].long().split(sizes)
    bonds = data["bonds"].long().split([n * n for n in sizes])
    return [
        MolGraph(c, a, b.reshape(n, n), q)
        for n, c, a, b, q in zip(sizes, coords, atom_types, bonds, charges, strict=True)
    ]
