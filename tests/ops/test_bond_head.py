"""fastflow::bond_head, C++ backend: against the reference (and the reference against the model's own modules),
exact symmetry, padding, rotation and translation invariance, opcheck, gradients, input errors."""

import importlib
import zlib

import pytest
import torch
import torch.nn.functional as F

from fastflow import _extension
from fastflow.models import Semla, SemlaConfig
from fastflow.ops.bond_head import ARGUMENTS, bond_head, bond_head_flops, bond_head_reference

op = importlib.import_module("fastflow.ops.bond_head")  # the module: the name above is the function

pytestmark = pytest.mark.usefixtures("single_thread")

# (E, F, G, K): edge channels, BondRefine hidden, head hidden, bond classes.
WIDTHS = {"tiny": (16, 16, 16, 5), "odd": (12, 7, 9, 3), "small": (64, 64, 64, 5)}
TOLERANCE = {torch.float32: 1e-5, torch.float64: 1e-12}  # on max|out - ref64| / max|ref64|


def seed_of(*key):
    return zlib.crc32(repr(key).encode())  # a fresh, reproducible seed per case


def random_inputs(widths, B, N, seed, refine=True, garbage_seed=None):
    """Float64 keyword arguments of the op and the [B, N] bool mask of real atoms, all random and non-zero.

    Each molecule has a random number of real atoms (the first has padding when N > 1, the last a single real atom
    when B > 1). Coordinates of real atoms are centred over them (as BondRefine's CoordNorm); everything that
    belongs to a padding atom — its per-atom terms and coordinates, every e' row of a pair that involves it — is
    large garbage drawn from `garbage_seed` (default: the same generator), so that two garbage seeds give two
    inputs that agree on every real pair.
    """
    E, F_, G, K = WIDTHS[widths] if isinstance(widths, str) else widths
    generator = torch.Generator().manual_seed(seed)

    def randn(*shape, scale=1.0, shift=0.0, gen=generator):
        return torch.randn(shape, generator=gen, dtype=torch.float64) * scale + shift

    counts = torch.randint(max(1, N // 2), N + 1, (B,), generator=generator)
    if N > 1:
        counts[0] = N - 1
    if B > 1:
        counts[-1] = 1
    mask = torch.arange(N)[None, :] < counts[:, None]
    pair_mask = mask[:, :, None] & mask[:, None, :]

    args = dict(
        edge_feats=randn(B, N, N, E, scale=2.0, shift=0.5),
        bond_norm_weight=randn(E, scale=0.2, shift=1.0),
        bond_norm_bias=randn(E, scale=0.2),
        head_weight1=randn(G, E, scale=E**-0.5),
        head_bias1=randn(G, scale=0.5),
        head_weight2=randn(K, G, scale=G**-0.5),
        head_bias2=randn(K, scale=0.5),
    )
    if refine:
        coords = randn(B, N, 3, scale=1.5)
        centre = (coords * mask[..., None]).sum(1, keepdim=True) / mask.sum(1)[:, None, None]
        args.update(
            node_terms_i=randn(B, N, F_),
            node_terms_j=randn(B, N, F_),
            coords=(coords - centre) * mask[..., None],
            edge_norm_weight=randn(E, scale=0.2, shift=1.0),
            edge_norm_bias=randn(E, scale=0.2),
            edge_weight=randn(F_, E, scale=E**-0.5),
            dist_weight=randn(F_, scale=0.3),
            dot_weight=randn(F_, scale=0.3),
            refine_weight=randn(E, F_, scale=F_**-0.5),
            refine_bias=randn(E, scale=0.5),
        )
    junk = generator if garbage_seed is None else torch.Generator().manual_seed(garbage_seed)
    args["edge_feats"] = torch.where(
        pair_mask[..., None], args["edge_feats"], randn(B, N, N, E, scale=30.0, shift=7.0, gen=junk)
    )
    if refine:
        for name, width in (("node_terms_i", F_), ("node_terms_j", F_), ("coords", 3)):
            args[name] = torch.where(mask[..., None], args[name], randn(B, N, width, scale=30.0, gen=junk))
    return args, mask


def cast(args, dtype):
    return {name: t.to(dtype) if torch.is_tensor(t) else t for name, t in args.items()}


def assert_matches_reference(args, dtype):
    out = bond_head(**cast(args, dtype), backend="cpp")
    ref = bond_head_reference(**args)
    assert out.shape == ref.shape and out.dtype == dtype and out.is_contiguous()
    error, scale = (out.double() - ref).abs().max().item(), ref.abs().max().item()
    assert error <= TOLERANCE[dtype] * scale, f"error {error:.3g} vs max|ref| {scale:.3g}"
    return out


# ---- against the reference ----


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("refine", [True, False])
@pytest.mark.parametrize("N", [1, 2, 3, 17])
def test_cpp_matches_reference(N, refine, dtype):
    args, _ = random_inputs("tiny", 3, N, seed_of(N, refine, str(dtype)), refine=refine)
    assert_matches_reference(args, dtype)


@pytest.mark.parametrize("refine", [True, False])
def test_cpp_matches_reference_100_atoms(refine):
    # 100 atoms: blocks of 15 atoms (the last of 10), block pairs of several sizes, tiles of one or two of them.
    args, _ = random_inputs("small", 2, 100, seed_of(100, refine), refine=refine)
    assert_matches_reference(args, torch.float32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cpp_matches_reference_odd_widths(dtype):
    assert_matches_reference(random_inputs("odd", 4, 19, seed_of("odd", str(dtype)))[0], dtype)


def test_several_threads_and_tiles():
    # 5 molecules of 44 atoms: 3 blocks per molecule, tiles spanning molecules, two threads.
    args, _ = random_inputs("small", 5, 44, seed_of("threads"))
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        for dtype in (torch.float32, torch.float64):
            out = assert_matches_reference(args, dtype)
            assert torch.equal(out, out.transpose(1, 2))
    finally:
        torch.set_num_threads(threads)


def test_strided_inputs():
    args, _ = random_inputs("tiny", 3, 11, seed_of("strided"))
    strided = {
        name: t.transpose(0, -1).contiguous().transpose(0, -1) if t.dim() > 1 else t[None].expand(2, -1)[1]
        for name, t in args.items()
    }
    assert not any(t.is_contiguous() for t in strided.values() if t.dim() > 1)
    torch.testing.assert_close(
        bond_head(**strided, backend="cpp"), bond_head(**args, backend="cpp"), rtol=1e-14, atol=1e-14
    )


def test_auto_backend_and_eps():
    args, _ = random_inputs("tiny", 2, 5, seed_of("eps"))
    out = bond_head(**args, edge_norm_eps=0.3, bond_norm_eps=0.7)
    ref = bond_head_reference(**args, edge_norm_eps=0.3, bond_norm_eps=0.7)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    assert (out - bond_head_reference(**args)).abs().max() > 1e-3  # the epsilons do reach the kernel


# ---- symmetry, padding, invariance ----


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("refine", [True, False])
def test_logits_are_exactly_symmetric(refine, dtype):
    args, _ = random_inputs("tiny", 3, 40, seed_of("symmetric", refine, str(dtype)), refine=refine)
    out = bond_head(**cast(args, dtype), backend="cpp")
    assert torch.equal(out, out.transpose(1, 2))


@pytest.mark.parametrize("refine", [True, False])
def test_padding_does_not_reach_real_pairs(refine):
    # Two inputs that differ only in the garbage of their padding atoms: identical logits on every real pair.
    seed = seed_of("padding", refine)
    first, mask = random_inputs("tiny", 4, 23, seed, refine=refine, garbage_seed=1)
    second, _ = random_inputs("tiny", 4, 23, seed, refine=refine, garbage_seed=2)
    real = mask[:, :, None] & mask[:, None, :]
    for dtype in (torch.float32, torch.float64):
        out_1 = bond_head(**cast(first, dtype), backend="cpp")
        out_2 = bond_head(**cast(second, dtype), backend="cpp")
        assert not torch.equal(out_1, out_2)  # the padding pairs did change
        torch.testing.assert_close(out_1[real], out_2[real], rtol=0, atol=0)


def random_rotation(generator):
    q, r = torch.linalg.qr(torch.randn(3, 3, generator=generator, dtype=torch.float64))
    q = q * torch.sign(torch.diagonal(r))
    return q if torch.det(q) > 0 else -q


def test_rotation_and_translation_invariance():
    # Raw coordinates, rotated and translated, then centred over the real atoms as BondRefine's CoordNorm does:
    # the logits see only distances and dot products of centred coordinates.
    args, mask = random_inputs("tiny", 3, 13, seed_of("rotation"))
    generator = torch.Generator().manual_seed(seed_of("rotation", "R"))
    raw = torch.randn(3, 13, 3, generator=generator, dtype=torch.float64) * 2
    R, t = random_rotation(generator), torch.randn(3, generator=generator, dtype=torch.float64) * 5

    def centred(coords):
        centre = (coords * mask[..., None]).sum(1, keepdim=True) / mask.sum(1)[:, None, None]
        return (coords - centre) * mask[..., None]

    logits = bond_head(**{**args, "coords": centred(raw)}, backend="cpp")
    moved = bond_head(**{**args, "coords": centred(raw @ R.T + t)}, backend="cpp")
    torch.testing.assert_close(moved, logits, rtol=1e-10, atol=1e-10)
    # The coordinates matter at all (the test would pass trivially otherwise).
    assert (bond_head(**{**args, "coords": centred(raw * 1.5)}, backend="cpp") - logits).abs().max() > 1e-3


# ---- the reference is the model's tail ----


def model_arguments(model, coords, node_feats, atom_mask, edge_feats):
    """bond_head's keyword arguments for a Semla generator's tail, from its modules' weights: the per-atom terms
    as GEMMs, BondRefine's normalised coordinates, and the split columns of its first linear."""
    dynamics = model.dynamics
    head1, head2 = model.edge_out_proj[0], model.edge_out_proj[2]
    args = dict(
        edge_feats=edge_feats,
        bond_norm_weight=dynamics.bond_norm.weight,
        bond_norm_bias=dynamics.bond_norm.bias,
        head_weight1=head1.weight,
        head_bias1=head1.bias,
        head_weight2=head2.weight,
        head_bias2=head2.bias,
        bond_norm_eps=dynamics.bond_norm.eps,
    )
    if dynamics.bond_refine:
        refine = dynamics.refine_layer
        first, second = refine.message_mlp[0], refine.message_mlp[2]
        M = refine.node_proj.out_features
        W_i, W_j, w_dist, w_dot, W_e = first.weight.split([M, M, 1, 1, first.in_features - 2 * M - 2], dim=1)
        m = refine.node_proj(refine.node_norm(node_feats))
        x = refine.coord_norm(coords.unsqueeze(1), atom_mask.unsqueeze(1)).squeeze(1)
        args.update(
            node_terms_i=F.linear(m, W_i, first.bias),
            node_terms_j=F.linear(m, W_j),
            coords=x,
            edge_norm_weight=refine.edge_norm.weight,
            edge_norm_bias=refine.edge_norm.bias,
            edge_weight=W_e,
            dist_weight=w_dist.squeeze(1),
            dot_weight=w_dot.squeeze(1),
            refine_weight=second.weight,
            refine_bias=second.bias,
            edge_norm_eps=refine.edge_norm.eps,
        )
    return args


@pytest.mark.parametrize("bond_refine", [True, False])
def test_reference_is_the_model_tail(bond_refine):
    model = Semla(SemlaConfig.preset("tiny", bond_refine=bond_refine)).double().eval()
    generator = torch.Generator().manual_seed(seed_of("model", bond_refine))
    with torch.no_grad():  # random LayerNorm and CoordNorm parameters, not the identity they start as
        for parameter in model.parameters():
            if parameter.dim() == 1 or parameter.shape == (1, 1, 1, 1):
                parameter.copy_(
                    parameter + 0.2 * torch.randn(parameter.shape, generator=generator, dtype=torch.float64)
                )
    B, N, config = 3, 9, model.config
    atom_mask = (torch.arange(N)[None, :] < torch.tensor([9, 6, 1])[:, None]).double()
    coords = torch.randn(B, N, 3, generator=generator, dtype=torch.float64) * atom_mask[..., None]
    node_feats = torch.randn(B, N, config.d_model, generator=generator, dtype=torch.float64)
    edge_feats = torch.randn(B, N, N, config.d_edge, generator=generator, dtype=torch.float64)

    with torch.no_grad():
        dynamics = model.dynamics
        edges = (
            dynamics.refine_layer(coords, node_feats, atom_mask, edge_feats) if bond_refine else edge_feats
        )
        pred_edges = dynamics.bond_norm(edges)
        expected = model.edge_out_proj(pred_edges + pred_edges.transpose(1, 2))
        args = model_arguments(model, coords, node_feats, atom_mask, edge_feats)
        reference = bond_head_reference(**args)
        cpp = bond_head(**args, backend="cpp")
    assert ("node_terms_i" in args) == bond_refine
    scale = expected.abs().max()
    assert (reference - expected).abs().max() <= 1e-12 * scale
    assert (cpp - expected).abs().max() <= 1e-12 * scale


# ---- op registration: opcheck and gradients ----


def cpp_op():
    assert _extension.load_extension(), _extension.extension_status()["reason"]
    op._cpp_op()  # fake and autograd registered
    return torch.ops.fastflow.bond_head.default


def positional(args, edge_norm_eps=1e-5, bond_norm_eps=1e-5):
    return (*(args.get(name) for name in ARGUMENTS), edge_norm_eps, bond_norm_eps)


@pytest.mark.parametrize("refine", [True, False])
def test_opcheck(refine):
    args, _ = random_inputs("odd", 2, 5, seed_of("opcheck", refine), refine=refine)
    for dtype in (torch.float32, torch.float64):
        torch.library.opcheck(cpp_op(), positional(cast(args, dtype)))


@pytest.mark.parametrize("refine", [True, False])
def test_gradcheck(refine):
    args, _ = random_inputs((4, 3, 4, 2), 2, 3, seed_of("gradcheck", refine), refine=refine)
    names = list(args)

    def function(*tensors):
        return bond_head(**dict(zip(names, tensors)), backend="cpp")

    inputs = [t.clone().requires_grad_() for t in args.values()]
    assert torch.autograd.gradcheck(function, inputs)


def test_gradients_match_reference():
    args, _ = random_inputs("odd", 2, 6, seed_of("gradients"))
    weight = torch.randn(
        2, 6, 6, 3, generator=torch.Generator().manual_seed(seed_of("upstream")), dtype=torch.float64
    )

    def gradients(function):
        inputs = {name: t.clone().requires_grad_() for name, t in args.items()}
        loss = (function(**inputs) * weight).sum()
        return torch.autograd.grad(loss, list(inputs.values()))

    cpp = gradients(lambda **inputs: bond_head(**inputs, backend="cpp"))
    reference = gradients(bond_head_reference)
    for name, g_cpp, g_ref in zip(args, cpp, reference):
        torch.testing.assert_close(
            g_cpp, g_ref, rtol=1e-10, atol=1e-10, msg=lambda m, name=name: f"{name}: {m}"
        )


def test_compile_and_export_see_one_op():
    args, _ = random_inputs("tiny", 2, 7, seed_of("compile"))
    expected = bond_head(**args, backend="cpp")  # eager first: loads the extension outside the trace
    compiled = torch.compile(
        lambda kwargs: bond_head(**kwargs, backend="cpp"), fullgraph=True, backend="aot_eager"
    )
    torch.testing.assert_close(compiled(args), expected, rtol=0, atol=0)

    class Head(torch.nn.Module):
        def forward(self, edge_feats, node_terms_i, node_terms_j, coords):
            return bond_head(
                **{
                    **args,
                    "edge_feats": edge_feats,
                    "node_terms_i": node_terms_i,
                    "node_terms_j": node_terms_j,
                    "coords": coords,
                },
                backend="cpp",
            )

    inputs = tuple(args[name] for name in ("edge_feats", "node_terms_i", "node_terms_j", "coords"))
    program = torch.export.export(Head(), inputs)
    assert program.graph_module.code.count("torch.ops.fastflow.bond_head.default") == 1
    torch.testing.assert_close(program.module()(*inputs), expected, rtol=0, atol=0)


def test_flops():
    # B N² ordered pairs × (2EF + 2F + 6) + B N(N+1)/2 unordered pairs × (EG + GK), 2 FLOPs per multiply-add.
    shapes = {name: tuple(t.shape) for name, t in random_inputs("odd", 2, 5, 0)[0].items()}
    E, F_, G, K = WIDTHS["odd"]
    expected = 2 * 2 * (25 * (2 * E * F_ + 2 * F_ + 6) + 15 * (E * G + G * K))
    assert bond_head_flops(*(shapes[name] for name in ARGUMENTS)) == expected
    no_refine = {name: shapes[name] for name in ARGUMENTS[:7]}
    assert bond_head_flops(*no_refine.values()) == 2 * 2 * 15 * (E * G + G * K)


# ---- input errors ----


@pytest.mark.parametrize(
    "name, replacement, error, message",
    [
        (
            "head_weight1",
            lambda t: t[:, :-1],
            ValueError,
            r"head_weight1 must have shape \[·, 16\], got shape \[16, 15\]",
        ),
        (
            "edge_feats",
            lambda t: t[:, :, :4],
            ValueError,
            r"edge_feats must have shape \[2, 5, 5, 16\], got shape "
            r"\[2, 5, 4, 16\]",
        ),
        (
            "coords",
            lambda t: t[..., :2],
            ValueError,
            r"coords must have shape \[2, 5, 3\], got shape \[2, 5, 2\]",
        ),
        (
            "dist_weight",
            lambda t: t.float(),
            TypeError,
            r"dist_weight has dtype torch.float32, expected torch.float64",
        ),
        (
            "refine_bias",
            lambda t: None,
            ValueError,
            r"given together or not at all .*missing \['refine_bias'\]",
        ),
        ("edge_feats", lambda t: t[:0], ValueError, r"empty batch"),
    ],
)
def test_bad_inputs_raise_clear_errors(name, replacement, error, message):
    args, _ = random_inputs("tiny", 2, 5, 0)
    args[name] = replacement(args[name])
    with pytest.raises(error, match=message):
        bond_head(**args, backend="cpp")


def test_bad_dtypes_and_backends():
    args, _ = random_inputs("tiny", 2, 5, 0)
    with pytest.raises(TypeError, match="tensors must be float32 or float64, got torch.float16"):
        bond_head(**cast(args, torch.float16), backend="cpp")
    with pytest.raises(ValueError, match="backend must be one of"):
        bond_head(**args, backend="cuda")


@pytest.mark.parametrize(
    "name, replacement, message",
    [
        ("head_weight2", lambda t: t[:, :3], r"head_weight2 must have shape \[\*, 16\], got \[5, 3\]"),
        (
            "edge_feats",
            lambda t: t[:, :4],
            r"edge_feats must have shape \[2, 4, 4, 16\], got \[2, 4, 5, 16\]",
        ),
        ("node_terms_j", lambda t: t.float(), r"node_terms_j must have dtype Double, got Float"),
        ("edge_weight", lambda t: None, r"given together or not at all"),
        ("edge_feats", lambda t: t[:0], r"empty batch"),
        ("coords", lambda t: t.to("meta"), r"coords"),
    ],
)
def test_cpp_kernel_checks(name, replacement, message):
    # The C++ checks (and, for a meta input, the fake kernel's), for direct calls of torch.ops.fastflow.bond_head.
    args, _ = random_inputs("tiny", 2, 5, 0)
    args[name] = replacement(args[name])
    with pytest.raises((RuntimeError, ValueError), match=message):
        cpp_op()(*positional(args))
