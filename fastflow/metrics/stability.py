"""Atom and molecule stability from the raw graph tensors (no RDKit, no sanitisation).

An atom is stable when its valence is allowed for its (element, formal charge); a molecule is stable when
all of its atoms are. Two tables:

``"semlaflow"`` (default): SemlaFlow's ``MolBuilder.atom_stabilities`` + ``ALLOWED_VALENCIES`` (the
MiDi/EQGAT table). Valence is the sum of bond orders over the symmetrised lower triangle. Upstream writes
``adj[adj == 4] = 1.5`` into the adjacency built by ``adj_from_edges``, which is a ``torch.long`` tensor for
class indices, so the 1.5 is truncated on assignment: **an aromatic bond counts 1, not 1.5** (checked with
torch; floor of a sum of 1.5s would differ, e.g. pyrrole N). We reproduce that effective behaviour.

``"revisited"``: GEOM-Drugs Revisited (Nikitin et al. 2025, ``geom_drugs_h_tuple_valencies``). Each atom is
keyed by (number of aromatic bonds, valence from non-aromatic bonds) and looked up in a table built from
the cleaned GEOM-Drugs data, so aromatic atoms are judged by their ring environment.
"""

from __future__ import annotations

import torch
from torch import Tensor

from fastflow.chem.graph import MolGraph
from fastflow.chem.vocab import ATOM_VOCAB, CHARGES

ANY = None  # charge key: the entry applies whatever the formal charge (upstream's int/list entries)

# element -> formal charge -> allowed valences; a charge that is not listed is unstable.
# (Upstream also lists Se, which is not in the vocabulary.)
SEMLAFLOW_VALENCES: dict[str, dict[int | None, tuple[int, ...]]] = {
    "H": {0: (1,), 1: (0,), -1: (0,)},
    "C": {0: (3, 4), 1: (3,), -1: (3,)},
    "N": {0: (2, 3), 1: (2, 3, 4), -1: (2,)},
    "O": {0: (2,), 1: (3,), -1: (1,)},
    "F": {0: (1,), -1: (0,)},
    "B": {ANY: (3,)},
    "Al": {ANY: (3,)},
    "Si": {ANY: (4,)},
    "P": {0: (3, 5), 1: (4,)},
    "S": {0: (2, 6), 1: (2, 3), 2: (4,), 3: (5,), -1: (3,)},
    "Cl": {ANY: (1,)},
    "As": {ANY: (3,)},
    "Br": {0: (1,), 1: (2,)},
    "I": {ANY: (1,)},
    "Hg": {ANY: (1, 2)},
    "Bi": {ANY: (3, 5)},
}

# element -> formal charge -> allowed (n_aromatic_bonds, non-aromatic valence).
REVISITED_VALENCES: dict[str, dict[int, tuple[tuple[int, int], ...]]] = {
    "H": {0: ((0, 1),)},
    "C": {0: ((0, 4), (2, 2), (2, 1), (3, 0)), -1: ((0, 3), (2, 1), (3, 0)), 1: ((0, 3), (2, 1), (3, 0))},
    "N": {
        0: ((0, 3), (2, 0), (2, 1), (3, 0)),
        1: ((0, 4), (2, 0), (2, 1), (2, 2), (3, 0)),
        -1: ((0, 2), (2, 0)),
        -2: ((0, 1),),
    },
    "O": {0: ((0, 2), (2, 0)), -1: ((0, 1),), 1: ((0, 3),)},
    "S": {
        0: ((0, 2), (0, 3), (0, 6), (2, 0)),
        1: ((0, 3), (2, 0), (2, 1), (3, 0)),
        2: ((0, 4), (2, 1), (2, 2)),
        3: ((0, 2), (0, 5)),
        -1: ((0, 1),),
    },
    "F": {0: ((0, 1),)},
    "Cl": {0: ((0, 1),), 1: ((0, 2),)},
    "Br": {0: ((0, 1),), 1: ((0, 2),)},
    "I": {0: ((0, 1),), 1: ((0, 2),), 2: ((0, 3),)},
    "P": {0: ((0, 3), (0, 5)), 1: ((0, 4),)},
    "Si": {0: ((0, 4),), 1: ((0, 5),)},
    "B": {0: ((0, 3),), -1: ((0, 4),)},
    "Bi": {0: ((0, 3),), 2: ((0, 5),)},
}

AROMATIC = 4
# Valence contribution per bond class under upstream's long-tensor arithmetic: aromatic (class 4) -> 1.
_SEMLAFLOW_BOND_VALENCE = torch.tensor([0, 1, 2, 3, 1])
_KEKULE_BOND_VALENCE = torch.tensor([0, 1, 2, 3, 0])  # aromatic bonds counted separately


def _allowed(table: dict, symbol: str, charge: int) -> tuple:
    by_charge = table.get(symbol, {})
    return by_charge.get(charge, by_charge.get(ANY, ()))


def atom_valences(graph: MolGraph) -> Tensor:
    """(n,) long valences under SemlaFlow's rule (aromatic bond = 1)."""
    return _SEMLAFLOW_BOND_VALENCE[graph.symmetric_bonds().cpu()].sum(-1)


def atom_stabilities(graph: MolGraph, valence_table: str = "semlaflow") -> list[bool]:
    """Per-atom stability; ``<PAD>``/``<MASK>`` atoms and elements missing from the table are unstable."""
    symbols = [ATOM_VOCAB[i] for i in graph.atom_types.tolist()]
    charges = [CHARGES[i] for i in graph.charges.tolist()]
    if valence_table == "semlaflow":
        valences = atom_valences(graph).tolist()
        return [v in _allowed(SEMLAFLOW_VALENCES, s, c) for s, c, v in zip(symbols, charges, valences)]
    if valence_table == "revisited":
        bonds = graph.symmetric_bonds().cpu()
        n_aromatic = (bonds == AROMATIC).sum(-1).tolist()
        kekule_valence = _KEKULE_BOND_VALENCE[bonds].sum(-1).tolist()
        return [
            (a, v) in _allowed(REVISITED_VALENCES, s, c)
            for s, c, a, v in zip(symbols, charges, n_aromatic, kekule_valence)
        ]
    raise ValueError(f"valence_table must be 'semlaflow' or 'revisited', got {valence_table!r}")


def stability(graphs: list[MolGraph], valence_table: str = "semlaflow") -> tuple[float, float]:
    """(atom stability over all atoms, fraction of molecules whose atoms are all stable)."""
    per_mol = [atom_stabilities(g, valence_table) for g in graphs]
    n_atoms = sum(len(s) for s in per_mol)
    atom_stable = sum(sum(s) for s in per_mol) / n_atoms
    mol_stable = sum(all(s) for s in per_mol) / len(per_mol)
    return atom_stable, mol_stable
