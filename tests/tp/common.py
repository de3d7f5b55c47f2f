"""Shared helpers of the tensor-product tests: random e3nn modules, the backends under test, comparisons."""

from __future__ import annotations

import random
import zlib
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from e3nn import o3

from fastflow import _extension
from fastflow.ops import tensor_product as op

CPP_SOURCE = Path(__file__).resolve().parents[2] / "csrc" / "tensor_product.cpp"
MULS = (1, 3, 7, 17)
MODES = ("uvw", "uvu", "uvv", "uuw", "uuu")


def seed_of(*key) -> int:
    return zlib.crc32(repr(key).encode())  # a fresh, reproducible seed per case


def require_backend(backend: str) -> None:
    """Skip only where the backend cannot exist. The cpp backend fails loudly (never skips) when fastflow._C
    is built but lacks the tensor-product kernels while csrc/tensor_product.cpp is in the checkout."""
    if backend != "cpp":
        return
    reason = op.cpp_unavailable_reason()
    if reason is None:
        return
    if _extension.load_extension() and CPP_SOURCE.exists():
        pytest.fail(f"csrc/tensor_product.cpp exists but {reason}")
    pytest.skip(f"cpp backend unavailable: {reason}")


@contextmanager
def default_dtype(dtype):
    """e3nn builds its Clebsch–Gordan buffers in the default dtype: float64 modules need it at construction."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def random_irreps(rng: random.Random, n_blocks: int, muls=MULS, lmax: int = 3) -> o3.Irreps:
    return o3.Irreps(
        [(rng.choice(muls), (rng.randint(0, lmax), rng.choice((1, -1)))) for _ in range(n_blocks)]
    )


def random_tensor_product(
    mode: str,
    seed: int,
    shared: bool = True,
    irrep_normalization: str = "component",
    path_normalization: str = "element",
    dtype=torch.float32,
    weighted: str = "all",
    lmax: int = 3,
    n_blocks: int = 3,
    max_paths: int = 10,
) -> o3.TensorProduct:
    """An e3nn TensorProduct with random irreps (l <= lmax, both parities, multiplicities from MULS) and up to
    max_paths instructions of `mode` (several sharing an output block). weighted: all | some | none (weightless
    paths only where e3nn allows them)."""
    rng = random.Random(seed)
    irreps1 = random_irreps(rng, n_blocks, lmax=lmax)
    if mode.startswith("uu"):  # uu* couple blocks of equal multiplicity
        irreps2 = o3.Irreps([(mul, (rng.randint(0, lmax), rng.choice((1, -1)))) for mul, _ in irreps1])
    else:
        irreps2 = random_irreps(rng, n_blocks, muls=(1, 3) if mode == "uvw" else MULS, lmax=lmax)
    candidates = []
    for a, (mul1, ir1) in enumerate(irreps1):
        for b, (mul2, ir2) in enumerate(irreps2):
            if mode.startswith("uu") and mul1 != mul2:
                continue
            for ir_out in ir1 * ir2:
                if ir_out.l <= lmax:
                    candidates.append((a, b, ir_out))
    rng.shuffle(candidates)
    candidates = candidates[:max_paths]
    out_blocks, instructions = [], []
    for n, (a, b, ir_out) in enumerate(candidates):
        mul_out = {
            "uvw": rng.choice((1, 3, 7)),
            "uvu": irreps1[a].mul,
            "uvv": irreps2[b].mul,
            "uuw": rng.choice((1, 3)),
            "uuu": irreps1[a].mul,
        }[mode]
        has_weight = {"all": True, "none": False, "some": n % 2 == 0}[weighted]
        if mode == "uvw" or (mode == "uuw" and not has_weight and mul_out != 1):
            has_weight = True  # e3nn: uvw always weighted; weightless uuw needs mul_out = 1
        if (mul_out, ir_out) in out_blocks and rng.random() < 0.6:
            c = out_blocks.index((mul_out, ir_out))  # another path into an existing block
        else:
            out_blocks.append((mul_out, ir_out))
            c = len(out_blocks) - 1
        instructions.append((a, b, c, mode, has_weight))
    with default_dtype(dtype):
        return o3.TensorProduct(
            irreps1,
            irreps2,
            o3.Irreps(out_blocks),
            instructions,
            irrep_normalization=irrep_normalization,
            path_normalization=path_normalization,
            shared_weights=shared,
            internal_weights=False,
            _optimize_einsums=False,
        )


def random_inputs(tp: o3.TensorProduct, Z: int, seed: int, shared: bool, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    x1 = torch.randn(Z, tp.irreps_in1.dim, generator=g, dtype=dtype)
    x2 = torch.randn(Z, tp.irreps_in2.dim, generator=g, dtype=dtype)
    w = torch.randn(*(() if shared else (Z,)), tp.weight_numel, generator=g, dtype=dtype)
    return x1, x2, w


def relative_error(got: torch.Tensor, expected: torch.Tensor) -> float:
    assert got.shape == expected.shape, (got.shape, expected.shape)
    if expected.numel() == 0:
        return 0.0
    scale = expected.double().abs().max().item()
    return (got.double() - expected.double()).abs().max().item() / max(scale, 1e-30)


def assert_close(got, expected, tolerance, what=""):
    error = relative_error(got, expected)
    assert error <= tolerance, f"{what}: relative error {error:.3g} > {tolerance:g}"
