"""fastflow.triton_kernels.tensor_product (e3nn tensor products in Triton) against the float64 reference.

The kernels are called directly. Without a GPU they run on CPU tensors under Triton's interpreter
(tests/conftest.py sets TRITON_INTERPRET), about 1 ms per op per program, so every shape here is tiny:
at most 6 samples / edges, multiplicities 1 to 3, l <= 2.
"""

import zlib

import pytest
import torch
from e3nn import o3

from fastflow.ops.backends import BackendUnavailable
from fastflow.ops.tensor_product import MODES, tensor_product_reference, tp_conv_reference
from fastflow.tp import TPDescriptor

TOLERANCE = {torch.float32: 1e-5, torch.float64: 1e-12}  # on max|out - ref| / max|ref|

# (irreps_in1, irreps_in2) per mode; uu* modes couple only blocks of equal multiplicity.
IRREPS = {
    "uv": ("2x0e + 3x1o + 1x2e", "1x0e + 2x1o + 1x2e"),
    "uu": ("2x0e + 2x1o + 1x2e", "2x0e + 2x1o + 1x1e"),
}


def seed_of(*key):
    return zlib.crc32(repr(key).encode())  # a fresh, reproducible seed per case


def kernels():
    # Imported inside the tests, after the triton_device fixture checked TRITON_INTERPRET.
    from fastflow.triton_kernels import tensor_product

    return tensor_product


def make_tp(mode, shared=True, weighted="all", lmax=2):
    """An e3nn TensorProduct with every allowed path of `mode` (l <= lmax), paths sharing output blocks.

    weighted: "all", "none" or "some" (every other path without weights); e3nn allows weightless paths only
    in the modes uvu, uvv and uuu.
    """
    irreps1, irreps2 = (o3.Irreps(s) for s in IRREPS["uu" if mode.startswith("uu") else "uv"])
    out_blocks, paths = [], []
    for a, (mul1, ir1) in enumerate(irreps1):
        for b, (mul2, ir2) in enumerate(irreps2):
            if mode.startswith("uu") and mul1 != mul2:
                continue
            for ir_out in ir1 * ir2:
                if ir_out.l > lmax:
                    continue
                mul_out = {"uvw": 2, "uvu": mul1, "uvv": mul2, "uuw": 3, "uuu": mul1}[mode]
                if (mul_out, ir_out) not in out_blocks:
                    out_blocks.append((mul_out, ir_out))
                paths.append((a, b, out_blocks.index((mul_out, ir_out))))
    has_weight = {"all": lambda n: True, "none": lambda n: False, "some": lambda n: n % 2 == 0}[weighted]
    instructions = [(a, b, c, mode, has_weight(n)) for n, (a, b, c) in enumerate(paths)]
    default_dtype = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)  # e3nn builds its CG buffers in the default dtype
    try:
        return o3.TensorProduct(
            irreps1,
            irreps2,
            o3.Irreps(out_blocks),
            instructions,
            shared_weights=shared,
            internal_weights=False,
        )
    finally:
        torch.set_default_dtype(default_dtype)


def descriptor(tp):
    """(paths, cg_index, cg_value, cg_offsets) in float64 (fastflow.tp's cached tensors: do not modify)."""
    return TPDescriptor.from_e3nn(tp).tensors(torch.float64, "cpu")


def randn(generator, *shape):
    return torch.randn(shape, generator=generator, dtype=torch.float64)


def weights_for(tp, generator, rows):
    return randn(generator, tp.weight_numel) if tp.shared_weights else randn(generator, rows, tp.weight_numel)


def check(out, ref, dtype):
    """max|out - ref| / max|ref| within TOLERANCE[dtype]; returns it."""
    assert out.shape == ref.shape and out.dtype == dtype and out.is_contiguous()
    error, scale = (out.cpu().double() - ref).abs().max().item(), ref.abs().max().item()
    assert scale > 0
    assert error <= TOLERANCE[dtype] * scale, f"error {error:.3g} vs max|ref| {scale:.3g}"
    return error / scale


def run_tensor_product(tp, Z, dtype, device, seed, strip_weights=False):
    """strip_weights: has_weight = 0 on every path of the descriptor (W = 1) and an empty weights tensor."""
    g = torch.Generator().manual_seed(seed)
    x1, x2 = randn(g, Z, tp.irreps_in1.dim), randn(g, Z, tp.irreps_in2.dim)
    weights = weights_for(tp, g, Z)
    desc = descriptor(tp)
    if strip_weights:
        desc = (desc[0].clone(), *desc[1:])
        desc[0][:, 10:] = 0  # w_off, has_weight
        weights = weights.new_zeros(0)
    ref = tensor_product_reference(x1, x2, weights, *desc, tp.irreps_out.dim)
    paths, cg_index, cg_value, cg_offsets = desc
    out = kernels().tensor_product(
        x1.to(device, dtype),
        x2.to(device, dtype),
        weights.to(device, dtype),
        paths.to(device),
        cg_index.to(device),
        cg_value.to(device, dtype),
        cg_offsets.to(device),
        tp.irreps_out.dim,
    )
    return check(out, ref, dtype)


def run_tp_conv(tp, edge_src, edge_dst, n_nodes, dtype, device, seed, deterministic):
    g = torch.Generator().manual_seed(seed)
    E = len(edge_src)
    node_feats, edge_attrs = randn(g, n_nodes, tp.irreps_in1.dim), randn(g, E, tp.irreps_in2.dim)
    weights = weights_for(tp, g, E)
    src, dst = torch.tensor(edge_src, dtype=torch.int64), torch.tensor(edge_dst, dtype=torch.int64)
    desc = descriptor(tp)
    ref = tp_conv_reference(node_feats, edge_attrs, weights, src, dst, n_nodes, *desc, tp.irreps_out.dim)
    paths, cg_index, cg_value, cg_offsets = desc
    args = (
        node_feats.to(device, dtype),
        edge_attrs.to(device, dtype),
        weights.to(device, dtype),
        src.to(device),
        dst.to(device),
        n_nodes,
        paths.to(device),
        cg_index.to(device),
        cg_value.to(device, dtype),
        cg_offsets.to(device),
        tp.irreps_out.dim,
    )
    out = kernels().tp_conv(*args, deterministic=deterministic)
    if E == 0:
        assert out.shape == ref.shape and out.dtype == dtype and not out.any()
        return out, 0.0
    return out, check(out, ref, dtype)


# Edges of a 5-node graph: (0 → 1) twice and the self-loop (2 → 2) twice (duplicates), three edges into
# node 1 (more than a deterministic chunk of 2 in test_several_programs), node 4 isolated.
EDGE_SRC = [0, 0, 2, 3, 2, 1]
EDGE_DST = [1, 1, 2, 1, 2, 0]
N_NODES = 5


def test_reference_on_descriptors_matches_e3nn():
    # The reference on these descriptors is e3nn's own product: the tests below check e3nn's semantics.
    for mode, shared, weighted in [
        ("uvw", True, "all"),
        ("uvu", False, "some"),
        ("uuw", False, "all"),
        ("uuu", True, "some"),
    ]:
        tp = make_tp(mode, shared, weighted)
        g = torch.Generator().manual_seed(seed_of("e3nn", mode))
        x1, x2 = randn(g, 3, tp.irreps_in1.dim), randn(g, 3, tp.irreps_in2.dim)
        weights = weights_for(tp, g, 3)
        expected = tp(x1, x2, weights)
        out = tensor_product_reference(x1, x2, weights, *descriptor(tp), tp.irreps_out.dim)
        torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("shared", [True, False], ids=["shared", "per_sample"])
@pytest.mark.parametrize("mode", MODES)
def test_tensor_product_float32(triton_device, mode, shared):
    run_tensor_product(make_tp(mode, shared), 5, torch.float32, triton_device, seed_of("tp", mode, shared))


@pytest.mark.parametrize("weighted", ["none", "some"])
@pytest.mark.parametrize("mode", ["uvu", "uvv", "uuu"])
def test_tensor_product_paths_without_weights(triton_device, mode, weighted):
    # "none": weights is an empty [0] tensor; "some": w_off skips the weightless paths.
    tp = make_tp(mode, shared=False, weighted=weighted)
    run_tensor_product(tp, 4, torch.float32, triton_device, seed_of("unweighted", mode, weighted))


@pytest.mark.parametrize("mode", ["uvw", "uuw"])
def test_tensor_product_w_modes_without_weights(triton_device, mode):
    # e3nn has no weightless uvw / uuw path, but the descriptor format does (W = 1): strip the weights.
    tp = make_tp(mode, lmax=1)
    run_tensor_product(tp, 3, torch.float32, triton_device, seed_of("stripped", mode), strip_weights=True)


def test_tensor_product_float64(triton_device):
    tp = make_tp("uvu", shared=False, weighted="some")
    run_tensor_product(tp, 3, torch.float64, triton_device, seed_of("float64"))


def test_tensor_product_one_sample(triton_device):
    run_tensor_product(make_tp("uvv", shared=False, lmax=1), 1, torch.float32, triton_device, seed_of("Z=1"))


@pytest.mark.parametrize("deterministic", [False, True], ids=["atomic", "deterministic"])
@pytest.mark.parametrize(
    "mode,shared", [("uvu", False), ("uvw", True), ("uuw", False), ("uvv", True), ("uuu", False)]
)
def test_tp_conv_float32(triton_device, mode, shared, deterministic):
    tp = make_tp(mode, shared, lmax=1 if mode in ("uvw", "uuw") else 2)
    run_tp_conv(
        tp,
        EDGE_SRC,
        EDGE_DST,
        N_NODES,
        torch.float32,
        triton_device,
        seed_of("conv", mode, shared),
        deterministic,
    )


def test_tp_conv_float64_and_deterministic_repeats(triton_device):
    tp = make_tp("uvu", shared=False, weighted="some")
    seed = seed_of("conv64")
    args = (tp, EDGE_SRC, EDGE_DST, N_NODES, torch.float64, triton_device, seed)
    first, _ = run_tp_conv(*args, deterministic=True)
    second, _ = run_tp_conv(*args, deterministic=True)
    assert torch.equal(first, second)
    atomic, _ = run_tp_conv(*args, deterministic=False)
    torch.testing.assert_close(atomic, first, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("deterministic", [False, True], ids=["atomic", "deterministic"])
def test_tp_conv_without_edges(triton_device, deterministic):
    tp = make_tp("uvu", shared=False, lmax=1)
    run_tp_conv(tp, [], [], 3, torch.float32, triton_device, seed_of("empty"), deterministic)


def test_several_programs(triton_device, monkeypatch):
    # Blocks of 2 rows: several programs per launch, a masked tail (5 samples), and node 1's three edges in
    # two chunks of 2 in the deterministic variant.
    module = kernels()
    monkeypatch.setattr(module, "MAX_ROWS", 2)
    monkeypatch.setattr(module, "DETERMINISTIC_CHUNK", 2)
    tp = make_tp("uvw", shared=False, lmax=1)
    run_tensor_product(tp, 5, torch.float32, triton_device, seed_of("programs"))
    for deterministic in (False, True):
        run_tp_conv(
            tp,
            EDGE_SRC,
            EDGE_DST,
            N_NODES,
            torch.float32,
            triton_device,
            seed_of("programs", "conv"),
            deterministic,
        )


def test_descriptor_plan_is_built_once_and_rebuilt_after_an_in_place_change(triton_device, monkeypatch):
    module = kernels()
    prepared = []
    original = module._prepare
    monkeypatch.setattr(module, "_prepare", lambda *args: prepared.append(1) or original(*args))
    tp = make_tp("uvu", shared=False, lmax=1)
    g = torch.Generator().manual_seed(seed_of("plan"))
    x1, x2, weights = randn(g, 3, tp.irreps_in1.dim), randn(g, 3, tp.irreps_in2.dim), weights_for(tp, g, 3)
    paths, cg_index, cg_value, cg_offsets = (t.clone() for t in descriptor(tp))  # ours to modify
    dims = (tp.irreps_out.dim,)

    def run():
        return module.tensor_product(x1, x2, weights, paths, cg_index, cg_value, cg_offsets, *dims)

    first = run()
    assert torch.equal(run(), first) and len(prepared) == 1  # the second call reuses the plan
    module.tp_conv(
        x1, x2, weights, torch.arange(3), torch.arange(3), 3, paths, cg_index, cg_value, cg_offsets, *dims
    )
    assert len(prepared) == 1  # the same descriptor, dtype and device: the same plan
    cg_value.mul_(2)  # in place: the plan must not be reused
    torch.testing.assert_close(run(), 2 * first, rtol=1e-12, atol=1e-12)
    assert len(prepared) == 2
    reference = tensor_product_reference(x1, x2, weights, paths, cg_index, cg_value, cg_offsets, *dims)
    check(run().double(), reference, torch.float64)
    module.tensor_product(
        x1.float(), x2.float(), weights.float(), paths, cg_index, cg_value, cg_offsets, *dims
    )
    assert len(prepared) == 3  # another dtype: its own plan


def test_errors(triton_device):
    module = kernels()
    tp = make_tp("uuu", lmax=0)
    paths, cg_index, cg_value, cg_offsets = descriptor(tp)
    x1, x2 = torch.randn(2, tp.irreps_in1.dim), torch.randn(2, tp.irreps_in2.dim)
    weights = torch.randn(tp.weight_numel)
    dim_out = tp.irreps_out.dim
    bad_paths = paths.clone()
    bad_paths[0, 0] = len(MODES)
    with pytest.raises(NotImplementedError, match="mode"):
        module.tensor_product(x1, x2, weights, bad_paths, cg_index, cg_value.float(), cg_offsets, dim_out)
    with pytest.raises(TypeError, match="float32 or float64"):
        module.tensor_product(
            x1.half(), x2.half(), weights.half(), paths, cg_index, cg_value.half(), cg_offsets, dim_out
        )


def test_through_the_op(triton_device):
    # fastflow.ops.tensor_product.tp_conv(backend="triton") → torch.ops.fastflow.tp_conv_triton → the
    # kernels' tp_conv (atomic variant), behind the op's input checks.
    from fastflow.ops.tensor_product import tp_conv

    tp = make_tp("uvu", shared=False, weighted="some")
    g = torch.Generator().manual_seed(seed_of("op"))
    node_feats, edge_attrs = randn(g, N_NODES, tp.irreps_in1.dim), randn(g, len(EDGE_SRC), tp.irreps_in2.dim)
    weights = weights_for(tp, g, len(EDGE_SRC))
    src, dst = torch.tensor(EDGE_SRC), torch.tensor(EDGE_DST)
    desc = descriptor(tp)
    ref = tp_conv_reference(node_feats, edge_attrs, weights, src, dst, N_NODES, *desc, tp.irreps_out.dim)
    paths, cg_index, cg_value, cg_offsets = (t.to(triton_device) for t in desc)
    dtype = torch.float32
    out = tp_conv(
        node_feats.to(triton_device, dtype),
        edge_attrs.to(triton_device, dtype),
        weights.to(triton_device, dtype),
        src.to(triton_device),
        dst.to(triton_device),
        N_NODES,
        paths,
        cg_index,
        cg_value.to(dtype),
        cg_offsets,
        tp.irreps_out.dim,
        backend="triton",
    )
    check(out, ref, dtype)


# ---- tf32 / bf16: the shared-weight uvw paths as tl.dot tiles (tensor cores on a GPU) ----


def wide_uvw(mul1=20, mul2=3, mul_out=17):
    """A fully connected uvw product wide enough for tl.dot tiles: u in two chunks (the second masked past
    mul1), v and w padded to powers of two."""
    return TPDescriptor.create(
        f"{mul1}x0e+{mul1}x1o",
        f"{mul2}x0e+{mul2}x1o",
        f"{mul_out}x0e+{mul_out}x1o",
        [(0, 0, 0, "uvw", True), (0, 1, 1, "uvw", True), (1, 0, 1, "uvw", True), (1, 1, 0, "uvw", True)],
    )


def test_tf32_uses_dot_tiles_and_matches_the_reference(triton_device):
    # Under the interpreter TF32 products are computed in float32, so the float32 tolerance holds; on a GPU
    # bench/gpu_check.py checks them at TF32's.
    module = kernels()
    d = wide_uvw()
    paths, cg_index, cg_value, cg_offsets = d.tensors(torch.float64)
    rows = module._plan(paths, cg_index, cg_value, cg_offsets, torch.float32)[0]
    blocks = [module._blocks(row, module.MAX_ROWS, "tf32", shared=True) for row in rows]
    assert all(b["DOT"] and b["BLOCK_U"] // b["U_CHUNK"] == 2 for b in blocks)  # two chunks of u each
    assert not any(module._blocks(row, module.MAX_ROWS, "tf32", shared=False)["DOT"] for row in rows)
    g = torch.Generator().manual_seed(seed_of("tf32"))
    Z = 37  # two programs of 32 rows, the second masked
    x1, x2, weights = randn(g, Z, d.dim_in1), randn(g, Z, d.dim_in2), randn(g, d.weight_numel)
    ref = tensor_product_reference(x1, x2, weights, paths, cg_index, cg_value, cg_offsets, d.dim_out)
    f32 = [t.to(triton_device, torch.float32) for t in (x1, x2, weights, cg_value)]
    desc = (paths.to(triton_device), cg_index.to(triton_device), f32[3], cg_offsets.to(triton_device))
    out = module.tensor_product(*f32[:3], *desc, d.dim_out, precision="tf32")
    check(out, ref, torch.float32)
    n_nodes, src, dst = 7, torch.randint(7, (Z,), generator=g), torch.randint(7, (Z,), generator=g)
    nodes = randn(g, n_nodes, d.dim_in1)
    ref = tp_conv_reference(
        nodes, x2, weights, src, dst, n_nodes, paths, cg_index, cg_value, cg_offsets, d.dim_out
    )
    for deterministic in (False, True):
        out = module.tp_conv(
            nodes.to(triton_device, torch.float32),
            *f32[1:3],
            src.to(triton_device),
            dst.to(triton_device),
            n_nodes,
            *desc,
            d.dim_out,
            deterministic=deterministic,
            precision="tf32",
        )
        check(out, ref, torch.float32)


def test_precision_through_the_op_and_its_refusals(triton_device):
    from fastflow.ops.tensor_product import tensor_product, tensor_product_triton

    d = wide_uvw(16, 1, 16)
    g = torch.Generator().manual_seed(seed_of("op precision"))
    x1, x2, weights = randn(g, 3, d.dim_in1), randn(g, 3, d.dim_in2), randn(g, d.weight_numel)
    T64 = d.tensors(torch.float64)
    ref = tensor_product_reference(x1, x2, weights, *T64, d.dim_out)
    args = [t.to(triton_device, torch.float32) for t in (x1, x2, weights)]
    T = d.tensors(torch.float32, triton_device)
    out = tensor_product(*args, *T, d.dim_out, backend="triton", precision="tf32")
    check(out, ref, torch.float32)
    torch.library.opcheck(tensor_product_triton, (*args, *T, d.dim_out, "tf32"))
    with pytest.raises(ValueError, match="triton backend only"):
        tensor_product(
            x1.float(),
            x2.float(),
            weights.float(),
            *d.tensors(torch.float32),
            d.dim_out,
            backend="reference",
            precision="tf32",
        )
    with pytest.raises(ValueError, match="needs float32"):
        tensor_product(
            x1,
            x2,
            weights,
            *[t.to(triton_device) for t in T64],
            d.dim_out,
            backend="triton",
            precision="tf32",
        )
    with pytest.raises(ValueError, match="precision must be one of"):
        tensor_product(*args, *T, d.dim_out, backend="triton", precision="fp16")
    if triton_device == "cpu":  # the interpreter
        with pytest.raises(BackendUnavailable, match="TRITON_INTERPRET"):
            tensor_product(*args, *T, d.dim_out, backend="triton", precision="bf16")
