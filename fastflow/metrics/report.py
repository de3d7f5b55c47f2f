"""One call for the whole SemlaFlow metric set — per-molecule records, then their aggregate, so that a set's
metrics equal those of its parts' records put together — and a plain-text table for the CLI."""

from __future__ import annotations

import json
import math
import numbers
import statistics
from collections.abc import Iterable, Sequence

from rdkit import Chem

from fastflow.chem.graph import MolGraph
from fastflow.metrics.energy import MAX_ITERS, MMFFResult, mmff_evaluate
from fastflow.metrics.molecules import (
    SANITIZE_FAILURES,
    CanonicalSmilesSet,
    canonical_smiles_set,
    is_valid,
    molecule_key,
    sanitize_failure,
)
from fastflow.metrics.stability import atom_stabilities


def compute_metrics(
    graphs: Sequence[MolGraph],
    mols: Sequence[Chem.Mol | None] | None = None,
    train_smiles: Iterable[str] | None = None,
    energy: bool = True,
    valence_table: str = "semlaflow",
    max_iters: int = MAX_ITERS,
    posebusters: bool = False,
) -> dict[str, float]:
    """SemlaFlow's metrics for a set of generated molecules: :func:`aggregate_metrics` of
    :func:`molecule_records`, the path a shard merge takes too.

    Arguments:
        graphs: the raw generated graphs (stability is read from them, unsanitised).
        mols: ``graphs[i].to_rdkit()`` for each i, if already built (None entries for failures).
        train_smiles: training-set SMILES for novelty (a ``CanonicalSmilesSet`` skips canonicalisation);
            without it ``novelty`` is absent.
        energy: compute the MMFF94 metrics (the slow part: one minimisation per molecule).
        posebusters: add the PoseBusters numbers (pb_valid, pb_valid_of_valid, pb_fail_<check>; see
            :mod:`fastflow.metrics.posebusters`; needs the posebusters package).

    Keys: n, atom_stability, mol_stability, validity, connected_validity, uniqueness, invalid_<kind> (why the
    invalid molecules fail sanitisation: unbuildable, valence, aromatic_outside_ring, kekulize, other; they add up
    to 1 − validity), [novelty], and with
    ``energy``: energy_validity, opt_energy_validity, energy, energy_per_atom, strain, strain_per_atom,
    opt_rmsd, and the standard errors of the per-atom means (energy_per_atom_sem, strain_per_atom_sem: strain
    is heavy-tailed, so two runs' means differ by several percent by chance). Validity-type fractions count
    every molecule; uniqueness and novelty are over valid molecules; energies (kcal/mol) average only the
    molecules where MMFF succeeded, so read them with energy_validity. NaN marks an average over nothing.
    """
    if len(graphs) == 0:
        raise ValueError("compute_metrics needs at least one molecule")
    if mols is None:
        mols = [g.to_rdkit() for g in graphs]
    elif len(mols) != len(graphs):
        raise ValueError(f"mols must match graphs one to one: {len(mols)} mols for {len(graphs)} graphs")
    records = molecule_records(graphs, mols, energy, valence_table, max_iters)
    metrics = aggregate_metrics(records, train_smiles)
    if posebusters:
        from fastflow.metrics.posebusters import (
            posebusters_metrics,  # lazy: pandas and posebusters are optional
        )

        metrics.update(posebusters_metrics(mols))
    return metrics


def molecule_records(
    graphs: Sequence[MolGraph],
    mols: Sequence[Chem.Mol | None],
    energy: bool = True,
    valence_table: str = "semlaflow",
    max_iters: int = MAX_ITERS,
) -> dict[str, list]:
    """Per-molecule columns (JSON-ready) of everything the metrics count: n_atoms, stable_atoms, valid,
    connected, smiles (the uniqueness key of valid molecules, else None) and, with ``energy``, the MMFF
    results (mmff_atoms, energy, opt_energy, opt_rmsd); failure: why an invalid molecule fails sanitisation
    (metrics invalid_<kind>, which add up to 1 − validity). Records of parts of a set, concatenated column by
    column, aggregate to the metrics of the whole set."""
    records: dict[str, list] = {
        "n_atoms": [],
        "stable_atoms": [],
        "valid": [],
        "connected": [],
        "smiles": [],
        "failure": [],
    }
    for graph, mol in zip(graphs, mols, strict=True):
        stable = atom_stabilities(graph, valence_table)
        valid = is_valid(mol)
        records["n_atoms"].append(len(stable))
        records["stable_atoms"].append(sum(stable))
        records["valid"].append(valid)
        records["connected"].append(valid and is_valid(mol, connected=True))
        records["smiles"].append(molecule_key(mol) if valid else None)
        records["failure"].append(None if valid else sanitize_failure(graph))
    if energy:
        results = [mmff_evaluate(mol, max_iters) for mol in mols]
        records["mmff_atoms"] = [r.n_atoms for r in results]
        records["energy"] = [r.energy for r in results]
        records["opt_energy"] = [r.opt_energy for r in results]
        records["opt_rmsd"] = [r.opt_rmsd for r in results]
    return records


def aggregate_metrics(
    records: dict[str, list], train_smiles: Iterable[str] | None = None
) -> dict[str, float]:
    """The metrics (:func:`compute_metrics`' keys and order) of :func:`molecule_records`; the energy metrics
    where the records hold MMFF results."""
    n = len(records["n_atoms"])
    if n == 0:
        raise ValueError("no molecules to aggregate")
    keys = [key for key in records["smiles"] if key is not None]
    metrics = {
        "n": n,
        "atom_stability": sum(records["stable_atoms"]) / sum(records["n_atoms"]),
        "mol_stability": sum(s == a for s, a in zip(records["stable_atoms"], records["n_atoms"])) / n,
        "validity": sum(records["valid"]) / n,
        "connected_validity": sum(records["connected"]) / n,
        "uniqueness": len(set(keys)) / len(keys) if keys else float("nan"),
    }
    failures = records.get("failure", [])
    if len(failures) == n:  # (absent from the records of shards written before it was recorded)
        metrics.update({f"invalid_{kind}": failures.count(kind) / n for kind in SANITIZE_FAILURES})
    if train_smiles is not None:
        if not isinstance(train_smiles, CanonicalSmilesSet):
            train_smiles = canonical_smiles_set(train_smiles)
        # Duplicates count, as upstream's novelty does.
        metrics["novelty"] = sum(k not in train_smiles for k in keys) / len(keys) if keys else float("nan")
    if "energy" in records:
        columns = ("mmff_atoms", "energy", "opt_energy", "opt_rmsd")
        metrics.update(summarise_mmff([MMFFResult(*row) for row in zip(*(records[c] for c in columns))]))
    return metrics


def summarise_mmff(results: Sequence[MMFFResult]) -> dict[str, float]:
    """The energy metrics of per-molecule MMFF results (a shard merge recomputes them from stored results)."""
    energies = [r for r in results if r.energy is not None]
    strained = [r for r in results if r.strain is not None]
    return {
        "energy_validity": len(energies) / len(results),
        "opt_energy_validity": sum(r.opt_energy is not None for r in results) / len(results),
        "energy": _mean(r.energy for r in energies),
        "energy_per_atom": _mean(r.energy / r.n_atoms for r in energies),
        "energy_per_atom_sem": _standard_error(r.energy / r.n_atoms for r in energies),
        "strain": _mean(r.strain for r in strained),
        "strain_per_atom": _mean(r.strain / r.n_atoms for r in strained),
        "strain_per_atom_sem": _standard_error(r.strain / r.n_atoms for r in strained),
        "opt_rmsd": _mean(r.opt_rmsd for r in results if r.opt_rmsd is not None),
    }


def run_summary(
    metrics: dict,
    *,
    steps: int,
    nfe: int,
    seconds: float,
    seed: int,
    schedule: str,
    model: str,
    cache: str,
    cache_hit_rate: float,
    kernels: str,
    precision: str,
    threads,
    **more,
) -> dict:
    """What ``fastflow sample``, ``eval`` and ``merge`` print (``--json``) and save: the metrics, then the run in
    one order (``more``, e.g. a merge's shards, last). seconds: sampling time (summed over shards);
    molecules_per_second is n over it."""
    return {
        **metrics,
        "steps": steps,
        "nfe": nfe,
        "cache": cache,
        "cache_hit_rate": cache_hit_rate,
        "kernels": kernels,
        "precision": precision,
        "seconds": seconds,
        "molecules_per_second": metrics["n"] / seconds if seconds > 0 else float("nan"),
        "seed": seed,
        "schedule": schedule,
        "model": model,
        "threads": threads,
        **more,
    }


def summary_metrics(summary: dict) -> dict:
    """The metrics of a :func:`run_summary`: its keys before the run's, which start at "steps"."""
    keys = list(summary)
    return {key: summary[key] for key in keys[: keys.index("steps")]}


def summary_line(summary: dict) -> str:
    """The line under the metrics table: molecules, steps, network evaluations, time and rate."""
    return (
        f"{summary['n']} molecules, {summary['steps']} steps, {summary['nfe']} network evaluations, "
        f"{summary['seconds']:.2f} s ({summary['molecules_per_second']:.1f} molecules/s, "
        f"{summary['threads']} threads)"
    )


def format_metrics_table(rows: dict[str, dict[str, float]]) -> str:
    """Plain-text table: one line per metric, one column per row name (e.g. "generated", "data")."""
    names = list(rows)
    metrics = list(dict.fromkeys(key for values in rows.values() for key in values))
    cells = [[_format(rows[name].get(metric)) for name in names] for metric in metrics]
    label_width = max([len("metric"), *map(len, metrics)])
    widths = [max([len(name), *(len(line[i]) for line in cells)]) for i, name in enumerate(names)]
    lines = ["  ".join(["metric".ljust(label_width), *(n.rjust(w) for n, w in zip(names, widths))])]
    lines.append("-" * len(lines[0]))
    for metric, line in zip(metrics, cells):
        lines.append("  ".join([metric.ljust(label_width), *(c.rjust(w) for c, w in zip(line, widths))]))
    return "\n".join(lines)


def summary_json(summary: dict, leading_keys: Sequence[str] = ()) -> str:
    """One line of strict JSON: ``leading_keys`` first (null where absent), then the rest of ``summary``. NaN
    and infinities (a metric with nothing to measure, e.g. uniqueness without a valid molecule) become null:
    ``NaN`` is not JSON and breaks the tools that read this line."""
    ordered = {key: summary.get(key) for key in leading_keys} | summary
    return json.dumps(_finite_or_null(ordered), allow_nan=False, default=float)


def _finite_or_null(value):
    if isinstance(value, dict):
        return {key: _finite_or_null(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite_or_null(item) for item in value]
    if isinstance(value, numbers.Real) and not isinstance(value, numbers.Integral):
        return float(value) if math.isfinite(value) else None
    return value


def _format(value: float | None) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return str(value) if isinstance(value, int) else f"{value:.4f}"


def _mean(values: Iterable[float]) -> float:
    values = list(values)
    return sum(values) / len(values) if values else float("nan")


def _standard_error(values: Iterable[float]) -> float:
    """Sample standard deviation / √n (NaN below two values)."""
    values = list(values)
    return statistics.stdev(values) / math.sqrt(len(values)) if len(values) >= 2 else float("nan")
