"""C++ kernels of fastflow::tensor_product, tp_conv and their *_backward (csrc/tensor_product.cpp), called as raw
ops and through fastflow.ops.tensor_product, against the float64 reference (fastflow.ops.tensor_product
*_reference; gradients by autograd through it) and against e3nn itself.

Cases: every connection mode, l <= 3, both parities, multiplicities 1, 3, 7, 17 (and 15..64 for the vectorised
uvu path), shared and per-sample weights, paths with and without weights, float32 and float64; graphs with no
edges, isolated nodes, duplicate and unsorted edges; bitwise determinism (also across thread counts); argument
errors. Errors are bounded elementwise by tol · Σ|terms| (the reference evaluated on absolute values), so a
cancellation cannot hide a wrong term and a zero needs an exact zero.
"""

from __future__ import annotations

import random
import zlib

import pytest
import torch

from fastflow import _extension
from fastflow.ops import tensor_product as tp_ops
from fastflow.ops.tensor_product import MODES, tensor_product_reference, tp_conv_reference
from fastflow.tp.descriptor import TPDescriptor

pytestmark = pytest.mark.usefixtures("single_thread")

MULS = (1, 3, 7, 17)
TOL_FORWARD = {torch.float32: 1e-5, torch.float64: 1e-12}
TOL_GRAD = {torch.float32: 1e-4, torch.float64: 1e-12}


@pytest.fixture(scope="module", autouse=True)
def cpp_kernels():
    if not _extension.load_extension():
        pytest.skip(f"fastflow._C is not loaded: {_extension.extension_status()['reason']}")
    for name in ("tensor_product", "tensor_product_backward", "tp_conv", "tp_conv_backward"):
        if not torch._C._dispatch_has_kernel_for_dispatch_key(f"fastflow::{name}", "CPU"):
            pytest.fail(
                f"the loaded fastflow._C has no CPU kernel for fastflow::{name}: rebuild it "
                "(pip install --no-build-isolation -e .)"
            )


def ops():
    return torch.ops.fastflow


def seed_of(*key) -> int:
    return zlib.crc32(repr(key).encode())


# ---- descriptors ----


def irreps_string(blocks) -> str:
    return "+".join(f"{mul}x{l}{'e' if p == 1 else 'o'}" for mul, l, p in blocks)


def random_descriptor(
    mode: str,
    seed: int,
    muls=MULS,
    lmax: int = 3,
    n_blocks: int = 3,
    max_paths: int = 8,
    mul2_one: bool = False,
) -> TPDescriptor:
    """Random irreps (l <= lmax, both parities) and up to max_paths paths of `mode`, several of them sharing an
    output block, all weighted (see with_weightless_paths)."""
    rng = random.Random(seed)

    def block(mul=None):
        return (rng.choice(muls) if mul is None else mul, rng.randint(0, lmax), rng.choice((1, -1)))

    in1 = [block() for _ in range(n_blocks)]
    if mode in ("uuw", "uuu"):
        in2 = [block(rng.choice(in1)[0]) for _ in range(n_blocks)]
    else:
        in2 = [block(1 if mul2_one else None) for _ in range(n_blocks)]
    candidates = [
        (i1, i2, l_out, p1 * p2)
        for i1, (m1, l1, p1) in enumerate(in1)
        for i2, (m2, l2, p2) in enumerate(in2)
        if mode not in ("uuw", "uuu") or m1 == m2
        for l_out in range(abs(l1 - l2), min(l1 + l2, lmax) + 1)
    ]
    rng.shuffle(candidates)
    out, instructions = [], []
    for i1, i2, l_out, p_out in candidates[:max_paths]:
        m1, m2 = in1[i1][0], in2[i2][0]
        mul_out = {"uvw": rng.choice(muls), "uvu": m1, "uvv": m2, "uuw": rng.choice(muls), "uuu": m1}[mode]
        same = [k for k, b in enumerate(out) if b == (mul_out, l_out, p_out)]
        if same and rng.random() < 0.5:
            i_out = rng.choice(same)
        else:
            i_out = len(out)
            out.append((mul_out, l_out, p_out))
        instructions.append((i1, i2, i_out, mode, True))
    return TPDescriptor.create(irreps_string(in1), irreps_string(in2), irreps_string(out), instructions)


def descriptor_tensors(desc: TPDescriptor, dtype, weighted: str = "all", seed: int = 0):
    """(paths, cg_index, cg_value, cg_offsets) in dtype; weighted: all | some | none (has_weight cleared on a
    random subset / on every path; the weights keep their columns, which then get zero gradients)."""
    paths, cg_index, cg_value, cg_offsets = desc.tensors(dtype)
    paths = paths.clone()
    if weighted != "all":
        generator = torch.Generator().manual_seed(seed)
        clear = (
            torch.ones(len(paths), dtype=torch.bool)
            if weighted == "none"
            else torch.rand(len(paths), generator=generator) < 0.5
        )
        paths[clear, 11] = 0
    return paths, cg_index.clone(), cg_value.clone(), cg_offsets.clone()


# ---- comparisons ----


def abs_descriptor(descriptor):
    paths, cg_index, cg_value, cg_offsets = descriptor
    return paths, cg_index, cg_value.double().abs(), cg_offsets


def reference_with_grads(fn, tensors, extra_before, extra_after, descriptor, grad_out=None):
    """fn(*tensors, *extra_before, *descriptor, *extra_after) in float64 with its VJP for grad_out, and the
    same evaluated on absolute values (the elementwise scale of the rounding errors)."""
    paths, cg_index, cg_value, cg_offsets = descriptor
    results = []
    for absolute in (False, True):
        inputs = [(t.double().abs() if absolute else t.double()).requires_grad_() for t in tensors]
        cg = cg_value.double().abs() if absolute else cg_value.double()
        out = fn(*inputs, *extra_before, paths, cg_index, cg, cg_offsets, *extra_after)
        grads = None
        if grad_out is not None:
            g = grad_out.double().abs() if absolute else grad_out.double()
            grads = torch.autograd.grad(out, inputs, g, allow_unused=True)
            grads = [torch.zeros_like(x) if gr is None else gr for x, gr in zip(inputs, grads)]
        results.append((out.detach(), grads))
    return results


def assert_bounded(got, exact, scale, tol, what):
    assert got.shape == exact.shape, f"{what}: shape {tuple(got.shape)}, expected {tuple(exact.shape)}"
    error = (got.double() - exact).abs()
    bound = tol * scale
    worst = (error - bound).argmax() if error.numel() else None
    assert torch.all(error <= bound), (
        f"{what}: error {error.flatten()[worst].item():.3g} > {bound.flatten()[worst].item():.3g} "
        f"(max relative error {error.max().item() / max(exact.abs().max().item(), 1e-300):.3g})"
    )


def random_inputs(gen, dtype, *shapes):
    return [torch.randn(*shape, generator=gen, dtype=torch.float64).to(dtype) for shape in shapes]


# ---- tensor_product ----


@pytest.mark.parametrize("weighted", ["all", "some", "none"])
@pytest.mark.parametrize("shared", [False, True], ids=["per_sample", "shared"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("mode", MODES)
def test_tensor_product_matches_reference(mode, dtype, shared, weighted):
    seed = seed_of("tp", mode, str(dtype), shared, weighted)
    desc = random_descriptor(mode, seed)
    descriptor = descriptor_tensors(desc, dtype, weighted, seed)
    gen = torch.Generator().manual_seed(seed)
    Z = 11
    x1, x2 = random_inputs(gen, dtype, (Z, desc.dim_in1), (Z, desc.dim_in2))
    (w,) = random_inputs(gen, dtype, (desc.weight_numel,) if shared else (Z, desc.weight_numel))
    (g,) = random_inputs(gen, dtype, (Z, desc.dim_out))

    out = ops().tensor_product(x1, x2, w, *descriptor, desc.dim_out)
    grads = ops().tensor_product_backward(g, x1, x2, w, *descriptor)
    (exact, exact_grads), (scale, scale_grads) = reference_with_grads(
        tensor_product_reference, (x1, x2, w), (), (desc.dim_out,), descriptor, g
    )

    assert out.dtype == dtype and out.is_contiguous()
    assert_bounded(out, exact, scale, TOL_FORWARD[dtype], "out")
    for name, got, x, ex, sc in zip(
        ("grad_x1", "grad_x2", "grad_weights"), grads, (x1, x2, w), exact_grads, scale_grads
    ):
        assert got.dtype == dtype and got.shape == x.shape, name
        assert_bounded(got, ex, sc, TOL_GRAD[dtype], name)


# ---- tp_conv ----


def random_graph(gen, n_src, n_nodes, E):
    """Unsorted random edges, the last two destination nodes isolated, and the first edges repeated."""
    src = torch.randint(0, n_src, (E,), generator=gen)
    dst = torch.randint(0, max(n_nodes - 2, 1), (E,), generator=gen)
    k = min(5, E)
    return torch.cat([src, src[:k]]), torch.cat([dst, dst[:k]])


def check_conv(desc, descriptor, dtype, shared, n_src, n_nodes, E, seed):
    gen = torch.Generator().manual_seed(seed)
    src, dst = random_graph(gen, n_src, n_nodes, E)
    E = len(src)
    x, edge_attrs = random_inputs(gen, dtype, (n_src, desc.dim_in1), (E, desc.dim_in2))
    (w,) = random_inputs(gen, dtype, (desc.weight_numel,) if shared else (E, desc.weight_numel))
    (g,) = random_inputs(gen, dtype, (n_nodes, desc.dim_out))

    out = ops().tp_conv(x, edge_attrs, w, src, dst, n_nodes, *descriptor, desc.dim_out)
    grads = ops().tp_conv_backward(g, x, edge_attrs, w, src, dst, *descriptor)
    (exact, exact_grads), (scale, scale_grads) = reference_with_grads(
        tp_conv_reference, (x, edge_attrs, w), (src, dst, n_nodes), (desc.dim_out,), descriptor, g
    )

    assert out.shape == (n_nodes, desc.dim_out) and out.dtype == dtype
    assert_bounded(out, exact, scale, TOL_FORWARD[dtype], "out")
    if E and n_nodes > 2:
        isolated = torch.ones(n_nodes, dtype=torch.bool)
        isolated[dst] = False
        assert torch.all(out[isolated] == 0)
    for name, got, t, ex, sc in zip(
        ("grad_node_feats", "grad_edge_attrs", "grad_weights"),
        grads,
        (x, edge_attrs, w),
        exact_grads,
        scale_grads,
    ):
        assert got.dtype == dtype and got.shape == t.shape, name
        assert_bounded(got, ex, sc, TOL_GRAD[dtype], name)
    return out, grads


@pytest.mark.parametrize("shared", [False, True], ids=["per_edge", "shared"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("mode", MODES)
def test_tp_conv_matches_reference(mode, dtype, shared):
    seed = seed_of("conv", mode, str(dtype), shared)
    desc = random_descriptor(mode, seed)
    check_conv(
        desc,
        descriptor_tensors(desc, dtype, "some", seed),
        dtype,
        shared,
        n_src=9,
        n_nodes=12,
        E=40,
        seed=seed,
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("mul", [1, 15, 16, 17, 32, 33, 48, 64])
def test_tp_conv_uvu_edge_sh_every_vector_width(mul, dtype):
    """uvu with mul2 = 1 (node features x spherical harmonics) has its own vectorised code: blocks of 2 and 1
    64-byte vectors and a scalar remainder, so the multiplicities straddle 8 (fp64) and 16 (fp32) lanes."""
    seed = seed_of("sh", mul, str(dtype))
    desc = random_descriptor("uvu", seed, muls=(mul,), mul2_one=True, max_paths=12)
    for weighted in ("all", "some"):
        check_conv(
            desc,
            descriptor_tensors(desc, dtype, weighted, seed),
            dtype,
            False,
            n_src=7,
            n_nodes=9,
            E=30,
            seed=seed,
        )
    check_conv(
        desc,
        descriptor_tensors(desc, dtype, "all", seed),
        dtype,
        True,
        n_src=7,
        n_nodes=9,
        E=30,
        seed=seed + 1,
    )


@pytest.mark.parametrize("isa", ["sse2", "avx2"])
def test_narrower_instruction_sets(isa, monkeypatch):
    """The kernels are compiled per x86 instruction set (x86-64-v4, v3, baseline) with vectors of its width;
    FASTFLOW_TP_ISA caps the choice, so the variants this machine would not pick are checked too (a no-op
    where the CPU has no wider set, or on other architectures)."""
    monkeypatch.setenv("FASTFLOW_TP_ISA", isa)
    for mul, dtype in ((17, torch.float32), (33, torch.float32), (7, torch.float64), (48, torch.float64)):
        seed = seed_of("isa", isa, mul, str(dtype))
        desc = random_descriptor("uvu", seed, muls=(mul,), mul2_one=True, max_paths=12)
        check_conv(
            desc,
            descriptor_tensors(desc, dtype, "some", seed),
            dtype,
            False,
            n_src=7,
            n_nodes=9,
            E=30,
            seed=seed,
        )
    for mode in ("uvw", "uuu"):
        seed = seed_of("isa", isa, mode)
        desc = random_descriptor(mode, seed)
        check_conv(
            desc,
            descriptor_tensors(desc, torch.float32, "some", seed),
            torch.float32,
            True,
            n_src=7,
            n_nodes=9,
            E=30,
            seed=seed,
        )


def nequip_e3nn(node_irreps, edge_irreps="1x0e+1x1o+1x2e", lmax=2):
    """The message-passing product of NequIP: every uvu path with l_out <= lmax, one output block per path."""
    from e3nn import o3

    node, edge = o3.Irreps(node_irreps), o3.Irreps(edge_irreps)
    out, instructions = [], []
    for i1, (mul, ir1) in enumerate(node):
        for i2, (_, ir2) in enumerate(edge):
            for ir_out in ir1 * ir2:
                if ir_out.l <= lmax:
                    instructions.append((i1, i2, len(out), "uvu", True))
                    out.append((mul, ir_out))
    return o3.TensorProduct(
        node, edge, o3.Irreps(out), instructions, shared_weights=False, internal_weights=False
    )


@pytest.mark.parametrize("node_irreps", ["8x0e+8x1o", "5x0e+17x1o+3x2e+2x3o"])
def test_tp_conv_matches_e3nn(node_irreps):
    """Against e3nn's own TensorProduct + index_add (forward and autograd), descriptor from the module."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)  # e3nn builds its CG buffers in the default dtype
    try:
        module = nequip_e3nn(node_irreps)
    finally:
        torch.set_default_dtype(previous)
    desc = TPDescriptor.from_e3nn(module)
    descriptor = desc.tensors(torch.float64)
    gen = torch.Generator().manual_seed(seed_of("e3nn", node_irreps))
    N, E = 10, 45
    src, dst = random_graph(gen, N, N, E)
    E = len(src)
    x, sh, w, g = random_inputs(
        gen, torch.float64, (N, desc.dim_in1), (E, desc.dim_in2), (E, module.weight_numel), (N, desc.dim_out)
    )
    inputs = [t.clone().requires_grad_() for t in (x, sh, w)]
    expected = torch.zeros(N, desc.dim_out, dtype=torch.float64).index_add(
        0, dst, module(inputs[0][src], inputs[1], inputs[2])
    )
    expected_grads = torch.autograd.grad(expected, inputs, g)

    out = ops().tp_conv(x, sh, w, src, dst, N, *descriptor, desc.dim_out)
    grads = ops().tp_conv_backward(g, x, sh, w, src, dst, *descriptor)
    torch.testing.assert_close(out, expected.detach(), rtol=1e-10, atol=1e-10)
    for got, want in zip(grads, expected_grads):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


# ---- graphs and shapes at the edges ----


def small_case(dtype=torch.float32, mode="uvu", seed=3):
    desc = random_descriptor(mode, seed, muls=(3, 7))
    return desc, descriptor_tensors(desc, dtype, "all", seed)


@pytest.mark.parametrize("shared", [False, True], ids=["per_edge", "shared"])
def test_tp_conv_without_edges_gives_zeros(shared):
    desc, descriptor = small_case()
    x = torch.randn(4, desc.dim_in1)
    edge_attrs = torch.zeros(0, desc.dim_in2)
    w = torch.randn(desc.weight_numel) if shared else torch.zeros(0, desc.weight_numel)
    no_edges = torch.zeros(0, dtype=torch.int64)
    for n_nodes in (0, 6):
        out = ops().tp_conv(x, edge_attrs, w, no_edges, no_edges, n_nodes, *descriptor, desc.dim_out)
        assert out.shape == (n_nodes, desc.dim_out) and torch.all(out == 0)
        g = torch.randn(n_nodes, desc.dim_out)
        gx, ge, gw = ops().tp_conv_backward(g, x, edge_attrs, w, no_edges, no_edges, *descriptor)
        assert gx.shape == x.shape and torch.all(gx == 0)
        assert ge.shape == edge_attrs.shape
        assert gw.shape == w.shape and torch.all(gw == 0)


def test_tensor_product_without_samples_or_paths():
    desc, descriptor = small_case()
    x1, x2, w = torch.zeros(0, desc.dim_in1), torch.zeros(0, desc.dim_in2), torch.zeros(0, desc.weight_numel)
    out = ops().tensor_product(x1, x2, w, *descriptor, desc.dim_out)
    assert out.shape == (0, desc.dim_out)
    grads = ops().tensor_product_backward(torch.zeros(0, desc.dim_out), x1, x2, w, *descriptor)
    assert [g.shape for g in grads] == [x1.shape, x2.shape, w.shape]
    # no paths at all: zeros of the requested width
    no_paths = (
        torch.zeros(0, 12, dtype=torch.int64),
        torch.zeros(0, 3, dtype=torch.int64),
        torch.zeros(0),
        torch.zeros(1, dtype=torch.int64),
    )
    x1, x2, w = torch.randn(3, 5), torch.randn(3, 2), torch.randn(3, 4)
    out = ops().tensor_product(x1, x2, w, *no_paths, 6)
    assert out.shape == (3, 6) and torch.all(out == 0)
    gx1, gx2, gw = ops().tensor_product_backward(torch.randn(3, 6), x1, x2, w, *no_paths)
    assert torch.all(gx1 == 0) and torch.all(gx2 == 0) and torch.all(gw == 0)


def test_tp_conv_duplicate_edges_add_up():
    desc, descriptor = small_case(torch.float64)
    gen = torch.Generator().manual_seed(5)
    x, edge_attrs, w = random_inputs(
        gen, torch.float64, (3, desc.dim_in1), (1, desc.dim_in2), (1, desc.weight_numel)
    )
    src, dst = torch.tensor([2]), torch.tensor([1])
    once = ops().tp_conv(x, edge_attrs, w, src, dst, 4, *descriptor, desc.dim_out)
    thrice = ops().tp_conv(
        x, edge_attrs.repeat(3, 1), w.repeat(3, 1), src.repeat(3), dst.repeat(3), 4, *descriptor, desc.dim_out
    )
    torch.testing.assert_close(thrice, 3 * once, rtol=1e-13, atol=1e-13)
    assert torch.all(once[[0, 2, 3]] == 0) and torch.any(once[1] != 0)


def test_tp_conv_edge_order_does_not_matter():
    desc, descriptor = small_case(torch.float64, "uvw")
    gen = torch.Generator().manual_seed(6)
    src, dst = random_graph(gen, 6, 8, 50)
    E = len(src)
    x, edge_attrs, w, g = random_inputs(
        gen, torch.float64, (6, desc.dim_in1), (E, desc.dim_in2), (E, desc.weight_numel), (8, desc.dim_out)
    )
    perm = torch.randperm(E, generator=gen)
    out = ops().tp_conv(x, edge_attrs, w, src, dst, 8, *descriptor, desc.dim_out)
    out_perm = ops().tp_conv(x, edge_attrs[perm], w[perm], src[perm], dst[perm], 8, *descriptor, desc.dim_out)
    torch.testing.assert_close(out_perm, out, rtol=1e-12, atol=1e-12)
    gx, ge, gw = ops().tp_conv_backward(g, x, edge_attrs, w, src, dst, *descriptor)
    gx_p, ge_p, gw_p = ops().tp_conv_backward(
        g, x, edge_attrs[perm], w[perm], src[perm], dst[perm], *descriptor
    )
    torch.testing.assert_close(gx_p, gx, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ge_p, ge[perm], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(gw_p, gw[perm], rtol=1e-12, atol=1e-12)


def test_non_contiguous_inputs():
    desc, descriptor = small_case(torch.float64, "uvv")
    gen = torch.Generator().manual_seed(7)
    src, dst = random_graph(gen, 5, 6, 20)
    E = len(src)
    x, edge_attrs, w, g = random_inputs(
        gen,
        torch.float64,
        (desc.dim_in1, 5),
        (E, 2 * desc.dim_in2),
        (desc.weight_numel, E),
        (6, desc.dim_out),
    )
    x, edge_attrs, w = x.t(), edge_attrs[:, ::2], w.t()  # strided views
    assert not (x.is_contiguous() or edge_attrs.is_contiguous() or w.is_contiguous())
    out = ops().tp_conv(x, edge_attrs, w, src, dst, 6, *descriptor, desc.dim_out)
    torch.testing.assert_close(
        out,
        ops().tp_conv(
            x.contiguous(), edge_attrs.contiguous(), w.contiguous(), src, dst, 6, *descriptor, desc.dim_out
        ),
        rtol=0,
        atol=0,
    )
    grads = ops().tp_conv_backward(g.t().contiguous().t(), x, edge_attrs, w, src, dst, *descriptor)
    expected = ops().tp_conv_backward(
        g, x.contiguous(), edge_attrs.contiguous(), w.contiguous(), src, dst, *descriptor
    )
    for got, want in zip(grads, expected):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_tp_conv_bipartite_and_wider_output():
    """More source rows than destination rows and extra output columns no path writes (zeros)."""
    desc, descriptor = small_case(torch.float64, "uuw")
    gen = torch.Generator().manual_seed(8)
    src, dst = random_graph(gen, 11, 4, 25)
    E = len(src)
    x, edge_attrs, w, g = random_inputs(
        gen,
        torch.float64,
        (11, desc.dim_in1 + 3),
        (E, desc.dim_in2),
        (E, desc.weight_numel + 2),
        (4, desc.dim_out + 5),
    )
    out = ops().tp_conv(x, edge_attrs, w, src, dst, 4, *descriptor, desc.dim_out + 5)
    (exact, exact_grads), _ = reference_with_grads(
        tp_conv_reference, (x, edge_attrs, w), (src, dst, 4), (desc.dim_out + 5,), descriptor, g
    )
    torch.testing.assert_close(out, exact, rtol=1e-12, atol=1e-12)
    assert torch.all(out[:, desc.dim_out :] == 0)
    grads = ops().tp_conv_backward(g, x, edge_attrs, w, src, dst, *descriptor)
    for got, want in zip(grads, exact_grads):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    assert torch.all(grads[0][:, desc.dim_in1 :] == 0) and torch.all(grads[2][:, desc.weight_numel :] == 0)


# ---- determinism ----


@pytest.mark.parametrize("shared", [False, True], ids=["per_edge", "shared"])
def test_bitwise_deterministic_for_any_thread_count(shared):
    desc = random_descriptor("uvu", 11, muls=(16, 17), mul2_one=True)
    descriptor = descriptor_tensors(desc, torch.float32)
    gen = torch.Generator().manual_seed(9)
    src, dst = random_graph(gen, 300, 300, 3000)
    E = len(src)
    x, edge_attrs, g = random_inputs(
        gen, torch.float32, (300, desc.dim_in1), (E, desc.dim_in2), (300, desc.dim_out)
    )
    (w,) = random_inputs(gen, torch.float32, (desc.weight_numel,) if shared else (E, desc.weight_numel))
    args = (x, edge_attrs, w, src, dst)

    def run():
        return (
            ops().tp_conv(*args, 300, *descriptor, desc.dim_out),
            *ops().tp_conv_backward(g, *args, *descriptor),
        )

    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        first, again = run(), run()
        torch.set_num_threads(2)
        parallel = run()
    finally:
        torch.set_num_threads(threads)
    for a, b, c in zip(first, again, parallel):
        assert torch.equal(a, b) and torch.equal(a, c)
    # and right: many chunks, so the shared-weight gradient is a sum of partial sums
    (exact, exact_grads), (scale, scale_grads) = reference_with_grads(
        tp_conv_reference, (x, edge_attrs, w), (src, dst, 300), (desc.dim_out,), descriptor, g
    )
    assert_bounded(first[0], exact, scale, TOL_FORWARD[torch.float32], "out")
    for name, got, ex, sc in zip(
        ("grad_node_feats", "grad_edge_attrs", "grad_weights"), first[1:], exact_grads, scale_grads
    ):
        assert_bounded(got, ex, sc, TOL_GRAD[torch.float32], name)


# ---- the public functions (fastflow.ops.tensor_product) with backend="cpp" ----


@pytest.mark.parametrize("conv", [False, True], ids=["tensor_product", "tp_conv"])
def test_public_functions_with_cpp_backend(conv):
    if not hasattr(tp_ops, "tp_conv") or not hasattr(tp_ops, "tensor_product"):
        pytest.skip("fastflow.ops.tensor_product has no public tensor_product / tp_conv yet")
    desc = random_descriptor("uvu", 12, muls=(3, 17))
    descriptor = descriptor_tensors(desc, torch.float64, "some", 12)
    gen = torch.Generator().manual_seed(10)
    src, dst = random_graph(gen, 6, 7, 20)
    rows = len(src)
    x = torch.randn(6 if conv else rows, desc.dim_in1, generator=gen, dtype=torch.float64)
    x2, w = random_inputs(gen, torch.float64, (rows, desc.dim_in2), (rows, desc.weight_numel))
    inputs = [t.clone().requires_grad_() for t in (x, x2, w)]
    if conv:
        out = tp_ops.tp_conv(*inputs, src, dst, 7, *descriptor, desc.dim_out, backend="cpp")
        expected = tp_conv_reference(x, x2, w, src, dst, 7, *descriptor, desc.dim_out)
        raw = ops().tp_conv(x, x2, w, src, dst, 7, *descriptor, desc.dim_out)
    else:
        out = tp_ops.tensor_product(*inputs, *descriptor, desc.dim_out, backend="cpp")
        expected = tensor_product_reference(x, x2, w, *descriptor, desc.dim_out)
        raw = ops().tensor_product(x, x2, w, *descriptor, desc.dim_out)
    assert torch.equal(out.detach(), raw)
    torch.testing.assert_close(out.detach(), expected, rtol=1e-12, atol=1e-12)
    g = torch.randn_like(out)
    grads = torch.autograd.grad(out, inputs, g)
    ref_inputs = [t.clone().requires_grad_() for t in (x, x2, w)]
    ref = (
        tp_conv_reference(*ref_inputs, src, dst, 7, *descriptor, desc.dim_out)
        if conv
        else tensor_product_reference(*ref_inputs, *descriptor, desc.dim_out)
    )
    ref_grads = torch.autograd.grad(ref, ref_inputs, g, allow_unused=True)
    for got, want, t in zip(grads, ref_grads, ref_inputs):
        torch.testing.assert_close(got, torch.zeros_like(t) if want is None else want, rtol=1e-12, atol=1e-12)


# ---- argument errors ----


def conv_args():
    """Valid tp_conv arguments (a dict), fp32."""
    desc, (paths, cg_index, cg_value, cg_offsets) = small_case()
    return {
        "node_feats": torch.randn(4, desc.dim_in1),
        "edge_attrs": torch.randn(6, desc.dim_in2),
        "weights": torch.randn(6, desc.weight_numel),
        "edge_src": torch.tensor([0, 1, 2, 3, 0, 1]),
        "edge_dst": torch.tensor([1, 1, 0, 2, 4, 0]),
        "n_nodes": 5,
        "paths": paths,
        "cg_index": cg_index,
        "cg_value": cg_value,
        "cg_offsets": cg_offsets,
        "dim_out": desc.dim_out,
    }


def edit_path(column, value, path=0):
    def edit(a):
        a["paths"] = a["paths"].clone()
        a["paths"][path, column] = value

    return edit


def edit(**changes):
    def apply(a):
        for key, value in changes.items():
            a[key] = value(a) if callable(value) else value

    return apply


CONV_ERRORS = [
    (
        "int node_feats",
        edit(node_feats=lambda a: a["node_feats"].long()),
        r"node_feats must be float32 or float64",
    ),
    ("1-d node_feats", edit(node_feats=lambda a: a["node_feats"][0]), r"node_feats must be 2-D"),
    (
        "fp64 edge_attrs",
        edit(edge_attrs=lambda a: a["edge_attrs"].double()),
        r"edge_attrs must have dtype Float",
    ),
    ("weights rows", edit(weights=lambda a: a["weights"][:5]), r"weights must have shape"),
    ("3-d weights", edit(weights=lambda a: a["weights"][None]), r"weights must have shape"),
    ("fp64 weights", edit(weights=lambda a: a["weights"].double()), r"weights must have dtype Float"),
    ("edge_src length", edit(edge_src=lambda a: a["edge_src"][:5]), r"edge_src must have shape \[6\]"),
    ("int32 edge_src", edit(edge_src=lambda a: a["edge_src"].int()), r"edge_src must have dtype Long"),
    ("edge_src range", edit(edge_src=torch.tensor([0, 1, 2, 4, 0, 1])), r"edge_src\[3\] = 4 is out of range"),
    (
        "negative edge_dst",
        edit(edge_dst=torch.tensor([1, -1, 0, 2, 4, 0])),
        r"edge_dst\[1\] = -1 is out of range",
    ),
    ("edge_dst range", edit(edge_dst=torch.tensor([1, 1, 0, 2, 5, 0])), r"edge_dst\[4\] = 5 is out of range"),
    ("negative n_nodes", edit(n_nodes=-1), r"n_nodes must be >= 0"),
    ("dim_out too small", edit(dim_out=lambda a: a["dim_out"] - 1), r"paths\[\d+\] writes output columns"),
    ("paths columns", edit(paths=lambda a: a["paths"][:, :11]), r"paths must have shape \[\*, 12\]"),
    ("int32 paths", edit(paths=lambda a: a["paths"].int()), r"paths must have dtype Long"),
    ("mode", edit_path(0, 7), r"paths\[0\] has mode 7"),
    ("off1", edit_path(1, 10_000), r"paths\[0\] reads x1 columns"),
    ("off2", edit_path(4, -1), r"paths\[0\] reads x2 columns"),
    ("d1", edit_path(3, 0), r"paths\[0\] needs multiplicities >= 0 and irrep dimensions >= 1"),
    ("mul_out", edit_path(8, 2), r"paths\[0\] \(uvu\) needs mul_out == mul1"),
    ("w_off", edit_path(10, 10_000), r"paths\[0\] \(uvu\) uses weights"),
    ("has_weight", edit_path(11, 2), r"paths\[0\] has has_weight 2"),
    ("cg_index range", edit(cg_index=lambda a: a["cg_index"] + 7), r"cg_index\[0\] = \(.*\) is outside"),
    ("cg_index shape", edit(cg_index=lambda a: a["cg_index"][:, :2]), r"cg_index must have shape \[\*, 3\]"),
    ("cg_value dtype", edit(cg_value=lambda a: a["cg_value"].double()), r"cg_value must have dtype Float"),
    ("cg_value length", edit(cg_value=lambda a: a["cg_value"][1:]), r"cg_value must have shape"),
    ("cg_offsets length", edit(cg_offsets=lambda a: a["cg_offsets"][1:]), r"cg_offsets must have shape"),
    ("cg_offsets end", edit(cg_offsets=lambda a: a["cg_offsets"] - 1), r"cg_offsets must start at 0 and end"),
    (
        "cg_offsets order",
        edit(
            cg_offsets=lambda a: torch.cat([a["cg_offsets"][:1], a["cg_offsets"][-1:], a["cg_offsets"][2:]])
        ),
        r"cg_offsets must be non-decreasing",
    ),
]


@pytest.mark.parametrize("name, mutate, message", CONV_ERRORS, ids=[e[0] for e in CONV_ERRORS])
def test_tp_conv_rejects_bad_arguments(name, mutate, message):
    a = conv_args()
    ops().tp_conv(**a)  # the unedited arguments are fine
    mutate(a)
    with pytest.raises(RuntimeError, match=message):
        ops().tp_conv(**a)


def test_backward_ops_reject_bad_arguments():
    a = conv_args()
    descriptor = (a["paths"], a["cg_index"], a["cg_value"], a["cg_offsets"])
    g = torch.randn(a["n_nodes"], a["dim_out"])
    conv = (a["node_feats"], a["edge_attrs"], a["weights"], a["edge_src"], a["edge_dst"])
    ops().tp_conv_backward(g, *conv, *descriptor)
    with pytest.raises(RuntimeError, match=r"grad_out must have shape"):
        ops().tp_conv_backward(g[0], *conv, *descriptor)
    with pytest.raises(RuntimeError, match=r"grad_out must have dtype Float"):
        ops().tp_conv_backward(g.double(), *conv, *descriptor)
    with pytest.raises(RuntimeError, match=r"edge_dst\[4\] = 4 is out of range for grad_out.size\(0\) = 4"):
        ops().tp_conv_backward(g[:4], *conv, *descriptor)
    with pytest.raises(RuntimeError, match=r"paths\[\d+\] writes output columns"):
        ops().tp_conv_backward(g[:, :-1], *conv, *descriptor)

    x1, x2, w = (
        torch.randn(3, a["node_feats"].size(1)),
        torch.randn(3, a["edge_attrs"].size(1)),
        a["weights"][:3],
    )
    gt = torch.randn(3, a["dim_out"])
    ops().tensor_product_backward(gt, x1, x2, w, *descriptor)
    with pytest.raises(RuntimeError, match=r"x2 must have shape \[3, \*\]"):
        ops().tensor_product(x1, x2[:2], w, *descriptor, a["dim_out"])
    with pytest.raises(RuntimeError, match=r"weights must have shape \[n_weights\] \(shared\) or \[3"):
        ops().tensor_product(x1, x2, w[:2], *descriptor, a["dim_out"])
    with pytest.raises(RuntimeError, match=r"dim_out must be >= 0"):
        ops().tensor_product(x1, x2, w, *descriptor, -1)
    with pytest.raises(RuntimeError, match=r"grad_out must have shape \[3, \*\]"):
        ops().tensor_product_backward(gt[:2], x1, x2, w, *descriptor)
    with pytest.raises(RuntimeError, match=r"x1 must be float32 or float64"):
        ops().tensor_product_backward(gt, x1.half(), x2, w, *descriptor)
