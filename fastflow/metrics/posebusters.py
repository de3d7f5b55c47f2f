"""PoseBusters checks of generated molecules, as drug-design papers report them (the ``posebusters`` package,
offline; its "mol" configuration: checks of a molecule on its own, without a protein or a reference pose).

Reported numbers:

- ``pb_valid``: the fraction of **all** generated molecules that pass every check (a molecule RDKit could not
  build fails them all), the PB-valid number of generative-model papers;
- ``pb_valid_of_valid``: the same among the molecules RDKit could build;
- ``pb_fail_<check>``: per check, the fraction of the buildable molecules that fail it (``bond_lengths``,
  ``internal_steric_clash``, ``internal_energy``, ...): where the geometry goes wrong.
"""

from __future__ import annotations

from collections.abc import Sequence

from rdkit import Chem

INSTALL_HINT = "pip install posebusters"
CONFIG = "mol"


def posebusters_metrics(mols: Sequence[Chem.Mol | None]) -> dict[str, float]:
    """PB-valid fractions and per-check failure rates of ``mols`` (None for molecules RDKit could not build)."""
    try:
        from posebusters import PoseBusters
    except ImportError:
        raise ImportError(f"PoseBusters checks need the posebusters package: {INSTALL_HINT}") from None
    if len(mols) == 0:
        raise ValueError("PoseBusters checks need at least one molecule")
    built = [Chem.Mol(mol) for mol in mols if mol is not None and mol.GetNumConformers() > 0]
    metrics: dict[str, float] = {"pb_valid": 0.0, "pb_valid_of_valid": float("nan"), "pb_checked": len(built)}
    if not built:
        return metrics
    table = PoseBusters(config=CONFIG, max_workers=0).bust(built, None, None, full_report=False)
    if len(table) != len(built):
        raise RuntimeError(f"PoseBusters returned {len(table)} rows for {len(built)} molecules")
    passed = table.all(axis=1)
    metrics["pb_valid"] = float(passed.sum()) / len(mols)
    metrics["pb_valid_of_valid"] = float(passed.mean())
    for check in table.columns:
        metrics[f"pb_fail_{check.replace('-', '_')}"] = float(1.0 - table[check].mean())
    return metrics
