"""Validity, connected validity, uniqueness and novelty of RDKit molecules (SemlaFlow ``util/metrics.py``).

Identity of a molecule for uniqueness and novelty is its canonical heavy-atom SMILES without stereo
(``canonical_smiles(mol, explicit_hs=False, isomeric=False)``), applied the same way to generated and training
molecules. Upstream writes all-hydrogen SMILES (H atoms in the graph; ``AddHs`` on the training side).
Removing hydrogens from a sanitised molecule loses nothing, so this matches upstream, except that
(a) upstream's strings differ when sanitisation filled in implicit Hs on a generated atom, and (b) upstream
keeps stereo: generated molecules never carry stereo tags (none are perceived from 3D), so any training
SMILES with stereo would always count as novel there.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from rdkit import Chem, rdBase

from fastflow.chem import MolGraph
from fastflow.chem.convert import canonical_smiles


class CanonicalSmilesSet(frozenset):
    """Training SMILES already canonicalised by ``canonical_smiles_set`` (cache it for large sets)."""


def molecule_key(mol: Chem.Mol | None) -> str | None:
    """The string uniqueness and novelty compare."""
    return canonical_smiles(mol, explicit_hs=False, isomeric=False)


def canonical_smiles_set(smiles: Iterable[str]) -> CanonicalSmilesSet:
    """Canonicalise training SMILES like generated molecules; unparsable entries are dropped."""
    with rdBase.BlockLogs():
        keys = (molecule_key(Chem.MolFromSmiles(s)) for s in smiles)
        return CanonicalSmilesSet(k for k in keys if k is not None)


def is_valid(mol: Chem.Mol | None, connected: bool = False) -> bool:
    """Sanitises (on a copy), and with ``connected`` is also a single fragment."""
    if mol is None:
        return False
    mol = Chem.Mol(mol)
    with rdBase.BlockLogs():
        try:
            Chem.SanitizeMol(mol)
        except Exception:
            return False
    return not connected or len(Chem.GetMolFrags(mol)) == 1


# Why a molecule fails RDKit sanitisation (sanitize_failure): a <PAD>/<MASK> token, an atom over its valence, aromatic
# bonds outside any ring, an aromatic ring with no Kekulé structure, anything else.
SANITIZE_FAILURES = ("unbuildable", "valence", "aromatic_outside_ring", "kekulize", "other")


def sanitize_failure(graph: MolGraph) -> str | None:
    """None if the graph's molecule sanitises, else the first failure RDKit reports (a SANITIZE_FAILURES kind)."""
    mol = graph.to_rdkit(sanitize=False)
    if mol is None:
        return "unbuildable"
    with rdBase.BlockLogs():
        try:
            Chem.SanitizeMol(mol)
        except Chem.AtomValenceException:
            return "valence"
        except Chem.AtomKekulizeException as error:
            return "aromatic_outside_ring" if "non-ring atom" in str(error) else "kekulize"
        except Chem.KekulizeException:
            return "kekulize"
        except Exception:  # noqa: BLE001 — any other sanitisation error
            return "other"
    return None


def validity(mols: Sequence[Chem.Mol | None], connected: bool = False) -> float:
    """Fraction of all molecules (None included in the denominator) that are valid."""
    return sum(is_valid(m, connected) for m in mols) / len(mols)


def _valid_keys(mols: Sequence[Chem.Mol | None]) -> list[str]:
    keys = (molecule_key(m) for m in mols if is_valid(m))
    return [k for k in keys if k is not None]


def uniqueness(mols: Sequence[Chem.Mol | None]) -> float:
    """Distinct SMILES among valid molecules / number of valid molecules (NaN if none are valid)."""
    keys = _valid_keys(mols)
    return len(set(keys)) / len(keys) if keys else float("nan")


def novelty(mols: Sequence[Chem.Mol | None], train_smiles: Iterable[str]) -> float:
    """Valid molecules (duplicates included, as upstream) whose SMILES is not in the training set."""
    if not isinstance(train_smiles, CanonicalSmilesSet):
        train_smiles = canonical_smiles_set(train_smiles)
    keys = _valid_keys(mols)
    return sum(k not in train_smiles for k in keys) / len(keys) if keys else float("nan")
