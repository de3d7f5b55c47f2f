"""SemlaFlow's metric set: stability from graphs; validity, uniqueness, novelty and MMFF from RDKit."""

from fastflow.metrics.energy import MMFFResult, kabsch_rmsd, mmff_energy, mmff_evaluate, mmff_strain
from fastflow.metrics.molecules import (
    CanonicalSmilesSet,
    canonical_smiles_set,
    is_valid,
    molecule_key,
    novelty,
    uniqueness,
    validity,
)
from fastflow.metrics.report import (
    aggregate_metrics,
    compute_metrics,
    format_metrics_table,
    molecule_records,
    run_summary,
    summary_json,
    summary_line,
    summary_metrics,
)
from fastflow.metrics.stability import (
    REVISITED_VALENCES,
    SEMLAFLOW_VALENCES,
    atom_stabilities,
    atom_valences,
    stability,
)
