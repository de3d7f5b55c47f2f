"""`fastflow bench gpu-static`: the Triton kernels compile for NVIDIA GPUs on a machine without one, and fit them.

One `--quick` run (the smallest case of each kernel plus semla_attention's semlaflow core layer, fp32 and tf32) for
sm_89, the architecture with the least shared memory per block among the targets (99 KB), and sm_90 (Hopper,
compiled as sm_90a). The fit tests fail if a kernel starts spilling or needs more shared memory than the architecture
allows.
"""

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("triton", reason="triton is not installed")

from fastflow.benchmarks import gpu_static  # noqa: E402 — after the skip

TARGETS = ("sm_89", "sm_90")
SEMLAFLOW_CORE = "semlaflow/core/fp32"
SEMLAFLOW_TF32 = "semlaflow/core/tf32"


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    """The JSON of `fastflow bench gpu-static --quick` (TRITON_INTERPRET, set by conftest, stays in the
    environment: the command must compile in a child process without it)."""
    out = tmp_path_factory.mktemp("gpu_static") / "gpu-static.json"
    command = [
        sys.executable,
        "-m",
        "fastflow",
        "bench",
        "gpu-static",
        "--quick",
        "--targets",
        *TARGETS,
        "--json",
        "--no-progress",
        "--out",
        str(out),
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=900, env=dict(os.environ))
    assert result.returncode == 0, result.stderr[-3000:]
    printed = json.loads(result.stdout)
    assert json.loads(out.read_text())["rows"] == printed["rows"]
    return printed


def rows_of(report, kernel, target, variant=None):
    rows = [
        row
        for row in report["rows"]
        if row["kernel"] == kernel
        and row["target"] == target
        and (variant is None or row["variant"] == variant)
    ]
    assert rows, f"no rows for {kernel} {variant or ''} {target}"
    return rows


def test_every_row_compiles_with_the_json_keys(report):
    rows = report["rows"]
    kernels = {row["kernel"] for row in rows}
    assert kernels == set(gpu_static.KERNELS)
    assert {row["target"] for row in rows} == set(TARGETS)
    for row in rows:
        assert set(gpu_static.JSON_KEYS) <= set(row), row
        assert "error" not in row, row
        assert row["registers"] > 0, row
        assert row["shared_limit"] == gpu_static.SHARED_LIMITS[gpu_static.parse_target(row["target"])]
        assert isinstance(row["tensor_cores"], bool) and isinstance(row["ok"], bool)
        assert row["ok"] == (row["spill_bytes"] == 0 and row["shared_bytes"] <= row["shared_limit"])
    assert {row["gpu_name"] for row in rows if row["target"] == "sm_90"} == {"sm_90a"}
    assert report["machine"]["cpu"] and report["toolchain"]["triton"]


def fit_cases():
    for target in TARGETS:
        yield pytest.param("semla_attention", "small/core/fp32", target, id=f"semla-small-core-{target}")
        yield pytest.param("semla_attention", SEMLAFLOW_CORE, target, id=f"semla-semlaflow-core-{target}")
        yield pytest.param(
            "semla_attention", SEMLAFLOW_TF32, target, id=f"semla-semlaflow-core-tf32-{target}"
        )
        for kernel in gpu_static.KERNELS:
            if kernel == "semla_attention":  # its variants are listed above, with the known misses
                continue
            yield pytest.param(kernel, None, target, id=f"{kernel}-{target}")


@pytest.mark.parametrize("kernel, variant, target", list(fit_cases()))
def test_fits_the_gpu(report, kernel, variant, target):
    for row in rows_of(report, kernel, target, variant):
        assert row["spill_bytes"] == 0, f"{kernel} {row['variant']} {target} spills {row['spill_bytes']} B"
        assert row["shared_bytes"] <= row["shared_limit"], (
            f"{kernel} {row['variant']} {target}: {row['shared_bytes']} B of shared memory > {row['shared_limit']}"
        )


@pytest.mark.parametrize("target", TARGETS)
def test_semla_attention_tf32_uses_tensor_cores(report, target):
    # precision="tf32" at the semlaflow preset: the hidden layer's and output linear's dots on tensor cores
    # (HMMA, or wgmma's HGMMA on sm_90a). The fp32 variant keeps ieee dots (FMA units) by design.
    (row,) = rows_of(report, "semla_attention", target, SEMLAFLOW_TF32)
    assert row["tensor_cores"], row
    (row,) = rows_of(report, "semla_attention", target, SEMLAFLOW_CORE)
    assert not row["tensor_cores"], row


@pytest.mark.parametrize("target", TARGETS)
def test_semla_attention_bf16_uses_tensor_cores(report, target):
    # precision="bf16" (the output linear's dots on bf16 operands): HMMA / WGMMA in the SASS, and it fits.
    (row,) = rows_of(report, "semla_attention", target, "small/core/bf16")
    assert row["tensor_cores"] and row["ok"], row


@pytest.mark.parametrize("deterministic", [False, True])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_tp_conv_launches_carry_the_launch_options(deterministic, dtype):
    # gpu-static compiles what the launcher launches (it records the launch's keyword arguments): tp_conv passes
    # its per-dtype options (maxnreg, num_warps) to every path's launch, so the spill-free rows are the kernels
    # a GPU would run.
    import torch
    from fastflow.triton_kernels import tensor_product as module

    dtype = getattr(torch, dtype)
    expected = module.launch_options(dtype, deterministic=deterministic)
    descriptor = gpu_static.fully_connected_descriptor("2x0e+2x1o")
    name = "_tp_conv_deterministic_kernel" if deterministic else "_tp_conv_atomic_kernel"
    with gpu_static._recording(module, name) as (_, recorder):
        module.tp_conv(
            torch.ones(3, descriptor.dim_in1, dtype=dtype),
            torch.ones(4, descriptor.dim_in2, dtype=dtype),
            torch.ones(descriptor.weight_numel, dtype=dtype),
            torch.tensor([0, 1, 2, 0]),
            torch.tensor([1, 2, 0, 0]),
            3,
            *descriptor.tensors(dtype),
            descriptor.dim_out,
            deterministic=deterministic,
        )
    assert recorder.launches
    for _, kwargs in recorder.launches:
        assert {key: kwargs.get(key) for key in expected} == expected


def test_semla_shapes_follow_the_model():
    """The F / E / EO of each layer kind match the layers a Semla model builds (first, core, last)."""
    from fastflow.models import Semla, SemlaConfig

    config = SemlaConfig.preset("tiny")
    layers = Semla(config).dynamics.layers
    for layer, module in (("edge_in", layers[0]), ("core", layers[1]), ("edge_out", layers[-1])):
        shapes = gpu_static.semla_layer_shapes(config, layer)
        first, second = module.message_ff.message_mlp[0], module.message_ff.message_mlp[2]
        assert shapes["F"] == first.out_features
        assert shapes["H"] + shapes["P"] + shapes["EO"] == second.out_features
        assert shapes["E"] == (module.d_edge_in or 0) and shapes["EO"] == (module.d_edge_out or 0)
        assert shapes["P"] == module.coord_attn.coord_proj.out_features
        assert shapes["D"] * shapes["H"] == config.d_model


def test_nequip_descriptor_matches_e3nn():
    pytest.importorskip("e3nn")
    from fastflow.benchmarks.tp import nequip_tensor_product
    from fastflow.tp import TPDescriptor

    for irreps, lmax in (("32x0e+32x1o", 2), ("32x0e+32x1o+32x2e+32x3o", 3)):
        ours = gpu_static.nequip_descriptor(irreps, lmax)
        theirs = TPDescriptor.from_e3nn(nequip_tensor_product(irreps, lmax))
        assert (ours.irreps_in1, ours.irreps_in2, ours.irreps_out) == (
            theirs.irreps_in1,
            theirs.irreps_in2,
            theirs.irreps_out,
        )
        assert [tuple(i[:5]) for i in ours.instructions] == [tuple(i[:5]) for i in theirs.instructions]


def test_tensor_core_opcodes_and_targets():
    sass = """
        /*0040*/                   HFMA2.MMA R31, -RZ, RZ, 0, 0 ;
        /*0050*/              @!P0 HMMA.1688.F32.TF32 R4, R8, R12, R4 ;
        /*0060*/                   HGMMA.64x64x16.F32 R24, gdesc[UR4], RZ ;
    """
    opcodes = [op.split(".")[0] for op in gpu_static._SASS_OPCODE.findall(sass)]
    assert opcodes == ["HFMA2", "HMMA", "HGMMA"]
    assert [op in gpu_static.TENSOR_CORE_OPCODES for op in opcodes] == [False, True, True]
    assert gpu_static.parse_target("sm_90a") == gpu_static.parse_target("90") == 90
    with pytest.raises(ValueError):
        gpu_static.parse_target("sm_70")


def test_a_failing_case_is_a_row_not_a_crash():
    case = gpu_static.Case("semla_attention", "broken", fn=None, args=(), kwargs={})
    row = gpu_static.compile_case(case, "sm_80")
    assert row["ok"] is False and row["error"].startswith("AttributeError: ")
    assert set(gpu_static.JSON_KEYS) <= set(row) and row["shared_limit"] == 166912
