"""``fastflow bench gpu-static``: compile every Triton kernel of fastflow for NVIDIA GPUs on a machine without one,
and read off what decides whether it runs well there: registers, spills, shared memory, tensor cores.

Triton's NVIDIA backend needs no GPU, no CUDA driver and no environment variable to compile: given an explicit
``GPUTarget("cuda", capability, 32)``, ``triton.compile(ASTSource(fn, signature, constexprs, attrs), target=...)``
runs its MLIR/LLVM pipeline in-process and then the ``ptxas`` that ships in the wheel
(``triton/backends/nvidia/bin/``: ``ptxas`` for sm < 90, ``ptxas-blackwell`` for sm >= 90). Only the launch needs a
driver. The one thing to avoid is Triton's interpreter: under ``TRITON_INTERPRET=1`` (the test suite sets it on
machines without CUDA) ``@triton.jit`` gives interpreted functions that cannot be compiled, so :func:`collect` then
runs the compilations in a child process with ``TRITON_INTERPRET`` removed from its environment.

What is compiled is what the launchers in ``triton_kernels/`` would launch: each launcher is called on small CPU
tensors of the right shapes with its kernel replaced by a recorder, and every recorded launch is specialised as
Triton's JIT would specialise it (``native_specialize_impl``: ``*fp32``/``i32``/``constexpr`` types, 16-byte
divisibility hints, integers equal to 1 turned into constants), with the launch's options (``num_warps``,
``num_stages``) or the JIT's defaults (4 warps, 3 stages, FP fusion as Triton's default). Cases:

    semla_attention        presets semlaflow and small; layers core (F = d_message_hidden), edge_in (the first
                           layer: reads d_edge edge features, F = H + S) and edge_out (the last: writes d_edge
                           channels, F = H + S + d_edge); fp32 and fp64
    tensor_product,        NequIP convolutions nequip-l1 (32x0e+32x1o x SH l<=2) and nequip-l3
    tp_conv_atomic,        (32x0e+32x1o+32x2e+32x3o x SH l<=3), uvu with per-edge weights; fully connected uvw
    tp_conv_deterministic  products with shared weights fc-8 (8x0e+8x1o x 8x0e+8x1o -> 8x0e+8x1o) and fc-16, and
                           NequIP's self-interaction nequip-sc (32x0e+32x1o+32x2e x 4x0e); fp32 and fp64, and the
                           tf32 / bf16 variants (tl.dot tiles) of fc-16 and nequip-sc; one row per distinct
                           specialisation of the per-path launches
    cache_forecast         K = 3 history tensors, fp32 and fp64
    bond_head              presets semlaflow and small (E = G = d_edge, F = d_message, K = n_edge_types), with
                           and without BondRefine; fp32 and fp64, and the tf32 / bf16 variants
    symmetric_contraction  MACE's product basis at the issue-15 widths (C = 128 channels, I = 16 components of
                           0e+1o+2e+3o, correlation 3, outputs 0e+1o): the forward kernel and the backward
                           (gradients of x and of the coefficients); fp32 and fp64

Per (kernel, variant, target) a row: ``registers`` (from the cubin, ``cuobjdump -res-usage``), ``spill_bytes``
(spill stores + spill loads from ``ptxas -v``, rerun on Triton's PTX with Triton's flags), ``stack_bytes``,
``shared_bytes`` (the dynamic shared memory Triton requests at launch, ``metadata.shared``, which its launcher
checks against the device's opt-in maximum), ``shared_limit`` (that maximum per block for the architecture),
``tensor_cores`` (the SASS holds HMMA/DMMA/IMMA or Hopper's HGMMA-family instructions) and ``ok`` (compiled, no
spills, shared memory within the limit). Tensor cores are reported, not part of ``ok``.

Targets sm_80 (A100), sm_89 (L4/L40/RTX 4090) and sm_90 (H100) by default. Triton compiles every capability >= 90
as the ``a`` variant (``sm_90a``): there is no separate plain sm_90 build, so the row's ``gpu_name`` says sm_90a.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import inspect
import io
import json
import os
import re
import subprocess
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

KERNELS = (
    "semla_attention",
    "tensor_product",
    "tp_conv_atomic",
    "tp_conv_deterministic",
    "cache_forecast",
    "discrete_flow_step",
    "bond_head",
    "symmetric_contraction",
)
TARGETS = ("sm_80", "sm_89", "sm_90")
JSON_KEYS = (
    "kernel",
    "variant",
    "target",
    "registers",
    "spill_bytes",
    "shared_bytes",
    "shared_limit",
    "tensor_cores",
    "ok",
)

# Maximum shared memory per block with opt-in (cudaDevAttrMaxSharedMemoryPerBlockOptin), which Triton's launcher
# checks metadata.shared against. 166912 (A100) and 232448 (H100) are also the values torch's tests identify those
# GPUs by (torch/testing/_internal/inductor_utils.py, IS_A100 / IS_H100); the others are the CUDA C++ Programming
# Guide's table (compute capabilities: 99 KB for 8.6/8.9/12.0, 163 KB for 8.0/8.7, 227 KB for 9.0/10.0, 64 KB for 7.5).
SHARED_LIMITS = {
    75: 65536,
    80: 166912,
    86: 101376,
    87: 166912,
    89: 101376,
    90: 232448,
    100: 232448,
    120: 101376,
}
MAX_REGISTERS = 255  # per thread, every architecture here

# SASS opcodes that run on tensor cores: HMMA (fp16/bf16/tf32 mma), DMMA (fp64), IMMA/BMMA (integer/binary),
# Hopper's warpgroup HGMMA/IGMMA/QGMMA/BGMMA (PTX wgmma), Blackwell's UTC*MMA (tcgen05) and OMMA/QMMA.
# HFMA2.MMA is not one of them: it is an ordinary FMA issued on the MMA pipe (a common register move).
TENSOR_CORE_OPCODES = frozenset(
    {
        "HMMA",
        "DMMA",
        "IMMA",
        "BMMA",
        "HGMMA",
        "IGMMA",
        "QGMMA",
        "BGMMA",
        "UTCHMMA",
        "UTCIMMA",
        "UTCQMMA",
        "UTCOMMA",
        "OMMA",
        "QMMA",
    }
)
_SASS_OPCODE = re.compile(
    r"^\s*/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P[T0-9]+\s+)?([A-Z][A-Z0-9_]*(?:\.[A-Z0-9_]+)*)", re.MULTILINE
)

ATOMS = 29  # N of the semla_attention cases (QM9's largest molecule); a runtime argument, not a constexpr
EDGES, NODES = 1000, 50  # rows of the tensor-product cases
HISTORY, FORECAST_NUMEL = 3, 128 * 29 * 3  # cache_forecast: K history tensors of a batch's coordinates

SEMLA_PRESETS = ("semlaflow", "small")
SEMLA_LAYERS = ("core", "edge_in", "edge_out")
TENSOR_CORE_PRECISIONS = ("tf32", "bf16")  # the ops' tensor-core variants (float32 tensors)
DTYPES = ("fp32", "fp64")
# Tensor-product cases: (irreps_in1, lmax of the spherical harmonics) for NequIP convolutions, or an explicit
# fully connected product.
TP_CASES = {
    "nequip-l1": ("32x0e+32x1o", 2),
    "nequip-l3": ("32x0e+32x1o+32x2e+32x3o", 3),
    "fc-8": ("8x0e+8x1o",),
    "fc-16": ("16x0e+16x1o",),
    "nequip-sc": ("32x0e+32x1o+32x2e", "4x0e"),  # NequIP's self-interaction: features x one-hot species
}
TP_PRECISION_CASES = ("fc-16", "nequip-sc")  # products whose uvw paths are big enough for tl.dot

# --quick: the smallest case of each kernel, plus semla_attention's semlaflow core layer (fp32 and tf32).
QUICK = {
    "semla_attention": [
        ("small", "core", "fp32"),
        ("small", "core", "bf16"),
        ("semlaflow", "core", "fp32"),
        ("semlaflow", "core", "tf32"),
    ],
    "tensor_product": [("nequip-l1", "fp32")],
    "tp_conv_atomic": [("nequip-l1", "fp32")],
    "tp_conv_deterministic": [("nequip-l1", "fp32")],
    "cache_forecast": [("fp32",)],
    "discrete_flow_step": [("bonds", "fp32")],
    "bond_head": [("small", "refine", "fp32")],
    "symmetric_contraction": [("forward", "fp32"), ("backward", "fp32")],
}
STEP_CASES = {"atoms": 18, "bonds": 5}  # discrete_flow_step: classes per element (atom types, bond orders)
BOND_HEAD_VARIANTS = ("refine", "plain")  # with BondRefine's arguments, or without (bond_refine=False)
SC_VARIANTS = ("forward", "backward")  # symmetric_contraction's two kernels
SC_NODES, SC_CHANNELS, SC_COMPONENTS = 288, 128, 16  # 32 ethanols; MACE's hidden width; 0e+1o+2e+3o


# ------------------------------------------------------------------------------------------------------ cases


@dataclass
class Case:
    """One launch to compile: the kernel's JITFunction and the arguments its launcher passed."""

    kernel: str
    variant: str
    fn: object
    args: tuple
    kwargs: dict
    info: dict = field(default_factory=dict)  # shape notes for the JSON row


def semla_layer_shapes(config, layer: str) -> dict:
    """Sizes of the semla_attention call of one layer of a Semla stack (fastflow/models/semla.py,
    EquiInvDynamics): every layer has H heads of d_model // H, S coordinate sets and P = S projected sets; the
    core layers' message MLP is d_message_hidden wide, while the first (edge_in) and last (edge_out) layers get
    d_message_hidden=None, so their hidden width is their output width H + S (+ d_edge for edge_out)."""
    H, S = config.n_attn_heads, config.n_coord_sets
    shapes = {"H": H, "D": config.d_model // H, "S": S, "P": S, "E": 0, "EO": 0}
    if layer == "core":
        shapes["F"] = config.d_message_hidden
    elif layer == "edge_in":
        shapes.update(F=H + S, E=config.d_edge)
    elif layer == "edge_out":
        shapes.update(F=H + S + config.d_edge, EO=config.d_edge)
    else:
        raise ValueError(f"unknown layer {layer!r}; expected one of {SEMLA_LAYERS}")
    return shapes


class _Recorder:
    """Stands in for a JITFunction in a launcher: ``kernel[grid](*args, **kwargs)`` records instead of launching."""

    def __init__(self):
        self.launches = []

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.launches.append((args, kwargs))


@contextlib.contextmanager
def _recording(module, name: str):
    original = getattr(module, name)
    recorder = _Recorder()
    setattr(module, name, recorder)
    try:
        yield original, recorder
    finally:
        setattr(module, name, original)


def _zeros(*shape, dtype):
    import torch

    return torch.zeros(*shape, dtype=dtype)


def _torch_dtype(name: str):
    import torch

    return {"fp32": torch.float32, "fp64": torch.float64}[name]


def _precision_and_dtype(name: str):
    """A case's dtype name → (the op's precision, the tensors' dtype): "tf32" and "bf16" are matrix-product
    precisions on float32 tensors, "fp32" / "fp64" plain dtypes."""
    precision = name if name in TENSOR_CORE_PRECISIONS else "fp32"
    return precision, _torch_dtype("fp32" if precision != "fp32" else name)


def _semla_cases(selection) -> list[Case]:
    import torch

    from fastflow.models.config import SemlaConfig
    from fastflow.triton_kernels import semla_attention as module

    cases = []
    for preset, layer, dtype_name in selection:
        s = semla_layer_shapes(SemlaConfig.preset(preset), layer)
        B, N, F, S, P, H, D, E, EO = 1, ATOMS, s["F"], s["S"], s["P"], s["H"], s["D"], s["E"], s["EO"]
        precision, dtype = _precision_and_dtype(dtype_name)

        empty = partial(_zeros, dtype=dtype)

        edges = (empty(B, N, N, E), empty(E), empty(E), empty(F, E)) if E else (None,) * 4
        with _recording(module, "_semla_attention_kernel") as (fn, recorder):
            module.semla_attention(
                empty(B, N, F),
                empty(B, N, F),
                empty(B, S, N, 3),
                empty(F, S),
                empty(H + P + EO, F),
                empty(H + P + EO),
                empty(B, N, H, D),
                empty(B, P, N, 3),
                torch.ones(B, N, N, dtype=torch.bool),
                *edges,
                1e-5,
                1e-6,
                precision=precision,
            )
        ((args, kwargs),) = recorder.launches
        shape = f"F={F} S=P={S} H={H} d_head={D}" + (f" E={E}" if E else "") + (f" EO={EO}" if EO else "")
        cases.append(
            Case("semla_attention", f"{preset}/{layer}/{dtype_name}", fn, args, kwargs, {"shape": shape})
        )
    return cases


def nequip_descriptor(irreps_node: str, lmax: int):
    """NequIP's convolution product (fastflow.benchmarks.tp.nequip_tensor_product) without e3nn: node features x
    spherical harmonics l <= lmax -> every uvu-reachable irrep with l <= lmax, per-path weights, outputs sorted."""
    from fastflow.tp.descriptor import TPDescriptor, parse_irreps

    node = parse_irreps(irreps_node)
    sh = [(1, l, (-1) ** l) for l in range(lmax + 1)]
    mid, instructions = [], []
    for i, a in enumerate(node):
        for j, (_, l2, p2) in enumerate(sh):
            for l_out in range(abs(a.l - l2), min(a.l + l2, lmax) + 1):
                instructions.append((i, j, len(mid), "uvu", True))
                mid.append((a.mul, l_out, a.p * p2))
    order = sorted(range(len(mid)), key=lambda k: (mid[k][1], mid[k][2]))  # e3nn's Irreps.sort: by (l, p)
    position = {k: rank for rank, k in enumerate(order)}
    irrep = lambda mul, l, p: f"{mul}x{l}{'e' if p == 1 else 'o'}"  # noqa: E731
    return TPDescriptor.create(
        irreps_node,
        "+".join(irrep(*block) for block in sh),
        "+".join(irrep(*mid[k]) for k in order),
        [(i, j, position[k], mode, w) for i, j, k, mode, w in instructions],
    )


def fully_connected_descriptor(irreps: str, irreps2: str | None = None):
    """uvw between every pair of blocks of irreps x irreps2 (default irreps) that reaches a block of irreps (e3nn's
    FullyConnectedTensorProduct(irreps, irreps2, irreps))."""
    from fastflow.tp.descriptor import TPDescriptor, parse_irreps

    irreps2 = irreps if irreps2 is None else irreps2
    blocks, blocks2 = parse_irreps(irreps), parse_irreps(irreps2)
    instructions = [
        (i, j, k, "uvw", True)
        for i, a in enumerate(blocks)
        for j, b in enumerate(blocks2)
        for k, c in enumerate(blocks)
        if a.p * b.p == c.p and abs(a.l - b.l) <= c.l <= a.l + b.l
    ]
    return TPDescriptor.create(irreps, irreps2, irreps, instructions)


def _tp_descriptor(case: str):
    spec = TP_CASES[case]
    return nequip_descriptor(*spec) if isinstance(spec[-1], int) else fully_connected_descriptor(*spec)


def _tp_cases(kernel: str, selection, quick: bool) -> list[Case]:
    """One case per distinct specialisation of the per-path launches of each (descriptor, dtype): the kernels
    Triton's JIT would compile for the descriptor (the variant names the first path; ``paths`` counts them)."""
    import torch

    from fastflow.triton_kernels import tensor_product as module

    name = {
        "tensor_product": "_tensor_product_kernel",
        "tp_conv_atomic": "_tp_conv_atomic_kernel",
        "tp_conv_deterministic": "_tp_conv_deterministic_kernel",
    }[kernel]
    cases = []
    for case, dtype_name in selection:
        descriptor = _tp_descriptor(case)
        precision, dtype = _precision_and_dtype(dtype_name)
        tensors = descriptor.tensors(dtype)
        shared = not case.startswith(
            "nequip-l"
        )  # NequIP's convolutions have per-edge weights; the others share
        rows = EDGES
        weights = (
            torch.zeros(descriptor.weight_numel, dtype=dtype)
            if shared
            else torch.zeros(rows, descriptor.weight_numel, dtype=dtype)
        )
        x2 = torch.zeros(rows, descriptor.dim_in2, dtype=dtype)
        with _recording(module, name) as (fn, recorder):
            if kernel == "tensor_product":
                module.tensor_product(
                    torch.zeros(rows, descriptor.dim_in1, dtype=dtype),
                    x2,
                    weights,
                    *tensors,
                    descriptor.dim_out,
                    precision=precision,
                )
            else:
                g = torch.Generator().manual_seed(0)
                src, dst = (torch.randint(NODES, (rows,), generator=g) for _ in range(2))
                module.tp_conv(
                    torch.zeros(NODES, descriptor.dim_in1, dtype=dtype),
                    x2,
                    weights,
                    src,
                    dst,
                    NODES,
                    *tensors,
                    descriptor.dim_out,
                    deterministic=kernel == "tp_conv_deterministic",
                    precision=precision,
                )
        groups = {}  # one case per kernel Triton would compile: launches with the same specialisation share one
        for args, kwargs in recorder.launches:
            signature, constexprs, attrs = specialize(fn, args, kwargs)
            key = (
                tuple(signature.values()),
                tuple(sorted(constexprs.items())),
                tuple(sorted((path, repr(attr)) for path, attr in attrs.items())),
            )
            groups.setdefault(key, []).append((args, kwargs))
        launches_of = list(groups.values())
        if quick:  # one path: the first without a dimension of 1 (no integer specialised into a constant)
            dims = [dict(zip(fn.arg_names, launches[0][0])) for launches in launches_of]
            generic = [i for i, d in enumerate(dims) if min(d["d1"], d["d2"], d["d_out"]) > 1] or [0]
            launches_of = [launches_of[generic[0]]]
        seen = {}
        for launches in launches_of:
            args, kwargs = launches[0]
            p = dict(zip(fn.arg_names, args))
            mode = module.MODE_NAMES[kwargs["MODE"]]
            muls, dims = (f"{p['mul1']}x{p['mul2']}x{p['mul_out']}", f"{p['d1']}x{p['d2']}x{p['d_out']}")
            variant = f"{case}/{dtype_name}/{mode}-{muls}-d{dims}"
            seen[variant] = seen.get(variant, 0) + 1
            if seen[variant] > 1:  # same dims, another specialisation (offsets divisible by 16 or not)
                variant += f"#{seen[variant]}"
            cases.append(
                Case(
                    kernel,
                    variant,
                    fn,
                    args,
                    kwargs,
                    {
                        "shape": f"{mode} mul {p['mul1']}x{p['mul2']}->{p['mul_out']}, "
                        f"dims {p['d1']}x{p['d2']}->{p['d_out']}",
                        "paths": len(launches),
                    },
                )
            )
    return cases


def _forecast_cases(selection) -> list[Case]:
    import torch

    from fastflow.triton_kernels import cache_forecast as module

    cases = []
    for (dtype_name,) in selection:
        dtype = _torch_dtype(dtype_name)
        history = [torch.zeros(FORECAST_NUMEL, dtype=dtype) for _ in range(HISTORY)]
        with _recording(module, "_cache_forecast_kernel") as (fn, recorder):
            module.cache_forecast(history, [1.0] * HISTORY)
        ((args, kwargs),) = recorder.launches
        cases.append(
            Case(
                "cache_forecast",
                f"K{HISTORY}/{dtype_name}",
                fn,
                args,
                kwargs,
                {"shape": f"K={HISTORY}, numel={FORECAST_NUMEL}"},
            )
        )
    return cases


def _step_cases(selection) -> list[Case]:
    import torch

    from fastflow.triton_kernels import discrete_flow_step as module

    cases = []
    for what, dtype_name in selection:
        dtype, K, N, B = _torch_dtype(dtype_name), STEP_CASES[what], 24, 4
        shape = (B, N, N, K) if what == "bonds" else (B, N, K)
        with _recording(module, "_discrete_flow_step_kernel") as (fn, recorder):
            module.discrete_flow_step(
                torch.zeros(shape, dtype=dtype),
                torch.zeros(shape, dtype=dtype),
                torch.ones(B, N, dtype=torch.bool),
                torch.zeros(B, dtype=dtype),
                torch.zeros(B, dtype=torch.int64),
                0,
                5,
                0.01,
                1.0,
            )
        ((args, kwargs),) = recorder.launches
        cases.append(
            Case(
                "discrete_flow_step",
                f"{what}/{dtype_name}",
                fn,
                args,
                kwargs,
                {"shape": f"K={K}, {'pairs' if what == 'bonds' else 'atoms'}"},
            )
        )
    return cases


def _bond_head_cases(selection) -> list[Case]:

    from fastflow.models.config import SemlaConfig
    from fastflow.triton_kernels import bond_head as module

    cases = []
    for preset, variant, dtype_name in selection:
        config = SemlaConfig.preset(preset)
        B, N, E, F, G, K = 1, ATOMS, config.d_edge, config.d_message, config.d_edge, config.n_edge_types
        precision, dtype = _precision_and_dtype(dtype_name)
        empty = partial(_zeros, dtype=dtype)
        head = (empty(B, N, N, E), empty(E), empty(E), empty(G, E), empty(G), empty(K, G), empty(K))
        refine = (empty(B, N, F), empty(B, N, F), empty(B, N, 3), empty(E), empty(E), empty(F, E))
        refine += (empty(F), empty(F), empty(E, F), empty(E))
        with _recording(module, "_bond_head_kernel") as (fn, recorder):
            module.bond_head(
                *head, *(refine if variant == "refine" else (None,) * 10), 1e-5, 1e-5, precision=precision
            )
        ((args, kwargs),) = recorder.launches
        shape = f"E=G={E} K={K}" + (f" F={F}" if variant == "refine" else "")
        cases.append(
            Case("bond_head", f"{preset}/{variant}/{dtype_name}", fn, args, kwargs, {"shape": shape})
        )
    return cases


def _symmetric_contraction_plan():
    """A correlation-3 plan over SC_COMPONENTS components with outputs 0e and 1o and a few terms of each degree: the
    kernels specialise on the dtype, the largest degree and the channel block only, so the shapes are what counts,
    not MACE's U values."""
    import torch

    from fastflow.ops.symmetric_contraction import build_plan

    I, blocks = SC_COMPONENTS, []
    for d_o in (1, 3):
        U3, U2, U1 = torch.zeros(d_o, I, I, I, 2), torch.zeros(d_o, I, I, 2), torch.zeros(d_o, I, 1)
        for m in range(d_o):
            U3[m, m, m + 1, m + 2, 0], U3[m, 3, 5, m + 7, 1] = 1.0, 0.5
            U2[m, m, m + 4, 0], U2[m, 2, 9, 1] = 1.0, -1.0
            U1[m, m + 1, 0] = 1.0
        blocks.append([U3, U2, U1])
    return build_plan(blocks, I)


def _symmetric_contraction_cases(selection) -> list[Case]:
    import torch

    from fastflow.triton_kernels import symmetric_contraction as module

    plan = _symmetric_contraction_plan()
    N, C, I, E = SC_NODES, SC_CHANNELS, SC_COMPONENTS, 3
    cases = []
    for variant, dtype_name in selection:
        dtype = _torch_dtype(dtype_name)
        x, coeffs = torch.zeros(N, C, I, dtype=dtype), torch.zeros(E, plan.terms.size(0), C, dtype=dtype)
        elements = torch.zeros(N, dtype=torch.int64)
        arguments = (x, elements, coeffs, plan.monomials, plan.terms, plan.out_dims)
        name = f"_symmetric_contraction{'_backward' if variant == 'backward' else ''}_kernel"
        with _recording(module, name) as (fn, recorder):
            if variant == "forward":
                module.symmetric_contraction(*arguments)
            else:
                grad = torch.zeros(N, C * sum(plan.out_dims), dtype=dtype)
                module.symmetric_contraction_backward(grad, *arguments, True, True)
        ((args, kwargs),) = recorder.launches
        shape = f"N={N} C={C} I={I} correlation 3, outputs 0e+1o"
        cases.append(
            Case("symmetric_contraction", f"{variant}/{dtype_name}", fn, args, kwargs, {"shape": shape})
        )
    return cases


def selections(quick: bool) -> dict:
    """What each kernel compiles: semla (preset, layer, dtype), tensor products (case, dtype), forecast (dtype,)."""
    if quick:
        return QUICK
    tp = [(case, dtype) for case in TP_CASES for dtype in DTYPES]
    tp += [(case, precision) for case in TP_PRECISION_CASES for precision in TENSOR_CORE_PRECISIONS]
    return {
        "semla_attention": [
            (p, layer, d)
            for p in SEMLA_PRESETS
            for layer in SEMLA_LAYERS
            for d in (*DTYPES, *TENSOR_CORE_PRECISIONS)
        ],
        "tensor_product": tp,
        "tp_conv_atomic": tp,
        "tp_conv_deterministic": tp,
        "cache_forecast": [(d,) for d in DTYPES],
        "discrete_flow_step": [(what, d) for what in STEP_CASES for d in DTYPES],
        "bond_head": [
            (p, v, d)
            for p in SEMLA_PRESETS
            for v in BOND_HEAD_VARIANTS
            for d in (*DTYPES, *TENSOR_CORE_PRECISIONS)
        ],
        "symmetric_contraction": [(v, d) for v in SC_VARIANTS for d in DTYPES],
    }


def build_cases(kernels=KERNELS, quick: bool = False) -> list[Case]:
    chosen = selections(quick)
    cases = []
    for kernel in kernels:
        if kernel == "semla_attention":
            cases += _semla_cases(chosen[kernel])
        elif kernel == "cache_forecast":
            cases += _forecast_cases(chosen[kernel])
        elif kernel == "discrete_flow_step":
            cases += _step_cases(chosen[kernel])
        elif kernel == "bond_head":
            cases += _bond_head_cases(chosen[kernel])
        elif kernel == "symmetric_contraction":
            cases += _symmetric_contraction_cases(chosen[kernel])
        elif kernel in KERNELS:
            cases += _tp_cases(kernel, chosen[kernel], quick)
        else:
            raise ValueError(f"unknown kernel {kernel!r}; expected some of {KERNELS}")
    return cases


# -------------------------------------------------------------------------------------------------- compiling


def parse_target(name: str) -> int:
    """'sm_90', 'sm90', 'sm_90a' or '90' -> 90."""
    match = re.fullmatch(r"(?:sm_?)?(\d+)a?", name.strip().lower())
    if not match:
        raise ValueError(f"--targets: {name!r} is not an NVIDIA architecture like sm_80 or sm_90")
    capability = int(match.group(1))
    if capability not in SHARED_LIMITS:
        raise ValueError(
            f"--targets: {name}: no shared-memory limit known for sm_{capability} "
            f"(known: {', '.join(f'sm_{c}' for c in sorted(SHARED_LIMITS))})"
        )
    return capability


# Keyword arguments of a launch that are compile options, not kernel parameters (Triton's JIT takes them the same way).
LAUNCH_OPTIONS = ("num_warps", "num_stages", "num_ctas", "maxnreg")


def launch_options(kwargs) -> dict:
    """The compile options a launch passed (num_warps, num_stages, ...); the JIT's defaults for the rest."""
    return {key: value for key, value in kwargs.items() if key in LAUNCH_OPTIONS}


def specialize(fn, args, kwargs):
    """(signature, constexprs, attrs) of ASTSource for a launch, as Triton's JIT specialises it."""
    from triton._C.libtriton import native_specialize_impl
    from triton.backends.nvidia.compiler import CUDABackend

    kwargs = {key: value for key, value in kwargs.items() if key not in LAUNCH_OPTIONS}
    bound = inspect.signature(fn.fn).bind(*args, **kwargs)
    bound.apply_defaults()
    signature, constexprs, attrs = {}, {}, {}
    for index, param in enumerate(fn.params):
        value = bound.arguments[param.name]
        if param.is_constexpr:
            signature[param.name] = "constexpr"
            constexprs[(index,)] = value
            continue
        kind, key = native_specialize_impl(
            CUDABackend,
            value,
            param.is_const,
            not param.do_not_specialize,
            not param.do_not_specialize_on_alignment,
        )
        signature[param.name] = kind
        if kind == "constexpr":  # an integer equal to 1
            constexprs[(index,)] = key
        elif isinstance(key, str):
            attrs[(index,)] = CUDABackend.parse_attr(key)
    return signature, constexprs, attrs


def _tool(name: str) -> str:
    from triton import knobs

    return getattr(knobs.nvidia, name).path


def _run(command: list[str]) -> str:
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode:
        raise RuntimeError(
            f"{Path(command[0]).name} failed ({result.returncode}): "
            f"{(result.stderr or result.stdout).strip().splitlines()[:1]}"
        )
    return result.stdout + result.stderr


def _ptxas_log(ptx: str, metadata, capability: int) -> str:
    """``ptxas -v`` on Triton's PTX with the flags Triton's make_cubin used (its own log is not kept)."""
    from triton import knobs
    from triton.backends.nvidia.compiler import get_ptxas, sm_arch_from_capability

    if knobs.compilation.disable_line_info:
        debug = ["-lineinfo", "-suppress-debug-info"]
    elif knobs.nvidia.disable_ptxas_opt:
        debug = ["-g"]
    else:
        debug = ["-lineinfo"]
    fmad = [] if metadata.enable_fp_fusion else ["--fmad=false"]
    opt = ["--opt-level", "0"] if knobs.nvidia.disable_ptxas_opt else []
    extra = metadata.ptx_options.split(" ") if metadata.ptx_options else []
    with tempfile.TemporaryDirectory() as folder:
        source = Path(folder) / "kernel.ptx"
        source.write_text(ptx)
        return _run(
            [
                get_ptxas(capability).path,
                *debug,
                *fmad,
                "-v",
                *opt,
                "--regAllocOptLevel=2",
                *extra,
                f"--gpu-name={sm_arch_from_capability(capability)}",
                str(source),
                "-o",
                str(Path(folder) / "kernel.cubin"),
            ]
        )


def parse_ptxas(log: str) -> dict:
    """Registers, stack frame, spill stores and loads, static shared memory of one function's ``ptxas -v`` log."""

    def number(pattern):
        match = re.search(pattern, log)
        return int(match.group(1)) if match else 0

    return {
        "registers": number(r"Used (\d+) registers"),
        "stack_bytes": number(r"(\d+) bytes stack frame"),
        "spill_stores": number(r"(\d+) bytes spill stores"),
        "spill_loads": number(r"(\d+) bytes spill loads"),
        "static_shared_bytes": number(r"(\d+) bytes smem"),
    }


def cubin_analysis(cubin: bytes) -> dict:
    """From the cubin Triton built: ``cuobjdump -res-usage`` (REG, STACK, SHARED, LOCAL) and the SASS opcodes."""
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "kernel.cubin"
        path.write_bytes(cubin)
        usage = _run([_tool("cuobjdump"), "-res-usage", str(path)])
        sass = _run([_tool("cuobjdump"), "-sass", str(path)])
    fields = dict(re.findall(r"\b(REG|STACK|SHARED|LOCAL):(\d+)", usage))
    counts = {}
    for opcode in _SASS_OPCODE.findall(sass):
        base = opcode.split(".")[0]
        if base in TENSOR_CORE_OPCODES:
            counts[opcode] = counts.get(opcode, 0) + 1
    return {
        "registers": int(fields.get("REG", 0)),
        "stack_bytes": int(fields.get("STACK", 0)),
        "sass_shared_bytes": int(fields.get("SHARED", 0)),
        "tensor_core_ops": counts,
        "sass_instructions": len(_SASS_OPCODE.findall(sass)),
    }


def _error_line(error: BaseException) -> str:
    text = str(error)
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    first = lines[0] if lines else ""
    detail = next((line for line in lines[1:] if "error" in line.lower()), None)  # ptxas: the line saying why
    return f"{type(error).__name__}: {first}" + (f" ({detail})" if detail else "")


def compile_case(case: Case, target: str) -> dict:
    """The row of one case on one target; a failure is a row with ok=False and the error's first line."""
    import triton
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.backends.nvidia.compiler import sm_arch_from_capability
    from triton.compiler import ASTSource

    capability = parse_target(target)
    row = {
        "kernel": case.kernel,
        "variant": case.variant,
        "target": target,
        "registers": None,
        "spill_bytes": None,
        "shared_bytes": None,
        "shared_limit": SHARED_LIMITS[capability],
        "tensor_cores": None,
        "ok": False,
        "gpu_name": sm_arch_from_capability(capability),
        **case.info,
    }
    started = time.perf_counter()
    try:
        signature, constexprs, attrs = specialize(case.fn, case.args, case.kwargs)
        row["constexprs"] = {case.fn.arg_names[path[0]]: value for path, value in constexprs.items()}
        with (
            warnings.catch_warnings(),
            contextlib.redirect_stdout(io.StringIO()),
        ):  # ptxas failures print the PTX
            warnings.filterwarnings("ignore", message="TRITON_DEFAULT_FP_FUSION")
            hits = []
            previous, knobs.compilation.listener = (
                knobs.compilation.listener,
                (lambda **event: hits.append(event["cache_hit"])),
            )
            try:
                compiled = triton.compile(
                    ASTSource(case.fn, signature, constexprs, attrs),
                    target=GPUTarget("cuda", capability, 32),
                    options=launch_options(case.kwargs),
                )
            finally:
                knobs.compilation.listener = previous
        row["compile_seconds"] = round(time.perf_counter() - started, 2)
        row["cache_hit"] = bool(hits and hits[-1])  # from Triton's cache: compile_seconds is the lookup only
        metadata = compiled.metadata
        ptxas = parse_ptxas(_ptxas_log(compiled.asm["ptx"], metadata, capability))
        cubin = cubin_analysis(compiled.asm["cubin"])
        row.update(
            registers=cubin["registers"],
            spill_bytes=ptxas["spill_stores"] + ptxas["spill_loads"],
            spill_stores=ptxas["spill_stores"],
            spill_loads=ptxas["spill_loads"],
            stack_bytes=cubin["stack_bytes"],
            shared_bytes=metadata.shared + ptxas["static_shared_bytes"],
            sass_shared_bytes=cubin["sass_shared_bytes"],
            tensor_cores=bool(cubin["tensor_core_ops"]),
            tensor_core_ops=cubin["tensor_core_ops"],
            sass_instructions=cubin["sass_instructions"],
            num_warps=metadata.num_warps,
            num_stages=metadata.num_stages,
            ptx_version=re.search(r"^\.version (\S+)", compiled.asm["ptx"], re.MULTILINE).group(1),
        )
        if ptxas["registers"] != cubin["registers"]:
            row["note"] = (
                f"ptxas -v rerun used {ptxas['registers']} registers, the cubin {cubin['registers']}"
            )
        row["ok"] = (
            row["spill_bytes"] == 0
            and row["shared_bytes"] <= row["shared_limit"]
            and row["registers"] <= MAX_REGISTERS
        )
    except Exception as error:  # noqa: BLE001 — any failure is a row saying why
        row["compile_seconds"] = round(time.perf_counter() - started, 2)
        row["error"] = _error_line(error)
    return row


def toolchain() -> dict:
    import triton
    from triton import knobs
    from triton.backends.nvidia.compiler import get_ptxas

    def version(capability):
        text = _run([get_ptxas(capability).path, "--version"])
        match = re.search(r"release ([\d.]+), (V[\d.]+)", text)
        return f"{Path(get_ptxas(capability).path).name} {match.group(2) if match else text.splitlines()[-1]}"

    return {
        "triton": triton.__version__,
        "ptxas_sm80_89": version(80),
        "ptxas_sm90_plus": version(90),
        "fp_fusion": knobs.language.fp_fusion_enabled(None)
        if hasattr(knobs.language, "fp_fusion_enabled")
        else None,
        "env": "no GPU, no CUDA driver, no environment variables: triton.compile with an explicit "
        "GPUTarget; TRITON_INTERPRET unset for the compiling process",
    }


def _interpreting() -> bool:
    if os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "on", "yes"):
        return True
    triton = sys.modules.get("triton")
    return bool(
        triton is not None
        and getattr(getattr(triton, "knobs", None), "runtime", None) is not None
        and triton.knobs.runtime.interpret
    )


def _collect_here(kernels, targets, quick: bool, progress: bool) -> dict:
    from triton.runtime.jit import JITFunction

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="TRITON_DEFAULT_FP_FUSION")
        tools = toolchain()
    cases = build_cases(kernels, quick)
    for case in cases:
        if not isinstance(case.fn, JITFunction):
            raise RuntimeError(
                f"{case.kernel}: {type(case.fn).__name__} is not a JITFunction (TRITON_INTERPRET?)"
            )
    rows = []
    total = len(cases) * len(targets)
    for case in cases:
        for target in targets:
            row = compile_case(case, target)
            rows.append(row)
            if progress:
                state = "ok" if row["ok"] else row.get("error") or "MISS"
                seconds = "cached" if row.get("cache_hit") else f"{row['compile_seconds']} s"
                print(
                    f"[{len(rows)}/{total}] {case.kernel} {case.variant} {target}: {state} ({seconds})",
                    file=sys.stderr,
                    flush=True,
                )
    return {"toolchain": tools, "rows": rows}


def collect(kernels=KERNELS, targets=TARGETS, quick: bool = False, progress: bool = False) -> dict:
    """``{"toolchain": ..., "rows": [...]}``: every case of ``kernels`` compiled for every target. Under Triton's
    interpreter the work runs in a child process without TRITON_INTERPRET (interpreted kernels cannot compile)."""
    for target in targets:
        parse_target(target)
    if not _interpreting():
        return _collect_here(tuple(kernels), tuple(targets), quick, progress)
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    command = [
        sys.executable,
        "-m",
        "fastflow.benchmarks.gpu_static",
        "--worker",
        "--kernels",
        *kernels,
        "--targets",
        *targets,
        *(["--quick"] if quick else []),
        *([] if progress else ["--no-progress"]),
    ]
    result = subprocess.run(command, stdout=subprocess.PIPE, text=True, env=env)
    if result.returncode:
        raise RuntimeError(f"gpu-static worker failed (exit {result.returncode}): {' '.join(command)}")
    return json.loads(result.stdout)


# ------------------------------------------------------------------------------------------------- reporting


def format_table(rows: list[dict]) -> str:
    header = (
        "kernel",
        "variant",
        "target",
        "regs",
        "spill B",
        "stack B",
        "shared B",
        "limit B",
        "TC",
        "ok",
        "s",
    )
    lines = [header]
    for row in rows:
        if row.get("error"):
            lines.append(
                (
                    row["kernel"],
                    row["variant"],
                    row["target"],
                    "-",
                    "-",
                    "-",
                    "-",
                    str(row["shared_limit"]),
                    "-",
                    "FAIL",
                    str(row.get("compile_seconds", "")),
                )
            )
            continue
        over = row["shared_bytes"] > row["shared_limit"]
        lines.append(
            (
                row["kernel"],
                row["variant"],
                row["target"],
                str(row["registers"]),
                str(row["spill_bytes"]),
                str(row["stack_bytes"]),
                f"{row['shared_bytes']}{' !' if over else ''}",
                str(row["shared_limit"]),
                "yes" if row["tensor_cores"] else "no",
                "ok" if row["ok"] else "MISS",
                "cached" if row.get("cache_hit") else str(row["compile_seconds"]),
            )
        )
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    text = [
        "  ".join(cell.ljust(w) if i < 3 else cell.rjust(w) for i, (cell, w) in enumerate(zip(line, widths)))
        for line in lines
    ]
    text.insert(1, "  ".join("-" * w for w in widths))
    failures = [row for row in rows if row.get("error")]
    text += [f"FAIL {row['kernel']} {row['variant']} {row['target']}: {row['error']}" for row in failures]
    return "\n".join(text)


def summary(rows: list[dict]) -> str:
    missed = [r for r in rows if not r["ok"]]
    parts = [f"{len(rows) - len(missed)} of {len(rows)} rows ok (compiled, no spills, shared <= limit)"]
    for row in missed:
        why = [row["error"]] if row.get("error") else []
        if row.get("spill_bytes"):
            why.append(f"spills {row['spill_bytes']} B")
        if row.get("shared_bytes") is not None and row["shared_bytes"] > row["shared_limit"]:
            why.append(f"shared {row['shared_bytes']} > {row['shared_limit']} B")
        parts.append(f"  {row['kernel']} {row['variant']} {row['target']}: {', '.join(why)}")
    compiled = [r for r in rows if r.get("tensor_cores") is not None]
    with_tc = {}
    for r in compiled:
        if r["tensor_cores"]:
            opcodes = {op.split(".")[0] for op in r["tensor_core_ops"]}
            with_tc.setdefault((r["kernel"], r["variant"]), set()).update({r["target"], *opcodes})
    listed = "; ".join(
        f"{kernel} {variant} ({' '.join(sorted(found))})" for (kernel, variant), found in with_tc.items()
    )
    parts.append(
        f"tensor cores: {sum(r['tensor_cores'] for r in compiled)} of {len(compiled)} compiled rows"
        + (f": {listed}" if listed else "")
    )
    return "\n".join(parts)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--targets",
        nargs="+",
        default=list(TARGETS),
        metavar="SM",
        help=f"architectures (default {' '.join(TARGETS)}; known: "
        f"{' '.join(f'sm_{c}' for c in sorted(SHARED_LIMITS))}; sm_90 builds as sm_90a)",
    )
    parser.add_argument(
        "--kernels",
        nargs="+",
        choices=KERNELS,
        default=list(KERNELS),
        help="kernels to compile (default all)",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="the smallest case of each kernel and semla_attention's semlaflow core layer (tests)",
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    parser.add_argument("--out", type=Path, default=None, help="also write the JSON here")
    parser.add_argument(
        "--progress",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="one line per compilation on stderr (default on)",
    )


def run(args) -> dict:
    """``fastflow bench gpu-static``: the table (or --json), and the JSON at --out."""
    if importlib.util.find_spec("triton") is None:
        raise ValueError("gpu-static needs triton (pip install triton); it does not need a GPU")
    from fastflow.benchmarks.timing import machine_header, machine_metadata

    for target in args.targets:
        parse_target(target)
    result = collect(tuple(args.kernels), tuple(args.targets), args.quick, progress=args.progress)
    metadata = machine_metadata()
    report = {"benchmark": "gpu-static", "machine": metadata, "quick": args.quick, **result}
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=1) + "\n")
    if args.json:
        print(json.dumps(report))
    else:
        tools = result["toolchain"]
        print(machine_header(metadata))
        print(
            f"# triton {tools['triton']}; {tools['ptxas_sm80_89']} (sm < 90), {tools['ptxas_sm90_plus']} "
            f"(sm >= 90); compiled without a GPU"
        )
        print(format_table(result["rows"]))
        print(summary(result["rows"]))
        if args.out is not None:
            print(f"wrote {args.out}")
    return report


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m fastflow.benchmarks.gpu_static", description=__doc__.split("\n")[0]
    )
    add_arguments(parser)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)  # collect()'s child process
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(_collect_here(tuple(args.kernels), tuple(args.targets), args.quick, args.progress)))
        return 0
    run(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
