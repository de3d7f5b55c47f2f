import pytest
import torch


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
