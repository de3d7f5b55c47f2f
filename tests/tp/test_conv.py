"""tp_conv (gather by source, tensor product, scatter-sum to destination) against e3nn + index_add: graphs with
isolated nodes, duplicate edges, self-loops, empty edge sets; errors; double backward (forces); equivariance."""

import pytest
import torch
from e3nn import o3

from fastflow.benchmarks.tp import nequip_tensor_product
from fastflow.nn import TensorProduct, TPConv
from fastflow.ops.tensor_product import tp_conv
from fastflow.tp import TPDescriptor

from .common import assert_close, default_dtype, random_tensor_product, require_backend, seed_of

pytestmark = pytest.mark.usefixtures("single_thread")

BACKENDS = ("reference", "cpp")


def nequip_tp(irreps_node="3x0e+2x1o+1x2e", lmax=2, dtype=torch.float32):
    """NequIP's convolution product (fastflow.benchmarks.tp.nequip_tensor_product) in `dtype`, with e3nn's einsum
    optimisation off."""
    with default_dtype(dtype):
        return nequip_tensor_product(irreps_node, lmax, _optimize_einsums=False)


def random_graph(n_nodes, n_edges, seed, isolated=(), duplicates=0):
    """Random directed edges (self-loops possible) avoiding the `isolated` nodes, plus `duplicates` repeated
    edges."""
    g = torch.Generator().manual_seed(seed)
    allowed = torch.tensor([n for n in range(n_nodes) if n not in isolated])
    src = allowed[torch.randint(len(allowed), (n_edges,), generator=g)]
    dst = allowed[torch.randint(len(allowed), (n_edges,), generator=g)]
    if duplicates:
        pick = torch.randint(n_edges, (duplicates,), generator=g)
        src, dst = torch.cat([src, src[pick]]), torch.cat([dst, dst[pick]])
    return src, dst


def e3nn_conv(tp, node_feats, edge_attrs, weights, src, dst, n_nodes):
    messages = tp(node_feats[src], edge_attrs, weights)
    return messages.new_zeros(n_nodes, messages.size(1)).index_add(0, dst, messages)


def conv_inputs(tp, n_nodes, n_edges, seed, shared=False, dtype=torch.float32, **graph):
    g = torch.Generator().manual_seed(seed)
    src, dst = random_graph(n_nodes, n_edges, seed, **graph)
    E = len(src)
    node_feats = torch.randn(n_nodes, tp.irreps_in1.dim, generator=g, dtype=dtype)
    edge_attrs = torch.randn(E, tp.irreps_in2.dim, generator=g, dtype=dtype)
    weights = torch.randn(*(() if shared else (E,)), tp.weight_numel, generator=g, dtype=dtype)
    return node_feats, edge_attrs, weights, src, dst


def check_conv(tp, backend, inputs, n_nodes, dtype=torch.float32, seed=0):
    require_backend(backend)
    descriptor = TPDescriptor.from_e3nn(tp)
    tensors = descriptor.tensors(dtype)
    node_feats, edge_attrs, weights, src, dst = inputs

    def run(function):
        leaves = [t.clone().requires_grad_() for t in (node_feats, edge_attrs, weights)]
        out = function(*leaves)
        probe = torch.randn(
            out.shape, generator=torch.Generator().manual_seed(seed_of("probe", seed)), dtype=dtype
        )
        grads = torch.autograd.grad((out * probe).sum(), leaves, allow_unused=True, materialize_grads=True)
        return out.detach(), grads

    expected, expected_grads = run(lambda a, b, w: e3nn_conv(tp, a, b, w, src, dst, n_nodes))
    out, grads = run(
        lambda a, b, w: tp_conv(a, b, w, src, dst, n_nodes, *tensors, descriptor.dim_out, backend=backend)
    )
    tolerance = {torch.float32: (1e-5, 1e-4), torch.float64: (1e-12, 1e-11)}[dtype]
    assert_close(out, expected, tolerance[0], f"{backend} forward")
    for name, got, ref in zip(("node_feats", "edge_attrs", "weights"), grads, expected_grads):
        assert_close(got, ref, tolerance[1], f"{backend} d/d{name}")
    return out


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("irreps_node", ["32x0e+32x1o", "3x0e+7x1o+17x2e+1x3o", "1x0o+3x1e+1x2o+7x3e"])
def test_nequip_convolution_matches_e3nn(irreps_node, backend):
    lmax = 3 if "3" in irreps_node.split("+")[-1][-2:] else 2
    tp = nequip_tp(irreps_node, lmax=lmax)
    inputs = conv_inputs(tp, 9, 40, seed_of(irreps_node), isolated=(2, 7), duplicates=5)
    check_conv(tp, backend, inputs, 9, seed=seed_of(irreps_node))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shared", [True, False], ids=["shared", "per-edge"])
@pytest.mark.parametrize("mode", ["uvw", "uvu", "uvv", "uuw", "uuu"])
def test_every_mode_matches_e3nn(mode, shared, backend):
    tp = random_tensor_product(mode, seed_of("conv", mode, shared), shared=shared)
    inputs = conv_inputs(
        tp, 6, 15, seed_of("conv inputs", mode, shared), shared=shared, isolated=(0,), duplicates=3
    )
    check_conv(tp, backend, inputs, 6, seed=seed_of(mode, shared))


@pytest.mark.parametrize("backend", BACKENDS)
def test_float64(backend):
    tp = nequip_tp("3x0e+2x1o+2x2e", dtype=torch.float64)
    inputs = conv_inputs(tp, 7, 30, seed_of("f64"), dtype=torch.float64, duplicates=4)
    check_conv(tp, backend, inputs, 7, dtype=torch.float64)


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_edge_set_gives_zeros_and_zero_gradients(backend):
    require_backend(backend)
    tp = nequip_tp()
    d = TPDescriptor.from_e3nn(tp)
    node_feats = torch.randn(5, d.dim_in1, requires_grad=True)
    edge_attrs = torch.zeros(0, d.dim_in2, requires_grad=True)
    weights = torch.zeros(0, d.weight_numel, requires_grad=True)
    empty = torch.zeros(0, dtype=torch.int64)
    out = tp_conv(node_feats, edge_attrs, weights, empty, empty, 5, *d.tensors(), d.dim_out, backend=backend)
    assert out.shape == (5, d.dim_out) and torch.equal(out, torch.zeros_like(out))
    grads = torch.autograd.grad(out.sum(), [node_feats, edge_attrs, weights])
    assert torch.equal(grads[0], torch.zeros_like(node_feats))
    assert grads[1].shape == (0, d.dim_in2) and grads[2].shape == (0, d.weight_numel)
    # no nodes at all
    out = tp_conv(
        node_feats[:0], edge_attrs, weights, empty, empty, 0, *d.tensors(), d.dim_out, backend=backend
    )
    assert out.shape == (0, d.dim_out)


@pytest.mark.parametrize("backend", BACKENDS)
def test_isolated_nodes_get_zero_rows_and_more_output_rows_than_nodes(backend):
    require_backend(backend)
    tp = nequip_tp()
    d = TPDescriptor.from_e3nn(tp)
    node_feats, edge_attrs, weights, _, _ = conv_inputs(tp, 4, 6, seed_of("isolated"))
    src = torch.tensor([0, 0, 1, 1, 3, 3])
    dst = torch.tensor([5, 5, 5, 0, 0, 3])  # node 1, 2, 4 receive nothing; output has 6 rows, input 4
    out = tp_conv(node_feats, edge_attrs, weights, src, dst, 6, *d.tensors(), d.dim_out, backend=backend)
    assert torch.equal(out[[1, 2, 4]], torch.zeros(3, d.dim_out))
    assert_close(out, e3nn_conv(tp, node_feats, edge_attrs, weights, src, dst, 6), 1e-5, "forward")


@pytest.mark.parametrize("backend", BACKENDS)
def test_duplicate_edges_add_up(backend):
    require_backend(backend)
    tp = nequip_tp()
    d = TPDescriptor.from_e3nn(tp)
    node_feats, edge_attrs, weights, src, dst = conv_inputs(tp, 5, 8, seed_of("dup"))
    once = tp_conv(node_feats, edge_attrs, weights, src, dst, 5, *d.tensors(), d.dim_out, backend=backend)
    twice = tp_conv(
        node_feats,
        edge_attrs.repeat(2, 1),
        weights.repeat(2, 1),
        src.repeat(2),
        dst.repeat(2),
        5,
        *d.tensors(),
        d.dim_out,
        backend=backend,
    )
    assert_close(twice, 2 * once, 1e-6, "duplicates")


def test_cpp_is_deterministic_and_thread_count_independent():
    require_backend("cpp")
    tp = nequip_tp("8x0e+8x1o+4x2e")
    d = TPDescriptor.from_e3nn(tp)
    node_feats, edge_attrs, weights, src, dst = conv_inputs(tp, 50, 600, seed_of("determinism"))
    shared = weights[0].clone()

    def run():
        leaves = [t.clone().requires_grad_() for t in (node_feats, edge_attrs, weights, shared)]
        a = tp_conv(leaves[0], leaves[1], leaves[2], src, dst, 50, *d.tensors(), d.dim_out, backend="cpp")
        b = tp_conv(leaves[0], leaves[1], leaves[3], src, dst, 50, *d.tensors(), d.dim_out, backend="cpp")
        return [a, b, *torch.autograd.grad((a.sin() + b.cos()).sum(), leaves)]

    threads = torch.get_num_threads()
    first = run()
    try:
        torch.set_num_threads(2)
        second = run()
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(x, y) for x, y in zip(first, second))


# ---- errors ----


def descriptor_and_inputs():
    tp = nequip_tp()
    d = TPDescriptor.from_e3nn(tp)
    return d, conv_inputs(tp, 5, 8, seed_of("errors"))


@pytest.mark.parametrize("backend", BACKENDS)
def test_clear_errors(backend):
    require_backend(backend)
    d, (x, e, w, src, dst) = descriptor_and_inputs()
    T = d.tensors()

    def call(x=x, e=e, w=w, src=src, dst=dst, n=5, T=T, dim_out=d.dim_out):
        return tp_conv(x, e, w, src, dst, n, *T, dim_out, backend=backend)

    with pytest.raises(IndexError, match=r"edge_src holds indices in \[.*\], outside \[0, 3\)"):
        call(x=x[:3], src=torch.tensor([0, 1, 2, 3, 4, 0, 1, 2]))
    with pytest.raises(IndexError, match="edge_dst holds indices"):
        call(dst=dst.clamp(max=3) + 2, n=5)
    with pytest.raises(IndexError, match="edge_dst"):
        call(dst=torch.full_like(dst, -1))
    with pytest.raises(TypeError, match="edge_src must be int64, got torch.int32"):
        call(src=src.int())
    with pytest.raises(ValueError, match=r"edge_dst must have shape \[8\]"):
        call(dst=dst[:5])
    with pytest.raises(TypeError, match="edge_attrs has dtype torch.float64, expected torch.float32"):
        call(e=e.double())
    with pytest.raises(TypeError, match="cg_value must have dtype torch.float32"):
        call(T=d.tensors(torch.float64))
    with pytest.raises(ValueError, match=r"edge_attrs must have 8 rows \(one per edge\)"):
        call(e=e[:3])
    with pytest.raises(ValueError, match=r"weights must be \[n_weights\] \(shared\) or \[8, n_weights\]"):
        call(w=w[:3])
    with pytest.raises(ValueError, match="paths read .* features of node_feats.*irreps mismatch"):
        call(x=x[:, :-1])
    with pytest.raises(ValueError, match="paths read .* features of weights"):
        call(w=w[:, :-2])
    with pytest.raises(ValueError, match="paths write .* output features"):
        call(dim_out=d.dim_out - 1)
    with pytest.raises(TypeError, match="float32 or float64"):
        call(x=x.half(), e=e.half(), w=w.half())


def test_modules_name_mismatched_irreps():
    tp = nequip_tp()
    conv, fused = TPConv(tp), TensorProduct(tp)
    x, e, w, src, dst = conv_inputs(tp, 5, 8, seed_of("module errors"))
    with pytest.raises(ValueError, match=r"node_feats must have shape \[·, 14\] \(irreps 3x0e\+2x1o\+1x2e\)"):
        conv(x[:, :10], e, w, src, dst, 5)
    with pytest.raises(ValueError, match=r"edge_attrs must have shape \[·, 9\] \(irreps 1x0e\+1x1o\+1x2e\)"):
        conv(x, e[:, :4], w, src, dst, 5)
    with pytest.raises(ValueError, match="edge_weights must have"):
        conv(x, e, w[:, 1:], src, dst, 5)
    with pytest.raises(RuntimeError, match="edge_weights must be given"):
        conv(x, e, None, src, dst, 5)
    with pytest.raises(
        ValueError, match=r"x2 must have 9 features in its last dimension \(irreps 1x0e\+1x1o"
    ):
        fused(x[src], e[:, :4], w)
    with pytest.raises(ValueError, match="without shared weights, weight must have a batch dimension"):
        fused(x[src], e, w[0])
    with pytest.raises(RuntimeError, match="weights must be provided"):
        fused(x[src], e)


# ---- double backward: forces ----


def energy_model(tp, positions, species_feats, weights, src, dst, backend):
    """E = Σ_nodes Σ scalar outputs of one convolution over edge spherical harmonics of r_ij."""
    vectors = positions[dst] - positions[src]
    sh = o3.spherical_harmonics(tp.irreps_in2, vectors, normalize=True, normalization="component")
    radial = torch.exp(-vectors.square().sum(-1, keepdim=True))  # smooth in the positions
    edge_weights = radial * weights
    if backend == "e3nn":
        out = e3nn_conv(tp, species_feats, sh, edge_weights, src, dst, positions.size(0))
    else:
        out = TPConv(tp, backend=backend)(species_feats, sh, edge_weights, src, dst, positions.size(0))
    scalars = out[:, : tp.irreps_out.count("0e")]
    return (scalars.square().sum(-1) + scalars.sum(-1)).sum()


@pytest.mark.parametrize("backend", BACKENDS)
def test_forces_and_their_gradients_match_e3nn(backend):
    require_backend(backend)
    tp = nequip_tp("4x0e+3x1o+2x2e")
    g = torch.Generator().manual_seed(seed_of("forces"))
    n = 6
    src, dst = random_graph(n, 20, seed_of("force graph"))
    src, dst = src[src != dst], dst[src != dst]  # no self-loops: r_ij = 0 has no direction
    positions = torch.randn(n, 3, generator=g)
    species = torch.randn(n, tp.irreps_in1.dim, generator=g)
    weights = torch.randn(len(src), tp.weight_numel, generator=g)

    def forces_and_gradients(which):
        pos, feats, w = (t.clone().requires_grad_() for t in (positions, species, weights))
        energy = energy_model(tp, pos, feats, w, src, dst, which)
        forces = -torch.autograd.grad(energy, pos, create_graph=True)[0]
        loss = forces.square().sum()
        return forces.detach(), torch.autograd.grad(loss, [pos, feats, w])

    expected_forces, expected_grads = forces_and_gradients("e3nn")
    forces, grads = forces_and_gradients(backend)
    assert_close(forces, expected_forces, 1e-5, "forces")
    for name, got, ref in zip(("positions", "node features", "weights"), grads, expected_grads):
        assert_close(got, ref, 1e-4, f"d|F|²/d{name}")


# ---- equivariance ----


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("parity", [1, -1], ids=["rotation", "rotoinversion"])
def test_equivariance_under_random_rotations(parity, backend):
    require_backend(backend)
    tp = nequip_tp("3x0e+2x1o+2x1e+1x2e+1x3o", lmax=3, dtype=torch.float64)
    d = TPDescriptor.from_e3nn(tp)
    x, e, w, src, dst = conv_inputs(tp, 6, 20, seed_of("equivariance"), dtype=torch.float64)
    torch.manual_seed(seed_of("rotation", parity))
    with default_dtype(torch.float64):  # e3nn's generators in float64 too
        R = o3.rand_matrix() * parity
        D1, D2, D_out = (
            o3.Irreps(irreps).D_from_matrix(R) for irreps in (d.irreps_in1, d.irreps_in2, d.irreps_out)
        )
    T = d.tensors(torch.float64)
    rotated_after = tp_conv(x, e, w, src, dst, 6, *T, d.dim_out, backend=backend) @ D_out.T
    rotated_before = tp_conv(x @ D1.T, e @ D2.T, w, src, dst, 6, *T, d.dim_out, backend=backend)
    assert_close(rotated_before, rotated_after, 1e-12, "equivariance")
