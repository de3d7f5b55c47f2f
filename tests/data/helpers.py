"""The bundled QM9 fixture: 48 rows of qm9pack's CSV (46 convert, 2 fail bond perception), no qm9pack needed."""

from functools import lru_cache
from pathlib import Path

import torch

from fastflow.data.qm9 import CACHE_VERSION, preprocess_qm9

FIXTURE_CSV = Path(__file__).parent / "fixtures" / "qm9_mini.csv"
N_ROWS, N_FAILED, N_TRAIN = 48, 2, 32


@lru_cache
def fixture_data() -> dict:
    """The fixture preprocessed like QM9, with a 32-molecule train split (MiDi's rule otherwise)."""
    return preprocess_qm9([FIXTURE_CSV], workers=1, n_train=N_TRAIN)


def write_fixture_cache(directory: Path) -> Path:
    """A cache folder whose QM9 is the fixture (for `--cache-dir` in CLI tests)."""
    torch.save(fixture_data(), directory / f"{CACHE_VERSION}.pt")
    return directory
