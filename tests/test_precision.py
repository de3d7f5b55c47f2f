"""Matrix-engine precision: the bf16 path of fastflow::semla_attention against its bf16-rounded reference and the
fp32 definition, patch_model(precision=...) (choice, refusals, report, equivariance, parameter updates), and the
CLI's --precision.

Tolerances (max|out - ref| / max|ref|, documented in README's mixed-precision section):
- bf16 op vs the reference that rounds the same operands to bf16 (in float64): 4e-3. Not float32 level: an
  activation that float32 rounding moves across a bf16 rounding boundary changes by one bf16 ulp (2^-8).
- bf16 op vs the float32 definition: 3e-2 (bf16's 8-bit mantissa, accumulated in float32).
- bf16 model: outputs within 5e-2 of the fp32 model; equivariance error 2e-2 (measured 1e-3 to 7e-3: the
  invariant features of rotated inputs differ in float32 rounding, which bf16 rounding can amplify by an ulp).
"""

import copy

import pytest
import torch

from fastflow import _extension
from fastflow.models import Semla, SemlaConfig
from fastflow.ops.backends import BackendUnavailable, resolve_precision
from fastflow.ops.semla_attention import semla_attention, semla_attention_reference
from fastflow.patch import patch_model
from fastflow.runtime import cpu_isa

from .models.conftest import perturbed_model, random_inputs
from .ops.semla_helpers import NO_EMBEDDING, cast, molecule_adjacency, seed_of
from .ops.semla_helpers import random_inputs as op_inputs

pytestmark = pytest.mark.usefixtures("single_thread")

HAS_BF16 = bool({"amx_bf16", "avx512_bf16"} & set(cpu_isa()))
needs_cpp = pytest.mark.skipif(not _extension.load_extension(), reason="fastflow._C is not built")
needs_bf16 = pytest.mark.skipif(not HAS_BF16, reason="this CPU has neither AMX-BF16 nor AVX512-BF16")

# (F, S, H, d_head, P, E_in, E_out): Z = H + P + E_out columns of the bf16 product. 96 = 64 + 32 takes two
# VNNI-packed column blocks where brgemm runs on AMX; Z = 40 and F = 24 (odd Z % 16) take the unpacked path.
CONFIGS = {
    "semlaflow-like": (128, 8, 32, 4, 64, 0, 0),
    "edges": (64, 16, 16, 8, 16, 32, 8),
    "odd": (24, 3, 5, 3, 3, 0, 7),
}


def max_relative(outputs, expected):
    return max(
        ((a.double() - b).abs().max() / b.abs().max()).item() for a, b in zip(outputs, expected) if b.numel()
    )


@needs_cpp
@pytest.mark.parametrize("config", CONFIGS)
@pytest.mark.parametrize("N", [1, 2, 3, 17, 44])
def test_bf16_op_matches_its_reference_and_the_fp32_definition(config, N):
    B = 1 if N == 44 else 3
    args = op_inputs(CONFIGS[config], B, N, seed_of("bf16", config, N), molecule_adjacency)
    with torch.inference_mode():
        fused = semla_attention(*cast(args, torch.float32), precision="bf16", backend="cpp")
        rounded = semla_attention_reference(*args, precision="bf16")
        exact = semla_attention_reference(*args)
    assert all(t.dtype == torch.float32 for t in fused)
    assert max_relative(fused, rounded) < 4e-3
    assert max_relative(fused, exact) < 3e-2


@needs_cpp
def test_precision_argument_is_checked():
    args = op_inputs(CONFIGS["odd"], 2, 5, 7)
    with pytest.raises(ValueError, match="needs float32"):
        semla_attention(*args, precision="bf16", backend="cpp")  # float64 inputs
    with pytest.raises(ValueError, match="triton backend only"):
        semla_attention(*cast(args, torch.float32), precision="tf32", backend="cpp")
    with pytest.raises(ValueError, match="precision must be one of"):
        semla_attention(*cast(args, torch.float32), precision="fp16", backend="reference")
    with pytest.raises(RuntimeError, match="precision must be 'fp32' or 'bf16'"):
        torch.ops.fastflow.semla_attention(*cast(args, torch.float32), *NO_EMBEDDING, 1e-5, 1e-6, "fp8")


# ---- choosing a precision ----


def test_auto_follows_the_cpu(monkeypatch):
    import fastflow.runtime

    monkeypatch.setattr(fastflow.runtime, "cpu_isa", lambda: ("avx2", "avx512", "amx_bf16"))
    assert resolve_precision("auto", "cpu") == "bf16"
    monkeypatch.setattr(fastflow.runtime, "cpu_isa", lambda: ("avx2", "avx512"))
    assert resolve_precision("auto", "cpu") == "fp32"
    with pytest.raises(BackendUnavailable, match="AMX-BF16 or AVX512-BF16"):
        resolve_precision("bf16", "cpu")
    with pytest.raises(BackendUnavailable, match="CUDA GPUs"):
        resolve_precision("tf32", "cpu")
    with pytest.raises(ValueError, match="precision must be one of"):
        resolve_precision("fp16", "cpu")


def test_patch_model_refuses_what_it_cannot_do():
    model = Semla(SemlaConfig.preset("tiny")).eval()
    with pytest.raises(ValueError, match="kernels='reference' swaps none"):
        patch_model(model, kernels="reference", precision="bf16")
    with pytest.raises(BackendUnavailable, match="tf32"):
        patch_model(model, precision="tf32")
    assert "_fastflow_patch" not in model.__dict__  # nothing half-done


# ---- the bf16 model ----


@pytest.fixture(scope="module")
def small_models():
    """A perturbed `small` model patched fp32 and bf16 (C++), sharing nothing."""
    if not (_extension.load_extension() and HAS_BF16):
        pytest.skip("needs fastflow._C and a CPU with bf16 instructions")
    base = perturbed_model(SemlaConfig.preset("small"), seed=1)
    fp32, bf16 = copy.deepcopy(base), copy.deepcopy(base)
    patch_model(fp32, kernels="cpp")
    handle = patch_model(bf16, kernels="cpp", precision="bf16")
    return base, fp32, bf16, handle


def test_bf16_model_is_close_to_fp32_and_reports_itself(small_models):
    base, fp32, bf16, handle = small_models
    assert bf16.state_dict().keys() == base.state_dict().keys()
    report = handle.report()["precision"]
    assert report["used"] == "bf16" and "fp32 accumulation" in report["why"]
    inputs = random_inputs(base.config, [9, 17, 5], n_pad=2, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected, outputs = fp32(**inputs), bf16(**inputs)
    assert all(t.dtype == torch.float32 for t in outputs)
    assert max_relative(outputs, expected) < 5e-2
    assert max_relative(outputs, expected) > 1e-6  # bf16 really ran


def test_bf16_model_is_equivariant_to_bf16_rounding(small_models):
    _, _, model, _ = small_models
    g = torch.Generator().manual_seed(4)
    inputs = random_inputs(model.config, [9, 17, 5], n_pad=2, generator=g)
    rotation, _ = torch.linalg.qr(torch.randn(3, 3, generator=g))
    mask = inputs["atom_mask"].unsqueeze(-1)
    moved = dict(inputs)
    for name in ("coords", "cond_coords"):
        moved[name] = (inputs[name] @ rotation.T + torch.randn(3, generator=g)) * mask
    with torch.no_grad():
        outputs, outputs_moved = model(**inputs), model(**moved)
    rotated = outputs[0] @ rotation.T * mask  # x̂₁ is centred: translation drops out
    assert ((outputs_moved[0] - rotated).norm() / rotated.norm()).item() < 2e-2
    assert max_relative(outputs_moved[1:], outputs[1:]) < 2e-2


def test_bf16_weights_follow_parameter_updates_and_copies(small_models):
    base, _, bf16, _ = small_models
    model = copy.deepcopy(bf16)  # the copy casts its own parameters
    inputs = random_inputs(base.config, [6, 4], generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        assert max_relative(model(**inputs), bf16(**inputs)) == 0.0
        for p in model.parameters():
            p.mul_(1.05)  # an optimiser step: in place, the version counter moves
        updated = model(**inputs)
        fresh = copy.deepcopy(base)
        for p in fresh.parameters():
            p.mul_(1.05)
        patch_model(fresh, kernels="cpp", precision="bf16")
        assert max_relative(updated, fresh(**inputs)) == 0.0


def test_cli_refuses_tf32_on_cpu(tmp_path, capsys):
    from fastflow.cli import main

    out = tmp_path / "x.sdf"
    assert main(["sample", "--n", "2", "--steps", "2", "--precision", "tf32", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "tf32" in err[0]
    assert not out.exists()


@needs_bf16
@needs_cpp
def test_bench_precision_smoke(tmp_path):
    """`fastflow bench precision` end to end on the tiny preset and a 4-molecule, 3-step gate."""
    import json

    from fastflow.cli import main

    out = tmp_path / "precision.json"
    argv = ["bench", "precision", "--presets", "tiny", "--repeats", "1", "--n", "4", "--steps", "3"]
    assert main([*argv, "--out", str(out)]) == 0
    results = json.loads(out.read_text())
    assert results["machine"]["gemm_gflops"]["bf16"] > 0
    assert [(row["B"], row["N"]) for row in results["forward"]] == [(32, 18), (8, 44)]  # 2 x 100 > max_atoms
    for row in results["op"]:
        assert 0 < row["max_rel_error"] < 3e-2 and row["bf16_ms"] > 0
    for row in results["forward"]:
        assert 0 < max(row["bf16 errors"].values()) < 1e-1
    gate = {(row["precision"], row["cache"]): row for row in results["sampling"]}
    assert set(gate) == {(p, c) for p in ("fp32", "bf16") for c in ("none", "taylor-2, D=2")}
    assert all(0 <= row["same_graph_as_fp32"] <= 1 for row in gate.values() if row["precision"] == "bf16")


def test_triton_precisions_under_the_interpreter(triton_device):
    """tf32 runs (the interpreter computes it as fp32); bf16 is refused there, since the interpreter's bf16 dots
    are wrong, and is checked on a GPU by bench/gpu_check.py."""
    args = cast(op_inputs(CONFIGS["odd"], 2, 5, seed_of("triton precision")), torch.float32, triton_device)
    expected = semla_attention_reference(*args)
    got = semla_attention(*args, precision="tf32", backend="triton")
    assert max_relative(got, expected) < 1e-5
    with pytest.raises(BackendUnavailable, match="TRITON_INTERPRET"):
        semla_attention(*args, precision="bf16", backend="triton")
