import pytest
import torch

from fastflow import SemlaConfig
from tests.models.conftest import perturbed_model

TINY = SemlaConfig.preset("tiny")


@pytest.fixture(autouse=True)
def one_thread(single_thread):
    """Every test here runs on tiny tensors: one thread (see tests/conftest.py)."""


@pytest.fixture(scope="module")
def model():
    """The tiny Semla with perturbed norm weights that the cache tests sample with."""
    return perturbed_model(TINY)


@pytest.fixture(scope="module")
def model64():
    return perturbed_model(TINY, dtype=torch.float64)
