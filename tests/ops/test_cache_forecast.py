"""fastflow::cache_forecast: every backend against the definition, opcheck, errors, backend selection."""

import importlib
import warnings
from types import SimpleNamespace

import pytest
import torch

from fastflow import _extension
from fastflow.ops import backends
from fastflow.ops.cache_forecast import cache_forecast, cache_forecast_reference

op = importlib.import_module(
    "fastflow.ops.cache_forecast"
)  # the module: fastflow.ops.cache_forecast is the function

# [B,N,3] coordinates, [B,N,N,5] bond logits, odd sizes, a single atom and an empty batch
SHAPES = [(2, 17, 3), (3, 100, 3), (1, 1, 3), (2, 17, 17, 5), (1, 3, 3, 5), (0, 5, 3)]
TINY_SHAPES = [(2, 3, 3), (1, 5, 5, 5), (0, 4)]  # Triton's interpreter runs ~1 ms per program
TOLERANCE = {torch.float32: 1e-5, torch.float64: 1e-12}


def random_history(K, shape, dtype, seed):
    generator = torch.Generator().manual_seed(seed)
    history = [torch.randn(shape, generator=generator, dtype=dtype) for _ in range(K)]
    coeffs = (torch.rand(K, generator=generator, dtype=torch.float64) * 4 - 2).tolist()
    return history, coeffs


def assert_matches_definition(out, history, coeffs):
    """|out - exact| <= tol * sum_k |c_k F_k| elementwise, exact computed in float64."""
    exact = cache_forecast_reference([F.double() for F in history], coeffs)
    scale = sum(abs(c) * F.double().abs() for c, F in zip(coeffs, history))
    error = (out.double() - exact).abs()
    assert out.shape == history[0].shape and out.dtype == history[0].dtype and out.is_contiguous()
    assert torch.all(error <= TOLERANCE[out.dtype] * scale), f"max error {error.max().item():.3g}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("K", [1, 2, 3, 4])
def test_cpp_matches_definition(K, shape, dtype):
    history, coeffs = random_history(K, shape, dtype, seed=hash((K, shape, str(dtype))) % 2**31)
    assert_matches_definition(cache_forecast(history, coeffs, backend="cpp"), history, coeffs)


@pytest.mark.parametrize("backend", ["cpp", "reference"])
def test_non_contiguous_history(backend):
    (F, *_), coeffs = random_history(3, (5, 17, 6), torch.float32, seed=7)
    history = [F[..., :3].transpose(0, 1), F[..., ::2].transpose(0, 1), F[..., 1::2].transpose(0, 1)]
    assert not any(F.is_contiguous() for F in history)
    assert_matches_definition(cache_forecast(history, coeffs, backend=backend), history, coeffs)


def test_large_tensor_uses_threads_consistently():
    # Above the parallel grain size, so several threads and chunk boundaries are crossed.
    history, coeffs = random_history(4, (32, 29, 29, 5), torch.float32, seed=11)
    assert_matches_definition(cache_forecast(history, coeffs, backend="cpp"), history, coeffs)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", TINY_SHAPES)
@pytest.mark.parametrize("K", [1, 3])
def test_triton_matches_definition(triton_device, K, shape, dtype):
    history, coeffs = random_history(K, shape, dtype, seed=hash((K, shape, str(dtype))) % 2**31)
    out = cache_forecast([F.to(triton_device) for F in history], coeffs, backend="triton")
    assert_matches_definition(out.cpu(), history, coeffs)


def sample_inputs(device="cpu", requires_grad=False):
    history, coeffs = random_history(3, (2, 5, 3), torch.float64, seed=3)
    yield [F.to(device).requires_grad_(requires_grad) for F in history], coeffs
    history, coeffs = random_history(2, (1, 3, 3, 5), torch.float32, seed=4)
    yield [F.to(device) for F in history], coeffs


def test_opcheck_cpp():
    assert _extension.load_extension(), _extension.extension_status()["reason"]
    cpp_op = op._cpp_op()
    for requires_grad in (False, True):
        for args in sample_inputs(requires_grad=requires_grad):
            torch.library.opcheck(cpp_op, args)


def test_opcheck_triton(triton_device):
    for requires_grad in (False, True):
        for args in sample_inputs(triton_device, requires_grad=requires_grad):
            torch.library.opcheck(op.cache_forecast_triton, args)


def test_cpp_gradient_is_coefficient_times_upstream_gradient():
    history, coeffs = next(sample_inputs(requires_grad=True))
    assert torch.autograd.gradcheck(lambda *F: op._cpp_op()(list(F), coeffs), history)


def test_compile_and_export_see_one_op():
    history, coeffs = random_history(2, (2, 5, 3), torch.float32, seed=5)
    expected = cache_forecast(history, coeffs)  # eager first: loads the extension outside the trace
    compiled = torch.compile(lambda h: cache_forecast(h, coeffs), fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(history), expected)

    class Forecast(torch.nn.Module):
        def forward(self, F0, F1):
            return cache_forecast([F0, F1], coeffs)

    program = torch.export.export(Forecast(), tuple(history))
    assert "torch.ops.fastflow.cache_forecast.default" in program.graph_module.code


# ---- input errors: the message names the argument, the expectation and what arrived ----


def bad_inputs():
    F = torch.randn(2, 5, 3)
    return [
        (
            [F, torch.randn(2, 5, 4)],
            [1.0, 2.0],
            ValueError,
            r"history\[1\] must have shape \(2, 5, 3\) .* got \(2, 5, 4\)",
        ),
        (
            [F, F.double()],
            [1.0, 2.0],
            TypeError,
            r"history\[1\] must have dtype torch.float32 .* got torch.float64",
        ),
        ([F, F.to("meta")], [1.0, 2.0], ValueError, r"history\[1\] must be on cpu .* got meta"),
        ([F, F], [1.0], ValueError, r"coeffs must have one entry per history tensor \(2\), got 1"),
        ([], [], ValueError, r"history must hold at least one tensor, got 0"),
        ([F.int()], [1.0], TypeError, r"history must be float32 or float64, got torch.int32"),
        ([F, F], [1.0, float("nan")], ValueError, r"coeffs\[1\] must be finite, got nan"),
    ]


@pytest.mark.parametrize("backend", ["cpp", "reference"])
@pytest.mark.parametrize("case", range(len(bad_inputs())))
def test_bad_inputs_raise_clear_errors(backend, case):
    history, coeffs, error, message = bad_inputs()[case]
    with pytest.raises(error, match=message):
        cache_forecast(history, coeffs, backend=backend)


@pytest.mark.parametrize("case", [0, 1, 3, 5, 6])  # the C++ checks, for direct calls of torch.ops.fastflow.*
def test_cpp_kernel_checks(case):
    history, coeffs, _, message = bad_inputs()[case]
    with pytest.raises(
        RuntimeError,
        match=message.replace(r"\(2, 5, 3\)", r"\[2, 5, 3\]")
        .replace(r"\(2, 5, 4\)", r"\[2, 5, 4\]")
        .replace("torch.float32", "Float")
        .replace("torch.float64", "Double")
        .replace("torch.int32", "Int"),
    ):
        op._cpp_op()(history, coeffs)


# ---- backend selection ----


@pytest.fixture
def extension_missing(monkeypatch):
    reason = "fastflow._C is not built. Build it with `pip install --no-build-isolation -e .`"
    monkeypatch.setattr(_extension, "_status", {"loaded": False, "how": None, "reason": reason})
    monkeypatch.setattr(backends, "_warned", set())


def test_explicit_cpp_without_extension_raises(extension_missing):
    with pytest.raises(
        RuntimeError, match=r"backend 'cpp' requested but fastflow._C is not built.*pip install"
    ):
        cache_forecast([torch.randn(3)], [1.0], backend="cpp")


def test_auto_without_extension_warns_once_and_uses_reference(extension_missing):
    history, coeffs = random_history(2, (2, 5, 3), torch.float32, seed=9)
    with pytest.warns(
        UserWarning, match="backend 'auto' uses the PyTorch reference ops: fastflow._C is not built"
    ):
        out = cache_forecast(history, coeffs)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cache_forecast(history, coeffs)
    torch.testing.assert_close(out, cache_forecast_reference(history, coeffs))
    assert backends.describe_backends()["auto"]["cpu"] == "reference"


def test_auto_picks_cpp_on_cpu():
    assert backends.resolve_backend("auto", "cpu") == "cpp"
    assert backends.resolve_backend(None, "cpu") == "cpp"
    assert "cpp" in backends.available_backends("cpu")


def test_backend_errors():
    with pytest.raises(ValueError, match=r"backend must be one of .* got 'fast'"):
        backends.resolve_backend("fast", "cpu")
    with pytest.raises(
        RuntimeError, match="backend 'cpp' requested but the cpp backend runs on cpu tensors, got meta"
    ):
        backends.resolve_backend("cpp", "meta")


def test_torch_version_mismatch_is_named(monkeypatch, tmp_path):
    library = tmp_path / "_C.abi3.so"
    library.write_bytes(b"\0fastflow-built-with-torch=1.0.0\0")
    monkeypatch.setattr(
        _extension.importlib.util, "find_spec", lambda name: SimpleNamespace(origin=str(library))
    )
    monkeypatch.setattr(
        _extension, "_load_jit", lambda reason: {"loaded": False, "how": None, "reason": reason}
    )
    reason = _extension._load()["reason"]
    assert "built against torch 1.0.0" in reason and f"torch {torch.__version__} is installed" in reason
