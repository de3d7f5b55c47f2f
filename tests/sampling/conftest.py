import pytest


@pytest.fixture(autouse=True)
def one_thread(single_thread):
    """Every test here runs on tiny tensors: one thread (see tests/conftest.py)."""
