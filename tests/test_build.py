"""The installed package: fastflow._C loads, triton_kernels ships only as fastflow.triton_kernels."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fastflow import _extension

REPO = Path(__file__).resolve().parent.parent


def run_python(code: str, cwd: Path, env: dict | None = None) -> str:
    # A fresh interpreter outside the repo: pytest puts the repo root on sys.path; the install must not need it.
    result = subprocess.run(
        [sys.executable, "-c", code],
        cwd=cwd,
        check=False,
        capture_output=True,
        text=True,
        timeout=300,
        env=None if env is None else {**os.environ, **env},
    )
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


def test_bare_triton_kernels_is_not_ours(tmp_path):
    origin = run_python(
        "import importlib.util as u; s = u.find_spec('triton_kernels'); print(s.origin if s else 'missing')",
        tmp_path,
    )
    assert origin == "missing" or REPO not in Path(origin).resolve().parents


def test_fastflow_triton_kernels_imports(tmp_path):
    # Import without triton: the package itself must not need it; find the kernel module without importing it.
    origin = run_python(
        "import importlib.util as u; print(u.find_spec('fastflow.triton_kernels.cache_forecast').origin)",
        tmp_path,
    )
    assert Path(origin).name == "cache_forecast.py"


def test_importing_fastflow_does_not_import_triton(tmp_path):
    # TRITON_INTERPRET must be settable after `import fastflow`, and CPU users should not pay for triton's import.
    loaded = run_python(
        "import sys, fastflow, fastflow.nn, fastflow.patch, fastflow.cli, fastflow.ops.tensor_product; "
        "print('triton' in sys.modules)",
        tmp_path,
    )
    assert loaded == "False"


def test_extension_is_loaded():
    status = _extension.extension_status()
    assert status["loaded"], status["reason"]
    assert torch.ops.fastflow.cache_forecast.default is not None


def test_extension_records_the_torch_it_was_built_with(tmp_path):
    library = tmp_path / "_C.so"
    library.write_bytes(b"\x7fELF...\0fastflow-built-with-torch=2.99.1\0...")
    assert _extension._torch_version_built_with(library) == "2.99.1"
    if _extension.extension_status()["how"] == "prebuilt":
        import fastflow._C

        assert (
            _extension._torch_version_built_with(Path(fastflow._C.__file__))
            == torch.__version__.split("+")[0]
        )


@pytest.mark.slow
def test_jit_build_from_csrc(tmp_path):
    # What a source checkout without a prebuilt fastflow._C gets on first use (cached by torch after that).
    code = (
        "import torch; from fastflow import _extension as e; s = e._load_jit('prebuilt hidden for the test'); "
        "assert s['loaded'], s; x = torch.ones(4); "
        "print(torch.ops.fastflow.cache_forecast([x, 2 * x], [0.5, 0.25]).tolist())"
    )
    assert run_python(code, tmp_path, {"FASTFLOW_SKIP_EXTENSION": "1"}) == "[1.0, 1.0, 1.0, 1.0]"


def test_import_registers_the_ops(tmp_path):
    # A TorchScript file that calls fastflow's ops loads after a bare `import fastflow`.
    code = "import torch, fastflow; print(hasattr(torch.ops.fastflow, 'semla_attention'))"
    assert run_python(code, tmp_path) == "True"
    assert run_python(code, tmp_path, {"FASTFLOW_SKIP_EXTENSION": "1"}) == "False"
