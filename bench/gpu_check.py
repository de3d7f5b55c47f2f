"""The first run on a CUDA GPU: is every fused op and patched model right there, and how fast is it?

    python bench/gpu_check.py [--device cuda] [--tiny] [--json PATH] [--no-compile] [--compile-backend inductor]

From a fresh clone after ``pip install`` of a CUDA torch, triton and fastflow (``pip install -e .[dev]`` brings
e3nn and cuequivariance), in under 5 minutes on an A100 / H100:

1. correctness on the device, every fused op against its reference op (float64 where the op takes it):
   semla_attention (core layer, edge input, edge embedding, edge output; fp32, bf16 and tf32 — tf32 is fp32
   under the interpreter),
   bond_head (where it has a GPU kernel; skipped with the reason otherwise), tensor_product and tp_conv (forward
   and gradients, against e3nn), cache_forecast, discrete_flow_step (same draws); then patched models against
   unpatched ones: fastflow's Semla, fastflow's Semla on upstream SemlaFlow's weights against upstream's outputs
   (tests/models/fixtures), and an e3nn NequIP-style potential (energy and forces);
2. benchmarks: fused (and on CUDA its tf32 and bf16 variants) vs reference vs ``torch.compile`` of the reference
   per op, semla_attention next to its roofline prediction (fastflow.benchmarks.roofline) on an A100 / H100,
   tensor products against e3nn, compiled e3nn, cuEquivariance and OpenEquivariance (where installed), the
   generator forward, and end-to-end sampling of the packaged model (reference and fused, without and with the
   cache) with how many graphs equal the reference's.

Prints a machine header and tables; ``--json`` writes everything. Exit status 1 if a correctness check fails or a
benchmark raises. On a machine without a GPU, ``TRITON_INTERPRET=1 python bench/gpu_check.py --device cpu
--tiny`` runs the same code with Triton's interpreter on CPU tensors (tests/test_gpu_check.py, so CI catches a
broken check before a GPU does).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
import traceback
import warnings
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F

from fastflow.benchmarks.kernels import layer_op_inputs, print_table, random_inputs
from fastflow.benchmarks.timing import machine_header, machine_metadata, median_seconds
from fastflow.models import Semla, SemlaConfig
from fastflow.ops.backends import BackendUnavailable, resolve_backend
from fastflow.patch import patch_model

REPO = Path(__file__).resolve().parents[1]
UPSTREAM_FIXTURE = REPO / "tests" / "models" / "fixtures" / "upstream_semla_tiny.safetensors"
OUTPUTS = ("coords", "type_logits", "bond_logits", "charge_logits")  # the fixture's names
FP32 = 1e-5  # max|fused - reference| / max|reference|, fp32 against a float64 reference (as the tests)


def relative_error(got, expected) -> float:
    return (
        (got.double() - expected.double()).abs().max() / expected.double().abs().max().clamp_min(1e-30)
    ).item()


def max_error(got, expected) -> float:
    return max(relative_error(a, b) for a, b in zip(got, expected) if b.numel())


class Report:
    """Correctness rows and benchmark sections; a failing check or benchmark is recorded, never fatal."""

    def __init__(self):
        self.correctness, self.benchmarks, self.seconds = [], {}, {}

    def check(self, name: str, fn, tolerance: float) -> None:
        """fn() -> the max relative error, or a dict with it, further numbers and "ok" (a condition of its own);
        skipped if a backend is unavailable."""
        row = {"check": name, "tolerance": tolerance}
        try:
            result = fn()
            result = result if isinstance(result, dict) else {"max_rel_error": result}
            row.update(result)
            row["ok"] = row["max_rel_error"] <= tolerance and result.get("ok", True)
            detail = f"max rel error {row['max_rel_error']:.2e} (tolerance {tolerance:g})" + "".join(
                f", {k} {v:.2e}" if isinstance(v, float) else f", {k} {v}"
                for k, v in result.items()
                if k not in ("max_rel_error", "ok")
            )
        except BackendUnavailable as error:
            row.update(ok=None, skipped=str(error))
            detail = row["skipped"]
        except Exception as error:  # noqa: BLE001 — reported as a failed check, the run goes on
            row.update(ok=False, error=f"{type(error).__name__}: {error}", traceback=traceback.format_exc())
            detail = row["error"]
        status = {True: "ok", False: "FAIL", None: "skipped"}[row["ok"]]
        print(f"  {status:>7}  {name}: {detail.splitlines()[0][:160]}", flush=True)
        self.correctness.append(row)

    def bench(self, section: str, fn, columns: list[str]) -> None:
        """fn() -> rows; an exception becomes a row with the error."""
        started = time.perf_counter()
        try:
            rows = fn()
        except Exception as error:  # noqa: BLE001 — reported, the run goes on
            rows = [{"error": f"{type(error).__name__}: {error}", "traceback": traceback.format_exc()}]
            print(f"  {section} FAILED: {rows[0]['error'][:200]}", flush=True)
        self.benchmarks[section] = rows
        self.seconds[section] = time.perf_counter() - started
        print_table(f"{section} ({self.seconds[section]:.1f} s)", rows, columns)

    @property
    def ok(self) -> bool:
        return all(row["ok"] is not False for row in self.correctness) and not any(
            "error" in row for rows in self.benchmarks.values() for row in rows
        )


# ---- inputs ----


def semla_args(
    config: SemlaConfig, B: int, N: int, variant: str, device, dtype=torch.float32, seed=0
) -> dict:
    """semla_attention's arguments for one layer of ``config``: "core", "edge_in" (the first layer's LayerNorm
    and linear on edge features), "embed" (edge_in on the raw edge input, embedded inside the op) or "edge_out"
    (the last layer, writing d_edge edge channels); adjacency without self-loops and with one padding atom."""
    args = layer_op_inputs(config, B, N, seed)
    g = torch.Generator().manual_seed(seed + 1)
    F_, E, H, P = (
        args["node_terms_i"].size(2),
        config.d_edge,
        args["values"].size(2),
        args["attn_coords"].size(1),
    )
    adjacency = args["adjacency"].clone()
    adjacency[:, -1, :] = adjacency[:, :, -1] = False
    args["adjacency"] = adjacency
    if variant in ("edge_in", "embed"):
        X = 2 * config.n_edge_types if variant == "embed" else E  # bond one-hots and self-conditioning probs
        args.update(
            edge_feats=torch.randn(B, N, N, X, generator=g),
            edge_norm_weight=1 + 0.2 * torch.randn(E, generator=g),
            edge_norm_bias=0.2 * torch.randn(E, generator=g),
            edge_weight=torch.randn(F_, E, generator=g) * E**-0.5,
        )
    if variant == "embed":
        args.update(
            embed_weight1=torch.randn(E, X, generator=g) * X**-0.5,
            embed_bias1=0.1 * torch.randn(E, generator=g),
            embed_weight2=torch.randn(E, E, generator=g) * E**-0.5,
            embed_bias2=0.1 * torch.randn(E, generator=g),
        )
    if variant == "edge_out":
        args["out_weight"] = torch.randn(H + P + E, F_, generator=g) * F_**-0.5
        args["out_bias"] = 0.5 * torch.randn(H + P + E, generator=g)
    return {k: v.to(device, dtype if v.is_floating_point() else v.dtype) for k, v in args.items()}


def bond_head_args(config: SemlaConfig, B: int, N: int, device, dtype=torch.float32) -> dict:
    E, F_, K = config.d_edge, config.d_message, config.n_edge_types
    g = torch.Generator().manual_seed(3)

    def randn(*shape, scale=1.0, shift=0.0):
        return (torch.randn(shape, generator=g) * scale + shift).to(device, dtype)

    return dict(
        edge_feats=randn(B, N, N, E),
        bond_norm_weight=randn(E, scale=0.1, shift=1),
        bond_norm_bias=randn(E, scale=0.1),
        head_weight1=randn(E, E, scale=E**-0.5),
        head_bias1=randn(E, scale=0.1),
        head_weight2=randn(K, E, scale=E**-0.5),
        head_bias2=randn(K, scale=0.1),
        node_terms_i=randn(B, N, F_),
        node_terms_j=randn(B, N, F_),
        coords=randn(B, N, 3),
        edge_norm_weight=randn(E, scale=0.1, shift=1),
        edge_norm_bias=randn(E, scale=0.1),
        edge_weight=randn(F_, E, scale=E**-0.5),
        dist_weight=randn(F_, scale=0.1),
        dot_weight=randn(F_, scale=0.1),
        refine_weight=randn(E, F_, scale=F_**-0.5),
        refine_bias=randn(E, scale=0.1),
    )


def discrete_step_args(B: int, N: int, K: int, pairs: bool, device, seed=0) -> tuple:
    from fastflow import rng

    g = torch.Generator().manual_seed(seed)
    shape = (B, N, N, K) if pairs else (B, N, K)
    logits = torch.randn(shape, generator=g) * 3
    current = F.one_hot(torch.randint(0, K, shape[:-1], generator=g), K).float()
    mask = torch.arange(N)[None] < torch.randint(1, N + 1, (B,), generator=g)[:, None]
    keys = rng.molecule_keys(seed, torch.arange(B))
    stream = rng.STEP_BONDS if pairs else rng.STEP_ATOMS
    tensors = (logits, current, mask, torch.rand(B, generator=g), keys)
    return (*(t.to(device) for t in tensors), 5, stream, 0.01, 1.0)


def tp_case(config: str, n_edges: int, device, tiny: bool) -> tuple:
    """(e3nn module, inputs) of a NequIP convolution of ``fastflow bench tp`` (4 channels per irrep if tiny)."""
    from fastflow.benchmarks.tp import CONFIGS, case_inputs, nequip_tensor_product

    irreps, lmax = CONFIGS[config]
    if tiny:
        irreps = irreps.replace("32x", "4x")
    tp = nequip_tensor_product(irreps, lmax).to(device)
    data = {k: v.to(device) for k, v in case_inputs(tp, n_edges, max(1, n_edges // 20)).items()}
    return tp, data, irreps, lmax


def semla_model_inputs(config: SemlaConfig, sizes: list[int], device, n_pad: int = 1) -> dict:
    """Generator inputs for molecules of ``sizes`` atoms padded to max(sizes) + n_pad."""
    inputs = random_inputs(config, len(sizes), max(sizes) + n_pad)
    mask = (torch.arange(max(sizes) + n_pad) < torch.tensor(sizes)[:, None]).long()
    inputs["atom_mask"] = mask
    inputs["coords"] = inputs["coords"] * mask[..., None]
    return {k: v.to(device) for k, v in inputs.items()}


def real_parts(outputs, mask) -> list:
    """The generator's outputs on real atoms and pairs (padding values are not part of the contract)."""
    m = mask.bool()
    pair = m[:, :, None] & m[:, None, :]
    return [outputs[0][m], outputs[1][m], outputs[2][pair], outputs[3][m]]


def perturbed(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Weights off their trivial initial values (LayerNorm ones and zeros), as the tests do."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g).to(p.device, p.dtype))
    return model


class NequIPPotential(torch.nn.Module):
    """Two NequIP-style interactions (e3nn): a species self-interaction (FullyConnectedTensorProduct) plus a
    uvu convolution with spherical harmonics and radial weights; energy = sum of scalar outputs."""

    def __init__(self, hidden: str, n_species: int = 3, n_radial: int = 8):
        from e3nn import o3

        from fastflow.benchmarks.tp import nequip_tensor_product

        super().__init__()
        self.n_radial = n_radial
        self.embed = o3.Linear(f"{n_species}x0e", hidden)
        self.self_interaction = torch.nn.ModuleList()
        self.convolution = torch.nn.ModuleList()
        self.radial = torch.nn.ModuleList()
        self.linear = torch.nn.ModuleList()
        for _ in range(2):
            tp = nequip_tensor_product(hidden, 2)
            self.self_interaction.append(o3.FullyConnectedTensorProduct(hidden, f"{n_species}x0e", hidden))
            self.convolution.append(tp)
            self.radial.append(
                torch.nn.Sequential(
                    torch.nn.Linear(n_radial, 16), torch.nn.SiLU(), torch.nn.Linear(16, tp.weight_numel)
                )
            )
            self.linear.append(o3.Linear(tp.irreps_out, hidden))
        self.readout = o3.Linear(hidden, "1x0e")

    def forward(self, positions, species, src, dst):
        from e3nn import o3

        vectors = positions[dst] - positions[src]
        sh = o3.spherical_harmonics(o3.Irreps.spherical_harmonics(2), vectors, normalize=True)
        centres = torch.linspace(0.5, 3.0, self.n_radial, device=positions.device)
        radial = torch.exp(-(vectors.norm(dim=-1, keepdim=True) - centres).square())
        x = self.embed(species)
        for si, tp, rad, lin in zip(self.self_interaction, self.convolution, self.radial, self.linear):
            messages = tp(x[src], sh, rad(radial))
            aggregated = messages.new_zeros(x.size(0), messages.size(1)).index_add(0, dst, messages)
            x = si(x, species) + lin(aggregated) / 4
        return self.readout(x).sum()


# ---- correctness ----


def check_ops(report: Report, device, fused: str, tiny: bool) -> None:
    from fastflow.ops.bond_head import bond_head
    from fastflow.ops.cache_forecast import cache_forecast
    from fastflow.ops.discrete_flow_step import discrete_flow_step
    from fastflow.ops.semla_attention import semla_attention, semla_attention_reference

    config = SemlaConfig.preset("tiny" if tiny else "small")
    B, N = (2, 5) if tiny else (4, 23)

    def semla(variant, precision):
        args = semla_args(config, B, N, variant, device)
        got = semla_attention(**args, precision=precision, backend=fused)
        # In float64; bf16 is defined by the reference that rounds the same operands to bf16, tf32 (10-bit
        # mantissa) is checked against the fp32 definition.
        args64 = {k: v.double() if v.is_floating_point() else v for k, v in args.items()}
        if precision != "bf16":
            return max_error(got, semla_attention_reference(**args64))
        # ... and bf16 must really have run: off the fp32 definition by more than fp32 rounding
        off_fp32 = max_error(got, semla_attention_reference(**args64))
        return {
            "max_rel_error": max_error(got, semla_attention_reference(**args64, precision="bf16")),
            "error_vs_fp32": off_fp32,
            "ok": off_fp32 > 1e-5,
        }

    # bf16: 4e-3 as tests/test_precision.py (an activation that fp32 rounding moves across a bf16 rounding
    # boundary changes by one bf16 ulp); tf32 runs as fp32 under the interpreter.
    precisions = {"fp32": FP32, "bf16": 4e-3, "tf32": 1e-2}
    for variant in ("core", "edge_in", "embed", "edge_out"):
        for precision, tolerance in precisions.items():
            report.check(
                f"semla_attention {variant} {precision}", partial(semla, variant, precision), tolerance
            )

    def bond(precision):
        args = bond_head_args(config, B, N, device)
        got = bond_head(**args, backend=fused, precision=precision)
        return relative_error(got, bond_head(**{k: v.double() for k, v in args.items()}, backend="reference"))

    for precision, tolerance in {"fp32": FP32, "tf32": 1e-2, "bf16": 3e-2}.items():
        name = "bond_head" if precision == "fp32" else f"bond_head {precision}"
        report.check(name, partial(bond, precision), tolerance)

    for config_name in ("l1", "l3"):
        report.check(
            f"tensor_product {config_name} forward",
            partial(tensor_product_check, config_name, device, fused, tiny, False),
            FP32,
        )
        report.check(
            f"tensor_product {config_name} gradients",
            partial(tensor_product_check, config_name, device, fused, tiny, True),
            1e-4,
        )
        report.check(
            f"tp_conv {config_name} forward",
            partial(tp_conv_check, config_name, device, fused, tiny, False),
            FP32,
        )
        report.check(
            f"tp_conv {config_name} gradients",
            partial(tp_conv_check, config_name, device, fused, tiny, True),
            1e-4,
        )

    # NequIP's self-interaction (shared weights, uvw): the tl.dot tiles of the tf32 / bf16 variants
    for precision, tolerance in {"fp32": FP32, "tf32": 1e-2, "bf16": 3e-2}.items():
        report.check(
            f"tensor_product self-interaction {precision}",
            partial(self_interaction_check, device, fused, tiny, precision),
            tolerance,
        )

    def forecast():
        g = torch.Generator().manual_seed(4)
        history = [torch.randn(B, N, N, 5, generator=g).to(device) for _ in range(3)]
        coeffs = [1.5, -0.75, 0.25]
        got = cache_forecast(history, coeffs, backend=fused)
        return relative_error(got, cache_forecast([h.double() for h in history], coeffs, backend="reference"))

    report.check("cache_forecast K=3", forecast, FP32)

    def discrete(K, pairs):
        args = discrete_step_args(B, N, K, pairs, device)
        probs, drawn = discrete_flow_step(*args, backend=fused)
        ref_probs, ref_drawn = discrete_flow_step(*args, backend="reference")
        differing = int((drawn != ref_drawn).any(-1).sum())
        return {
            "max_rel_error": relative_error(probs, ref_probs),
            "differing_draws": differing,
            "ok": differing == 0,
        }

    report.check("discrete_flow_step atom types", partial(discrete, 18, False), FP32)
    report.check("discrete_flow_step bonds", partial(discrete, 5, True), FP32)


def tensor_product_check(config: str, device, fused: str, tiny: bool, gradients: bool) -> float:
    """fastflow.nn.TensorProduct on ``fused`` against e3nn's module: the output, or the gradients of x1, x2, w."""
    from fastflow.nn import TensorProduct

    tp, data, _, _ = tp_case(config, 40 if tiny else 2000, device, tiny)
    x = data["node_feats"][data["edge_src"]]
    return _against_e3nn(
        tp, TensorProduct(tp, backend=fused), (x, data["edge_attrs"], data["weights"]), gradients
    )


def self_interaction_case(device, tiny: bool, rows: int) -> tuple:
    """NequIP's self-interaction (e3nn's FullyConnectedTensorProduct of features x one-hot species, shared
    weights) and ``rows`` random inputs."""
    from e3nn import o3

    irreps = "16x0e+16x1o" if tiny else "64x0e+64x1o+64x2e"
    tp = o3.FullyConnectedTensorProduct(irreps, "4x0e", irreps).to(device)
    g = torch.Generator().manual_seed(5)
    x = torch.randn(rows, tp.irreps_in1.dim, generator=g).to(device)
    species = torch.nn.functional.one_hot(torch.randint(4, (rows,), generator=g), 4).float().to(device)
    return tp, x, species


def self_interaction_check(device, fused: str, tiny: bool, precision: str) -> float:
    """fastflow.nn.TensorProduct in ``precision`` against e3nn's FullyConnectedTensorProduct (features x one-hot
    species) in float64 (tf32 / bf16 against the float32 definition, at their own tolerance)."""
    from fastflow.nn import TensorProduct

    tp, x, species = self_interaction_case(device, tiny, 40 if tiny else 20_000)
    with torch.no_grad():
        got = TensorProduct(tp, backend=fused, precision=precision)(x, species)
        expected = tp.double()(x.double(), species.double())
    return relative_error(got, expected)


def tp_conv_check(config: str, device, fused: str, tiny: bool, gradients: bool) -> float:
    from fastflow.nn import TPConv

    tp, data, _, _ = tp_case(config, 40 if tiny else 2000, device, tiny)
    src, dst, n = data["edge_src"], data["edge_dst"], data["node_feats"].size(0)
    return _against_e3nn(
        partial(e3nn_conv, tp, src, dst, n),
        partial(fused_conv, TPConv(tp, backend=fused), src, dst, n),
        (data["node_feats"], data["edge_attrs"], data["weights"]),
        gradients,
    )


def e3nn_conv(tp, src, dst, n: int, x, sh, w):
    """The convolution in e3nn: gather, product, scatter-sum."""
    messages = tp(x[src], sh, w)
    return messages.new_zeros(n, messages.size(1)).index_add(0, dst, messages)


def fused_conv(conv, src, dst, n: int, x, sh, w):
    return conv(x, sh, w, src, dst, n)


def _against_e3nn(reference, fused, inputs: tuple, gradients: bool) -> float:
    if not gradients:
        with torch.no_grad():
            return relative_error(fused(*inputs), reference(*inputs))
    grad = torch.randn_like(reference(*inputs))
    errors = []
    leaves_ref = [t.clone().requires_grad_() for t in inputs]
    leaves_fused = [t.clone().requires_grad_() for t in inputs]
    expected = torch.autograd.grad(reference(*leaves_ref), leaves_ref, grad)
    got = torch.autograd.grad(fused(*leaves_fused), leaves_fused, grad)
    errors = [relative_error(a, b) for a, b in zip(got, expected)]
    return max(errors)


def check_models(report: Report, device, fused: str, tiny: bool) -> None:
    presets = ("tiny",) if tiny else ("small", "semlaflow")
    for preset in presets:
        report.check(f"patched Semla '{preset}'", partial(patched_semla_check, preset, device, fused), FP32)
    report.check(
        "patched Semla on upstream SemlaFlow weights vs upstream outputs",
        partial(upstream_check, device, fused),
        FP32,
    )
    report.check(
        "unpatched Semla on the device vs upstream outputs",
        partial(upstream_check, device, "reference"),
        FP32,
    )
    report.check(
        "patched e3nn NequIP potential: energy and forces",
        partial(e3nn_model_check, device, fused, tiny),
        1e-4,
    )


def patched_semla_check(preset: str, device, fused: str) -> float:
    config = SemlaConfig.preset(preset)
    model = perturbed(Semla(config)).to(device).eval()
    inputs = semla_model_inputs(config, [5, 3, 7] if preset == "tiny" else [9, 4, 23], device)
    with torch.no_grad():
        expected = real_parts(model(**inputs), inputs["atom_mask"])
        patch_model(model, kernels=fused)
        got = real_parts(model(**inputs), inputs["atom_mask"])
    return max_error(got, expected)


def upstream_check(device, kernels: str) -> float:
    """fastflow's Semla with upstream SemlaFlow's tiny generator's weights on the device, against the outputs
    upstream's own classes produced (tests/models/fixtures/generate_upstream_fixture.py)."""
    from safetensors.torch import load_file

    fixture = load_file(UPSTREAM_FIXTURE)
    part = {
        kind: {k.split(".", 2)[2]: v.to(device) for k, v in fixture.items() if k.startswith(f"sc.{kind}.")}
        for kind in ("param", "input", "output")
    }
    model = Semla(SemlaConfig.preset("tiny")).to(device).eval()
    model.load_state_dict(part["param"])
    if kernels != "reference":
        patch_model(model, kernels=kernels)
    with torch.no_grad():
        got = model(**part["input"])
    mask = part["input"]["atom_mask"]
    return max_error(real_parts(got, mask), real_parts([part["output"][name] for name in OUTPUTS], mask))


def e3nn_model_check(device, fused: str, tiny: bool) -> dict:
    """patch_model swaps the e3nn tensor products for fused ones: same energy, and same forces (the fused
    backward kernels)."""
    torch.manual_seed(0)
    model = NequIPPotential("4x0e+2x1o+2x2e" if tiny else "16x0e+8x1o+4x2e").to(device)
    n = 6 if tiny else 40
    g = torch.Generator().manual_seed(1)
    positions = (torch.randn(n, 3, generator=g) * 1.5).to(device)
    species = F.one_hot(torch.randint(3, (n,), generator=g), 3).float().to(device)
    pairs = torch.cartesian_prod(torch.arange(n), torch.arange(n)).to(device)
    pairs = pairs[pairs[:, 0] != pairs[:, 1]]
    src, dst = pairs[:, 0].contiguous(), pairs[:, 1].contiguous()

    def energy_forces():
        p = positions.clone().requires_grad_()
        energy = model(p, species, src, dst)
        forces = -torch.autograd.grad(energy, p)[0]
        return energy.detach(), forces

    expected = energy_forces()
    handle = patch_model(model, kernels=fused)
    got = energy_forces()
    swapped = len(handle.swaps)
    return {"max_rel_error": max_error(got, expected), "swapped_modules": swapped, "ok": swapped > 0}


# ---- benchmarks ----


def compiled(fn, example: dict | tuple, backend: str):
    """torch.compile(fn) warmed up on ``example`` (static shapes, a fresh compile per case)."""
    torch._dynamo.reset()
    fn = torch.compile(fn, dynamic=False, backend=backend)
    with torch.no_grad():
        fn(**example) if isinstance(example, dict) else fn(*example)
    return fn


def timed(variants: dict, repeats: int, base: str = "reference") -> dict:
    with torch.no_grad():
        seconds = median_seconds(variants, repeats, warmup=1)
    row = {f"{name}_ms": 1e3 * s for name, s in seconds.items()}
    for name, s in seconds.items():
        if name != base:
            row[f"{name}_speedup"] = seconds[base] / s
    return row


def bench_semla_attention(device, fused: str, options) -> list[dict]:
    from fastflow.ops.semla_attention import (
        ARGUMENTS,
        semla_attention,
        semla_attention_flops,
        semla_attention_reference,
    )

    precisions = ("fp32", "tf32", "bf16") if device.type == "cuda" else ("fp32",)
    predicted = roofline_fp32_us(device)
    rows = []
    for preset, cases in options.semla_cases.items():
        config = SemlaConfig.preset(preset)
        for B, N in cases:
            args = semla_args(config, B, N, "core", device)
            variants = {"reference": partial(semla_attention, **args, backend="reference")}
            for precision in precisions:
                name = fused if precision == "fp32" else f"{fused}_{precision}"
                variants[name] = partial(semla_attention, **args, precision=precision, backend=fused)
            if options.compile:
                variants["compiled"] = partial(
                    compiled(semla_attention_reference, args, options.compile_backend), **args
                )
            row = {"preset": preset, "B": B, "N": N, **timed(variants, options.repeats)}
            flops = semla_attention_flops(*(args[name].shape if name in args else None for name in ARGUMENTS))
            row["fused_gflops"] = flops / row[f"{fused}_ms"] / 1e6
            row["roofline_fp32_us"] = predicted.get(f"{preset} core B={B} N={N}")
            rows.append(row)
    return rows


def roofline_fp32_us(device) -> dict:
    """semla_attention's predicted fp32 time per roofline case on this GPU, if fastflow.benchmarks.roofline has
    its datasheet (A100, H100); else empty."""
    from fastflow.benchmarks import roofline

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else ""
    gpu = next((roofline.GPUS[key] for key in roofline.GPUS if key.split("-")[0] in name), None)
    if gpu is None:
        return {}
    return {
        row["case"]: 1e6 * roofline.predicted_seconds(row, gpu, "fp32")
        for row in roofline.semla_attention_rows()
    }


def bench_forward(device, fused: str, options) -> list[dict]:
    """The whole generator, unpatched vs patched (vs compiled unpatched at each preset's first size: a
    generator's inductor compile takes most of a minute)."""
    rows = []
    for preset, cases in options.semla_cases.items():
        config = SemlaConfig.preset(preset)
        reference = perturbed(Semla(config)).to(device).eval()
        patched = Semla(config).to(device).eval()
        patched.load_state_dict(reference.state_dict())
        patch_model(patched, kernels=fused)
        for case, (B, N) in enumerate(cases):
            if N >= config.max_atoms:
                continue
            inputs = {k: v.to(device) for k, v in random_inputs(config, B, N).items()}
            variants = {"reference": partial(reference, **inputs), fused: partial(patched, **inputs)}
            if options.compile and case == 0:
                variants["compiled"] = partial(compiled(reference, inputs, options.compile_backend), **inputs)
            with torch.no_grad():
                error = max_error(variants[fused](), variants["reference"]())
            rows.append(
                {"preset": preset, "B": B, "N": N, "max_rel_error": error, **timed(variants, options.repeats)}
            )
    return rows


def bench_bond_head(device, fused: str, options) -> list[dict]:
    from fastflow.ops.bond_head import bond_head, bond_head_reference

    rows = []
    for preset, cases in options.semla_cases.items():
        config = SemlaConfig.preset(preset)
        for B, N in cases:
            args = bond_head_args(config, B, N, device)
            try:
                bond_head(**args, backend=fused)
            except BackendUnavailable as error:
                return [{"skipped": str(error)[:120]}]
            variants = {
                "reference": partial(bond_head, **args, backend="reference"),
                fused: partial(bond_head, **args, backend=fused),
            }
            if options.compile:
                variants["compiled"] = partial(
                    compiled(bond_head_reference, args, options.compile_backend), **args
                )
            rows.append({"preset": preset, "B": B, "N": N, **timed(variants, options.repeats)})
    return rows


def bench_tensor_products(device, fused: str, options) -> list[dict]:
    """fastflow's fused TensorProduct / TPConv against its reference backend, e3nn, compiled e3nn,
    cuEquivariance (its CUDA kernels on a GPU, its PyTorch path on CPU) and OpenEquivariance (CUDA only)."""
    from fastflow.nn import TensorProduct, TPConv

    rows = []
    for config, n_edges in options.tp_cases:
        tp, data, irreps, lmax = tp_case(config, n_edges, device, options.tiny)
        src, dst, n = data["edge_src"], data["edge_dst"], data["node_feats"].size(0)
        others, skipped = _other_libraries(tp, irreps, lmax, n_edges, device)
        for op in ("tensor_product", "tp_conv"):
            x = data["node_feats"] if op == "tp_conv" else data["node_feats"][src].contiguous()
            inputs = (x, data["edge_attrs"], data["weights"])
            if op == "tp_conv":
                variants = {
                    fused: partial(fused_conv, TPConv(tp, backend=fused), src, dst, n),
                    "reference": partial(fused_conv, TPConv(tp, backend="reference"), src, dst, n),
                    "e3nn": partial(e3nn_conv, tp, src, dst, n),
                }
                variants.update(
                    {name: partial(f, src=src, dst=dst, n=n) for name, f in others["tp_conv"].items()}
                )
            else:
                variants = {
                    fused: TensorProduct(tp, backend=fused),
                    "reference": TensorProduct(tp, backend="reference"),
                    "e3nn": tp,
                }
                variants.update(others["tensor_product"])
            if options.compile:
                variants["e3nn_compiled"] = compiled(variants["e3nn"], inputs, options.compile_backend)
            with torch.no_grad():
                expected = variants["e3nn"](*inputs)
                errors = {
                    name: relative_error(f(*inputs), expected)
                    for name, f in variants.items()
                    if name not in ("e3nn", "cuequivariance")
                }
            row = {
                "config": config,
                "edges": n_edges,
                "op": op,
                **timed({k: partial(f, *inputs) for k, f in variants.items()}, options.repeats, base="e3nn"),
            }
            row["max_rel_error_vs_e3nn"] = max(errors.values())
            row.update(skipped)
            rows.append(row)
    return rows


def bench_self_interaction(device, fused: str, options) -> list[dict]:
    """NequIP's self-interaction (64x0e+64x1o+64x2e x 4x0e, shared weights) on the fused backend in each
    precision (tf32 / bf16: tl.dot tiles on tensor cores) against e3nn."""
    from fastflow.nn import TensorProduct

    rows = 40 if options.tiny else 100_000
    tp, x, species = self_interaction_case(device, options.tiny, rows)
    precisions = (
        ("fp32", "tf32", "bf16") if device.type == "cuda" else ("fp32", "tf32")
    )  # interpreter: no bf16
    variants = {f"{fused}_{p}": TensorProduct(tp, backend=fused, precision=p) for p in precisions}
    variants["e3nn"] = tp
    with torch.no_grad():
        row = {
            "rows": rows,
            **timed({k: partial(f, x, species) for k, f in variants.items()}, options.repeats, "e3nn"),
        }
    return [row]


def _other_libraries(tp, irreps: str, lmax: int, n_edges: int, device) -> tuple[dict, dict]:
    """cuEquivariance's and OpenEquivariance's version of ``tp`` as callables (x, sh, w) (their own output order
    and weight layout: timed, not compared), and the reasons for those missing."""
    others, skipped = {"tensor_product": {}, "tp_conv": {}}, {}
    try:
        import cuequivariance as cue
        import cuequivariance_torch as cuet

        irreps_sh = "+".join(f"{l}{'e' if l % 2 == 0 else 'o'}" for l in range(lmax + 1))
        options = {} if device.type == "cuda" else {"method": "naive"}  # its CUDA kernels where it has them
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            module = cuet.ChannelWiseTensorProduct(
                cue.Irreps("O3", irreps),
                cue.Irreps("O3", irreps_sh),
                filter_irreps_out=[cue.O3(l, p) for l in range(lmax + 1) for p in (1, -1)],
                layout=cue.mul_ir,
                shared_weights=False,
                internal_weights=False,
                device=device,
                **options,
            )
        weights = torch.randn(n_edges, module.weight_numel, device=device)  # its own weight layout
        others["tensor_product"]["cuequivariance"] = lambda x, sh, w: module(x, sh, weights)
        others["tp_conv"]["cuequivariance"] = lambda x, sh, w, src, dst, n: module(
            x, sh, weights, indices_1=src, indices_out=dst, size_out=n
        )
    except ImportError as error:
        skipped["cuequivariance_skipped"] = f"not installed ({error})"
    if device.type != "cuda":
        skipped["openequivariance_skipped"] = "CUDA only"
        return others, skipped
    try:
        import openequivariance as oeq

        instructions = [(i.i_in1, i.i_in2, i.i_out, i.connection_mode, i.has_weight) for i in tp.instructions]
        problem = oeq.TPProblem(
            str(tp.irreps_in1),
            str(tp.irreps_in2),
            str(tp.irreps_out),
            instructions,
            shared_weights=False,
            internal_weights=False,
        )
        oeq_tp = oeq.TensorProduct(problem, torch_op=True)
        oeq_conv = oeq.TensorProductConv(problem, torch_op=True, deterministic=False)
        others["tensor_product"]["openequivariance"] = oeq_tp
        others["tp_conv"]["openequivariance"] = lambda x, sh, w, src, dst, n: oeq_conv(x, sh, w, dst, src)
    except ImportError as error:
        skipped["openequivariance_skipped"] = f"not installed ({error})"
    return others, skipped


def bench_cache_forecast(device, fused: str, options) -> list[dict]:
    from fastflow.ops.cache_forecast import cache_forecast, cache_forecast_reference

    B, N = options.small_batch
    rows = []
    for name, shape in (("bonds [B,N,N,5]", (B, N, N, 5)), ("features [B,N,384]", (B, N, 384))):
        history = [torch.randn(shape, device=device) for _ in range(3)]
        coeffs = [1.5, -0.75, 0.25]
        variants = {
            "reference": partial(cache_forecast, history, coeffs, backend="reference"),
            fused: partial(cache_forecast, history, coeffs, backend=fused),
        }
        if options.compile:
            variants["compiled"] = partial(
                compiled(cache_forecast_reference, (history, coeffs), options.compile_backend),
                history,
                coeffs,
            )
        rows.append({"case": name, "B": B, "N": N, **timed(variants, options.repeats)})
    return rows


def bench_discrete_flow_step(device, fused: str, options) -> list[dict]:
    from fastflow.ops.discrete_flow_step import discrete_flow_step, discrete_flow_step_reference

    B, N = options.small_batch
    rows = []
    for name, K, pairs in (("atom types", 18, False), ("bonds", 5, True)):
        args = discrete_step_args(B, N, K, pairs, device)
        variants = {
            "reference": partial(discrete_flow_step, *args, backend="reference"),
            fused: partial(discrete_flow_step, *args, backend=fused),
        }
        if options.compile:
            variants["compiled"] = partial(
                compiled(discrete_flow_step_reference, args, options.compile_backend), *args
            )
        rows.append({"case": name, "B": B, "N": N, "K": K, **timed(variants, options.repeats)})
    return rows


def bench_sampling(device, fused: str, options) -> list[dict]:
    """The packaged model end to end: reference and fused, without and with the cache (Taylor-2, D = 2); the
    fused rows count the molecules whose graph equals the reference's with the same cache (same seed, same
    noise: they differ only where rounding flips an argmax)."""
    from fastflow import CacheConfig, load_pretrained, sample

    rows, references = [], {}
    for kernels, cache in (
        ("reference", None),
        (fused, None),
        ("reference", CacheConfig(interval=2)),
        (fused, CacheConfig(interval=2)),
    ):
        model = load_pretrained(map_location=device)
        patch_model(model, kernels=kernels, cache=cache)
        result = sample(
            model,
            options.molecules,
            steps=options.steps,
            seed=0,
            sizes=options.sizes,
            size_distribution=None if options.sizes else model.size_counts,
            device=device,
            kernels=kernels,
        )
        row = {
            "kernels": kernels,
            "cache": "none" if cache is None else "taylor-2, D=2",
            "molecules": options.molecules,
            "steps": options.steps,
            "nfe": result.stats["nfe"],
            "seconds": result.stats["sampling_seconds"],
            "molecules_per_second": result.stats["molecules_per_second"],
        }
        if kernels == "reference":
            references[row["cache"]] = result
        else:
            row["same_graphs"] = sum(
                all(
                    torch.equal(getattr(a, f), getattr(b, f)) for f in ("atom_types", "bond_types", "charges")
                )
                for a, b in zip(result.graphs, references[row["cache"]].graphs)
            )
        rows.append(row)
    for row in rows:
        row["speedup"] = row["molecules_per_second"] / rows[0]["molecules_per_second"]
    return rows


# ---- main ----


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", help="cuda (default), or cpu under TRITON_INTERPRET=1")
    parser.add_argument("--tiny", action="store_true", help="tiny shapes and few molecules (the CI run)")
    parser.add_argument("--json", type=Path, default=None, help="write the results here")
    parser.add_argument("--repeats", type=int, default=None, help="timed repeats (default 20, tiny 2)")
    parser.add_argument("--no-compile", dest="compile", action="store_false", help="skip torch.compile rows")
    parser.add_argument(
        "--compile-backend",
        default="inductor",
        help="torch.compile backend (default inductor; eager: trace only)",
    )
    parser.add_argument("--skip-bench", action="store_true", help="correctness only")
    options = parser.parse_args(argv)
    if options.repeats is None:
        options.repeats = 2 if options.tiny else 20
    # Shapes: tiny ones for the interpreter (about 1 ms per Triton program), else those of the benchmarks.
    if options.tiny:
        options.semla_cases = {"tiny": [(2, 5)]}
        options.tp_cases = [("l1", 40)]
        options.small_batch = (2, 5)
        options.molecules, options.steps, options.sizes = 2, 2, [4, 3]
    else:
        options.semla_cases = {"semlaflow": [(32, 18), (8, 44), (2, 100)], "small": [(128, 18)]}
        options.tp_cases = [("l1", 100_000), ("l3", 100_000)]
        options.small_batch = (64, 23)
        options.molecules, options.steps, options.sizes = 256, 100, None  # sizes from the training set
    return options


def main(argv=None) -> int:
    options = parse_args(argv)
    device = torch.device(options.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print(
            "no CUDA device here: run with --device cpu under TRITON_INTERPRET=1 (tiny shapes)",
            file=sys.stderr,
        )
        return 2
    if device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        print(
            "--device cpu runs the Triton kernels under the interpreter: set TRITON_INTERPRET=1",
            file=sys.stderr,
        )
        return 2
    fused = resolve_backend("triton", device)
    started = time.perf_counter()
    machine = machine_metadata(device.type)
    print(machine_header(machine))
    print(f"device {machine['device']}; fused backend {fused}; {'tiny' if options.tiny else 'full'} shapes")
    report = Report()
    warnings.filterwarnings("ignore", message=".*TF32.*")
    torch._logging.set_logs(dynamo=logging.ERROR)  # graph breaks in the compiled references are expected

    print("\ncorrectness (max|fused - reference| / max|reference|)")
    check_ops(report, device, fused, options.tiny)
    check_models(report, device, fused, options.tiny)
    report.seconds["correctness"] = time.perf_counter() - started

    if not options.skip_bench:
        times = ["reference_ms", f"{fused}_ms", "compiled_ms", f"{fused}_speedup", "compiled_speedup"]
        precisions = [f"{fused}_tf32_ms", f"{fused}_bf16_ms"] if device.type == "cuda" else []
        report.bench(
            "semla_attention, one core layer",
            partial(bench_semla_attention, device, fused, options),
            ["preset", "B", "N", *times, *precisions, "fused_gflops", "roofline_fp32_us"],
        )
        report.bench(
            "generator forward",
            partial(bench_forward, device, fused, options),
            ["preset", "B", "N", *times, "max_rel_error"],
        )
        report.bench(
            "bond_head",
            partial(bench_bond_head, device, fused, options),
            ["preset", "B", "N", *times, "skipped"],
        )
        report.bench(
            "tensor products (speedups vs e3nn)",
            partial(bench_tensor_products, device, fused, options),
            [
                "config",
                "edges",
                "op",
                f"{fused}_ms",
                "reference_ms",
                "e3nn_ms",
                "e3nn_compiled_ms",
                "cuequivariance_ms",
                "openequivariance_ms",
                f"{fused}_speedup",
                "max_rel_error_vs_e3nn",
            ],
        )
        report.bench(
            "self-interaction tensor product by precision",
            partial(bench_self_interaction, device, fused, options),
            [
                "rows",
                *(f"{fused}_{p}_ms" for p in ("fp32", "tf32", "bf16")),
                "e3nn_ms",
                f"{fused}_tf32_speedup",
            ],
        )
        report.bench(
            "cache_forecast",
            partial(bench_cache_forecast, device, fused, options),
            ["case", "B", "N", *times],
        )
        report.bench(
            "discrete_flow_step",
            partial(bench_discrete_flow_step, device, fused, options),
            ["case", "B", "N", "K", *times],
        )
        report.bench(
            "sampling, packaged model",
            partial(bench_sampling, device, fused, options),
            [
                "kernels",
                "cache",
                "molecules",
                "steps",
                "nfe",
                "seconds",
                "molecules_per_second",
                "speedup",
                "same_graphs",
            ],
        )
    report.seconds["total"] = time.perf_counter() - started
    failed = [row["check"] for row in report.correctness if row["ok"] is False]
    print(
        f"\n{len(report.correctness) - len(failed)} / {len(report.correctness)} checks not failing; {report.seconds['total']:.0f} s"
    )
    for name in failed:
        print(f"  FAILED: {name}")
    if options.json is not None:
        options.json.parent.mkdir(parents=True, exist_ok=True)
        results = {
            "machine": machine,
            "device": str(device),
            "backend": fused,
            "tiny": options.tiny,
            "ok": report.ok,
            "correctness": report.correctness,
            "benchmarks": report.benchmarks,
            "seconds": report.seconds,
        }
        options.json.write_text(json.dumps(results, indent=1, default=str) + "\n")
        print(f"-> {options.json}")
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
