"""Shared fixtures. Triton kernels run on CPU tensors under Triton's interpreter when no GPU is present:
TRITON_INTERPRET must be set before `import triton` (triton.language's helpers are built at import), so it is set
here, when pytest loads this file first. fastflow never imports triton at import time (tests/test_build.py), so
nothing imports it earlier; if something did, `triton_device` fails with the remedy rather than skipping."""

import os
import sys

import pytest
import torch

_triton_imported_before = "triton" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1"
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture
def triton_device():
    """Device for Triton tests: cuda, else cpu under the interpreter."""
    pytest.importorskip("triton", reason="triton is not installed")
    if torch.cuda.is_available():
        return torch.device("cuda")
    if _triton_imported_before or os.environ.get("TRITON_INTERPRET") != "1":
        pytest.fail(
            "triton was imported before tests/conftest.py set TRITON_INTERPRET=1; "
            "run with TRITON_INTERPRET=1 in the environment"
        )
    return torch.device("cpu")


@pytest.fixture(scope="module")
def single_thread():
    """Tiny tensors: one intra-op thread is faster and immune to OpenMP spinning on a loaded machine.
    Use with ``pytestmark = pytest.mark.usefixtures("single_thread")``."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def upstream_fixture():
    """Weights, inputs and outputs of upstream SemlaFlow's tiny generator (tests/models/fixtures/generate_*.py)."""
    from safetensors.torch import load_file

    from tests.models.conftest import FIXTURES

    return load_file(FIXTURES / "upstream_semla_tiny.safetensors")
