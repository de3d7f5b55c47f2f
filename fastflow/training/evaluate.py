"""Evaluation against the data: SemlaFlow's metrics on generated molecules next to the same metrics on held-out
test molecules of the model's training set (the "data row"), with novelty against the training split."""

from __future__ import annotations

import torch

from fastflow.data.registry import dataset_spec
from fastflow.metrics import CanonicalSmilesSet, compute_metrics
from fastflow.sampling import sample


def train_smiles(data: dict) -> CanonicalSmilesSet:
    """Training-split molecules as novelty keys (preprocessing stored them already canonicalised)."""
    return CanonicalSmilesSet(data["smiles"][i] for i in data["split"]["train"].tolist() if data["smiles"][i])


def data_metrics(
    data: dict,
    n: int,
    seed: int = 0,
    energy: bool = True,
    novelty_set: CanonicalSmilesSet | None = None,
    dataset: str = "qm9",
    posebusters: bool = False,
) -> dict[str, float]:
    """Metrics of ``n`` test molecules drawn without replacement (``seed``), as if they were generated."""
    test = dataset_spec(dataset).split(data, "test")
    if not 1 <= n <= len(test):
        raise ValueError(f"the data row needs 1 <= n <= {len(test)} test molecules, got {n}")
    chosen = torch.randperm(len(test), generator=torch.Generator().manual_seed(seed))[:n]
    graphs = [test.graph(i) for i in chosen.tolist()]
    return compute_metrics(
        graphs,
        [g.to_rdkit() for g in graphs],
        train_smiles=novelty_set,
        energy=energy,
        posebusters=posebusters,
    )


def evaluate(
    model: torch.nn.Module,
    n: int,
    steps: int,
    seed: int = 0,
    data: dict | None = None,
    energy: bool = True,
    batch_size: int = 128,
    progress: bool | None = None,
    dataset: str = "qm9",
    posebusters: bool = False,
    data_row: bool = True,
) -> dict[str, dict]:
    """``{"generated": metrics, "data": metrics}`` (the data row only with ``data_row`` and ``data``, the loaded
    ``dataset``; ``data`` alone gives novelty); the generated row also holds the sampler's nfe, seconds and
    molecules/s."""
    novelty_set = train_smiles(data) if data is not None else None
    sizes = getattr(model, "size_counts", None)
    if sizes is None and data is not None:
        sizes = torch.bincount(dataset_spec(dataset).split(data, "train").sizes)
    result = sample(
        model, n, steps=steps, seed=seed, size_distribution=sizes, batch_size=batch_size, progress=progress
    )
    generated = compute_metrics(
        result.graphs, result.molecules, train_smiles=novelty_set, energy=energy, posebusters=posebusters
    )
    generated.update(
        nfe=result.stats["nfe"],
        seconds=result.stats["sampling_seconds"],
        molecules_per_second=result.stats["molecules_per_second"],
    )
    rows = {"generated": generated}
    if data is not None and data_row:
        rows["data"] = data_metrics(data, n, seed, energy, novelty_set, dataset, posebusters)
    return rows
