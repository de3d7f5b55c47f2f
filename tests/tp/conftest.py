"""Triton runs on CPU tensors under its interpreter when no GPU is present (as in tests/ops/conftest.py):
TRITON_INTERPRET must be set before `import triton`, so it is set when pytest collects tests/tp."""

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
        pytest.fail("triton was imported before tests/tp/conftest.py set TRITON_INTERPRET=1; "
                    "run with TRITON_INTERPRET=1 in the environment")
    return torch.device("cpu")
