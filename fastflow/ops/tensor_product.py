"""fastflow::tensor_product and fastflow::tp_conv: e3nn-compatible equivariant tensor products.

A tensor product is a sum of paths. Path p couples irrep block 1 (mul1 copies of an irrep of dimension d1, at
x1[:, off1 : off1 + mul1·d1], e3nn's ``mul_ir`` layout u·d1 + i) with block 2 (mul2 × d2 at off2) into an output
block (mul_out × d_out at off_out) through Clebsch–Gordan entries C_p[i, j, k] (path weight folded in):

    uvw:  out[w, k] += Σ_{u,v} W[u, v, w] Σ_{i,j} C[i, j, k] x1[u, i] x2[v, j]     W: mul1·mul2·mul_out
    uvu:  out[u, k] += Σ_v     W[u, v]    Σ_{i,j} C[i, j, k] x1[u, i] x2[v, j]     W: mul1·mul2
    uvv:  out[v, k] += Σ_u     W[u, v]    Σ_{i,j} C[i, j, k] x1[u, i] x2[v, j]     W: mul1·mul2
    uuw:  out[w, k] += Σ_u     W[u, w]    Σ_{i,j} C[i, j, k] x1[u, i] x2[u, j]     W: mul1·mul_out
    uuu:  out[u, k] +=         W[u]       Σ_{i,j} C[i, j, k] x1[u, i] x2[u, j]     W: mul1

W is the path's slice weights[..., w_off : w_off + size] in row-major order of the indices shown (e3nn's weight
order); a path without weights uses W = 1. Weights are shared ([n_weights]) or one row per sample ([Z, n_weights]).

The descriptor reaches kernels as tensors (built from an e3nn module by fastflow.tp.descriptor):
    paths       int64 [P, 12]: mode, off1, mul1, d1, off2, mul2, d2, off_out, mul_out, d_out, w_off, has_weight
    cg_index    int64 [C, 3]: (i, j, k) of each nonzero CG entry, paths' entries contiguous
    cg_value    [C], dtype of x1: the entry times the path weight
    cg_offsets  int64 [P + 1]: path p owns entries cg_offsets[p] : cg_offsets[p + 1]

tp_conv(node_feats, edge_attrs, weights, edge_src, edge_dst, n_nodes) = Σ over edges e with edge_dst[e] = n of
tensor_product(node_feats[edge_src[e]], edge_attrs[e], weights[e]) — gather, product, scatter-sum, without the
[E, dim_out] intermediate in the fused kernels.

Implementations (fastflow.ops.backends picks one; `auto` also falls back to the reference, with one warning, when
the loaded fastflow._C or fastflow.triton_kernels lacks these ops):
    reference  tensor_product_reference / tp_conv_reference below
    cpp        torch.ops.fastflow.tensor_product / tp_conv (+ *_backward)
               schemas in csrc/registration.cpp, kernels in csrc/tensor_product.cpp
    triton     torch.ops.fastflow.tensor_product_triton / tp_conv_triton (+ *_backward_triton)
               kernels in triton_kernels/tensor_product.py: tensor_product(x1, x2, weights, paths, cg_index,
               cg_value, cg_offsets, dim_out) and tp_conv(node_feats, edge_attrs, weights, edge_src, edge_dst,
               n_nodes, paths, cg_index, cg_value, cg_offsets, dim_out); optionally tensor_product_backward and
               tp_conv_backward with the C++ schemas' arguments (else the backward is the reference's VJP)

precision "fp32" (default); "tf32" / "bf16" (float32 tensors, Triton only): the weight step of each weighted uvw
path with shared weights, Σ_(u,v) t[z, (u, v)] W[(u, v), w], as tensor-core products (TF32, or bf16 operands with
float32 accumulation); everything else, and the backward, in float32. The C++ kernels have no such variant (a
request for one raises).

Autograd: the first backward runs the fused *_backward kernel (gradients of both inputs and the weights; where a
backend has none, the reference's backward wrapped as an op); a backward that itself builds a graph
(create_graph=True: forces, double backward) runs the reference's backward written out in einsums, itself
differentiable, so higher derivatives are exact. Edge indices are int64; an empty edge set gives zeros.
"""

from __future__ import annotations

import importlib
import math
from typing import NamedTuple

import torch

from fastflow.memo import TensorMemo, readable
from fastflow.ops.backends import (
    FLOAT_DTYPES,
    OpFamily,
    bind_cpp_ops,
    check_triton_precision,
    register_cpp_op,
)
from fastflow.tp.descriptor import MODES  # index = the mode code in paths[:, 0]

PATH_COLUMNS = (
    "mode",
    "off1",
    "mul1",
    "d1",
    "off2",
    "mul2",
    "d2",
    "off_out",
    "mul_out",
    "d_out",
    "w_off",
    "has_weight",
)
WEIGHT_INDICES = {"uvw": "uvw", "uvu": "uv", "uvv": "uv", "uuw": "uw", "uuu": "u"}


def tensor_product(
    x1,
    x2,
    weights,
    paths,
    cg_index,
    cg_value,
    cg_offsets,
    dim_out: int,
    backend: str | None = None,
    precision: str = "fp32",
):
    """Batched tensor product ``out[z] = TP(x1[z], x2[z]; W)`` (see the module docstring for the math).

    Arguments (Z samples; descriptor tensors from ``TPDescriptor.tensors(dtype, device)``):
        x1 ``[Z, dim_in1]``, x2 ``[Z, dim_in2]``: float32 or float64, same dtype and device.
        weights: ``[n_weights]`` shared, or ``[Z, n_weights]`` one row per sample (``[0]`` without weighted paths).
        paths, cg_index, cg_value, cg_offsets: the descriptor; dim_out: the output width.
        backend: "auto" (default), "cpp", "triton" or "reference".
        precision: "fp32" (default), or "tf32" / "bf16" (float32 inputs, Triton only): see the module docstring.
    Return:
        ``[Z, dim_out]``, dtype of x1.
    """
    args = (x1, x2, weights, paths, cg_index, cg_value, cg_offsets)
    check_inputs(*args, int(dim_out))
    chosen = _resolve(backend, x1.device)
    check_triton_precision("tensor_product", precision, x1.dtype, chosen)
    if chosen == "cpp":
        return _cpp_ops().tensor_product.default(*_contiguous(args), int(dim_out))
    if chosen == "triton":
        return tensor_product_triton(*_contiguous(args), int(dim_out), precision)
    return tensor_product_reference(*args, int(dim_out))


def tp_conv(
    node_feats,
    edge_attrs,
    weights,
    edge_src,
    edge_dst,
    n_nodes: int,
    paths,
    cg_index,
    cg_value,
    cg_offsets,
    dim_out: int,
    backend: str | None = None,
    precision: str = "fp32",
):
    """Fused gather–tensor product–scatter: ``out[n] = Σ_{e: edge_dst[e] = n} TP(node_feats[edge_src[e]],
    edge_attrs[e]; W_e)``, without the ``[E, dim_out]`` messages in the fused kernels.

    Arguments (N nodes, E edges):
        node_feats ``[N, dim_in1]``, edge_attrs ``[E, dim_in2]``: float32 or float64, same dtype and device.
        weights: ``[n_weights]`` shared, or ``[E, n_weights]`` per edge.
        edge_src, edge_dst ``[E]`` int64: indices into node_feats and into the output (any order, duplicates
            allowed; E = 0 gives zeros).
        n_nodes: rows of the output; paths, cg_index, cg_value, cg_offsets, dim_out: the descriptor.
        backend: "auto" (default), "cpp", "triton" or "reference".
        precision: as tensor_product's.
    Return:
        ``[n_nodes, dim_out]``, dtype of node_feats.
    """
    args = (node_feats, edge_attrs, weights, edge_src, edge_dst)
    descriptor = (paths, cg_index, cg_value, cg_offsets)
    check_conv_inputs(*args, int(n_nodes), *descriptor, int(dim_out))
    chosen = _resolve(backend, node_feats.device)
    check_triton_precision("tp_conv", precision, node_feats.dtype, chosen)
    if chosen == "cpp":
        return _cpp_ops().tp_conv.default(
            *_contiguous(args), int(n_nodes), *_contiguous(descriptor), int(dim_out)
        )
    if chosen == "triton":
        return tp_conv_triton(
            *_contiguous(args), int(n_nodes), *_contiguous(descriptor), int(dim_out), precision
        )
    return tp_conv_reference(*args, int(n_nodes), *descriptor, int(dim_out))


def tensor_product_reference(x1, x2, weights, paths, cg_index, cg_value, cg_offsets, dim_out: int):
    """The definition, path by path with dense CG blocks and einsum (autograd and double backward included)."""
    out = x1.new_zeros(x1.shape[0], dim_out)
    for path in _dense_paths(x1, x2, weights, paths, cg_index, cg_value, cg_offsets):
        t, s, w = path.indices
        result = torch.einsum(f"zui,z{s}j,ijk,{w}->z{t}k", path.a, path.b, path.C, path.W)
        out[:, path.cols_out] += result.flatten(1)
    return out


def tp_conv_reference(
    node_feats,
    edge_attrs,
    weights,
    edge_src,
    edge_dst,
    n_nodes: int,
    paths,
    cg_index,
    cg_value,
    cg_offsets,
    dim_out: int,
):
    """Gather by edge source, tensor product per edge, scatter-sum to edge destinations."""
    messages = tensor_product_reference(
        node_feats[edge_src], edge_attrs, weights, paths, cg_index, cg_value, cg_offsets, dim_out
    )
    return node_feats.new_zeros(n_nodes, dim_out).index_add(0, edge_dst, messages)


class _DensePath(NamedTuple):
    """One path as the dense operands of the reference's einsums (forward and backward)."""

    cols1: slice  # the columns of x1, x2 and the output the path reads or writes
    cols2: slice
    cols_out: slice
    cols_w: slice | None  # its columns of the weights; None without weights
    a: torch.Tensor  # x1's block [Z, mul1, d1]
    b: torch.Tensor  # x2's block [Z, mul2, d2]
    C: torch.Tensor  # its CG entries as a dense [d1, d2, d_out] block
    W: torch.Tensor  # its weights [(Z,) *_weight_shape]; ones without weights
    out_shape: tuple[int, int]  # (mul_out, d_out)
    # einsum letters (t, s, w) of the output's multiplicity (w, u or v), of x2's (v, or u in the uu* modes) and of
    # the weights (WEIGHT_INDICES[mode], after z for one row per sample)
    indices: tuple[str, str, str]


def _weight_shape(mode: str, mul1: int, mul2: int, mul_out: int) -> list[int]:
    """The shape of a path's weights, in e3nn's order of the mode's indices (WEIGHT_INDICES)."""
    return [{"u": mul1, "v": mul2, "w": mul_out}[c] for c in WEIGHT_INDICES[mode]]


def _dense_paths(x1, x2, weights, paths, cg_index, cg_value, cg_offsets):
    """Yield a _DensePath per path of the descriptor."""
    Z = x1.shape[0]
    shared = weights.dim() == 1
    for p, (mode, off1, mul1, d1, off2, mul2, d2, off_out, mul_out, d_out, w_off, has_weight) in enumerate(
        paths.tolist()
    ):
        mode = MODES[mode]
        cols1, cols2 = slice(off1, off1 + mul1 * d1), slice(off2, off2 + mul2 * d2)
        start, stop = cg_offsets[p].item(), cg_offsets[p + 1].item()
        C = x1.new_zeros(d1, d2, d_out).index_put(
            tuple(cg_index[start:stop].T), cg_value[start:stop], accumulate=True
        )
        w_shape = _weight_shape(mode, mul1, mul2, mul_out)
        if has_weight:
            cols_w = slice(w_off, w_off + math.prod(w_shape))
            W = weights[..., cols_w].reshape(*weights.shape[:-1], *w_shape)
        else:
            cols_w, W = None, x1.new_ones(w_shape)
        z = "" if shared or not has_weight else "z"
        target = {"uvw": "w", "uvu": "u", "uvv": "v", "uuw": "w", "uuu": "u"}[mode]
        second = "v" if mode in ("uvw", "uvu", "uvv") else "u"
        yield _DensePath(
            cols1,
            cols2,
            slice(off_out, off_out + mul_out * d_out),
            cols_w,
            x1[:, cols1].reshape(Z, mul1, d1),
            x2[:, cols2].reshape(Z, mul2, d2),
            C,
            W,
            (mul_out, d_out),
            (target, second, z + WEIGHT_INDICES[mode]),
        )


# ---- argument checks ----


def check_descriptor(paths, cg_index, cg_value, cg_offsets, dtype, device, op: str = "tensor_product"):
    """The descriptor tensors' shapes, dtypes and devices (values are checked where cheap: see check_inputs)."""
    for name, tensor, ndim in (
        ("paths", paths, 2),
        ("cg_index", cg_index, 2),
        ("cg_value", cg_value, 1),
        ("cg_offsets", cg_offsets, 1),
    ):
        if not torch.is_tensor(tensor) or tensor.dim() != ndim:
            got = f"shape {list(tensor.shape)}" if torch.is_tensor(tensor) else type(tensor).__name__
            raise ValueError(f"{op}: {name} must be a {ndim}-d tensor, got {got}")
        if tensor.device != device:
            raise ValueError(f"{op}: {name} is on {tensor.device}, expected {device} like the inputs")
        expected = dtype if name == "cg_value" else torch.int64
        if tensor.dtype != expected:
            raise TypeError(f"{op}: {name} must have dtype {expected}, got {tensor.dtype}")
    P, C = paths.size(0), cg_index.size(0)
    if paths.size(1) != len(PATH_COLUMNS):
        raise ValueError(
            f"{op}: paths must have shape [P, {len(PATH_COLUMNS)}] ({', '.join(PATH_COLUMNS)}), "
            f"got {list(paths.shape)}"
        )
    if cg_index.size(1) != 3 or cg_value.size(0) != C or cg_offsets.size(0) != P + 1:
        raise ValueError(
            f"{op}: cg_index [C, 3], cg_value [C] and cg_offsets [P + 1] disagree: "
            f"{list(cg_index.shape)}, {list(cg_value.shape)}, {list(cg_offsets.shape)} with P = {P}"
        )


_EXTENTS = TensorMemo()  # modules pass the same paths buffer every call


def _extents(paths) -> tuple[int, int, int, int]:
    """Widths the paths read or write: (x1, x2, out, weights); CPU descriptors only (no device sync). Computed
    once per paths tensor (and again if it is modified in place), not per call."""
    if paths.device.type != "cpu" or paths.numel() == 0 or not readable(paths):
        return 0, 0, 0, 0
    return _EXTENTS.get((paths,), lambda: _widths(paths))


def _widths(paths) -> tuple[int, int, int, int]:
    widths = [0, 0, 0, 0]
    for mode, off1, mul1, d1, off2, mul2, d2, off_out, mul_out, d_out, w_off, has_weight in paths.tolist():
        widths[0] = max(widths[0], off1 + mul1 * d1)
        widths[1] = max(widths[1], off2 + mul2 * d2)
        widths[2] = max(widths[2], off_out + mul_out * d_out)
        if has_weight:
            widths[3] = max(widths[3], w_off + math.prod(_weight_shape(MODES[mode], mul1, mul2, mul_out)))
    return tuple(widths)


def _check_features(op, pairs, weights, rows, row_name):
    """pairs: ((name, tensor, expected rows or None), ...) of the two float inputs, both 2-d."""
    first = pairs[0][1]
    dtype, device = first.dtype, first.device
    if dtype not in FLOAT_DTYPES:
        raise TypeError(f"{op}: tensors must be float32 or float64, got {dtype}")
    for name, tensor, expected_rows in pairs + (("weights", weights, None),):
        if not torch.is_tensor(tensor):
            raise TypeError(f"{op}: {name} must be a tensor, got {type(tensor).__name__}")
        if tensor.dtype != dtype:
            raise TypeError(f"{op}: {name} has dtype {tensor.dtype}, expected {dtype} like {pairs[0][0]}")
        if tensor.device != device:
            raise ValueError(f"{op}: {name} is on {tensor.device}, expected {device} like {pairs[0][0]}")
        if expected_rows is not None and tensor.size(0) != expected_rows:
            raise ValueError(
                f"{op}: {name} must have {expected_rows} rows (one per {row_name}), got shape "
                f"{list(tensor.shape)}"
            )
    if weights.dim() not in (1, 2) or (weights.dim() == 2 and weights.size(0) != rows):
        raise ValueError(
            f"{op}: weights must be [n_weights] (shared) or [{rows}, n_weights] (one row per "
            f"{row_name}), got shape {list(weights.shape)}"
        )


def _check_extents(op, pairs, weights, paths, dim_out):
    if dim_out < 0:
        raise ValueError(f"{op}: dim_out must be >= 0, got {dim_out}")
    width1, width2, width_out, width_w = _extents(paths)
    for name, tensor, width in (
        (pairs[0][0], pairs[0][1], width1),
        (pairs[1][0], pairs[1][1], width2),
        ("weights", weights, width_w),
    ):
        if tensor.size(-1) < width:
            raise ValueError(
                f"{op}: the descriptor's paths read {width} features of {name}, which has "
                f"{tensor.size(-1)} (shape {list(tensor.shape)}): irreps mismatch"
            )
    if dim_out < width_out:
        raise ValueError(
            f"{op}: the descriptor's paths write {width_out} output features, but dim_out = {dim_out}"
        )


def check_inputs(x1, x2, weights, paths, cg_index, cg_value, cg_offsets, dim_out: int) -> None:
    """Raise with a message naming the argument, the expectation and what arrived (tensor_product)."""
    op = "tensor_product"
    for name, tensor in (("x1", x1), ("x2", x2)):
        if not torch.is_tensor(tensor) or tensor.dim() != 2:
            _fail_2d(op, name, tensor)
    pairs = (("x1", x1, None), ("x2", x2, x1.size(0)))
    _check_features(op, pairs, weights, x1.size(0), "sample")
    check_descriptor(paths, cg_index, cg_value, cg_offsets, x1.dtype, x1.device, op)
    _check_extents(op, pairs, weights, paths, dim_out)


def check_conv_inputs(
    node_feats,
    edge_attrs,
    weights,
    edge_src,
    edge_dst,
    n_nodes: int,
    paths,
    cg_index,
    cg_value,
    cg_offsets,
    dim_out: int,
) -> None:
    """Raise with a message naming the argument, the expectation and what arrived (tp_conv). Edge indices are
    checked against the node counts (one reduction each; skipped while compiling)."""
    op = "tp_conv"
    for name, tensor in (("node_feats", node_feats), ("edge_attrs", edge_attrs)):
        if not torch.is_tensor(tensor) or tensor.dim() != 2:
            _fail_2d(op, name, tensor)
    E = edge_src.size(0) if torch.is_tensor(edge_src) and edge_src.dim() == 1 else edge_attrs.size(0)
    pairs = (("node_feats", node_feats, None), ("edge_attrs", edge_attrs, E))
    _check_features(op, pairs, weights, E, "edge")
    check_descriptor(paths, cg_index, cg_value, cg_offsets, node_feats.dtype, node_feats.device, op)
    _check_extents(op, pairs, weights, paths, dim_out)
    if n_nodes < 0:
        raise ValueError(f"{op}: n_nodes must be >= 0, got {n_nodes}")
    for name, index, bound, bound_name in (
        ("edge_src", edge_src, node_feats.size(0), "node_feats rows"),
        ("edge_dst", edge_dst, n_nodes, "n_nodes"),
    ):
        if not torch.is_tensor(index) or index.dim() != 1 or index.size(0) != E:
            got = f"shape {list(index.shape)}" if torch.is_tensor(index) else type(index).__name__
            raise ValueError(f"{op}: {name} must have shape [{E}] (one index per edge), got {got}")
        if index.dtype != torch.int64:
            raise TypeError(f"{op}: {name} must be int64, got {index.dtype}")
        if index.device != node_feats.device:
            raise ValueError(
                f"{op}: {name} is on {index.device}, expected {node_feats.device} like node_feats"
            )
        if E and readable(index):
            low, high = (int(v) for v in torch.aminmax(index))
            if low < 0 or high >= bound:
                raise IndexError(
                    f"{op}: {name} holds indices in [{low}, {high}], outside [0, {bound}) "
                    f"({bound_name} = {bound})"
                )


def check_grad(op, grad_out, rows: int | None, like: torch.Tensor) -> None:
    """The incoming gradient of a backward op: ``[rows, dim_out]`` (any rows for None), dtype and device of the
    forward's input."""
    if not torch.is_tensor(grad_out) or grad_out.dim() != 2 or rows not in (None, grad_out.size(0)):
        got = f"shape {list(grad_out.shape)}" if torch.is_tensor(grad_out) else type(grad_out).__name__
        raise ValueError(
            f"{op}: grad_out must have shape [{'n_nodes' if rows is None else rows}, dim_out], got {got}"
        )
    if torch.is_tensor(like) and (grad_out.dtype != like.dtype or grad_out.device != like.device):
        raise TypeError(
            f"{op}: grad_out is {grad_out.dtype} on {grad_out.device}, expected {like.dtype} on "
            f"{like.device} like the inputs"
        )


def _fail_2d(op, name, tensor):
    got = f"shape {list(tensor.shape)}" if torch.is_tensor(tensor) else type(tensor).__name__
    raise ValueError(f"{op}: {name} must be 2-d [rows, features], got {got}")


def _contiguous(tensors):
    return tuple(t.contiguous() for t in tensors)


# ---- backend availability for these ops ----

_FAMILY = OpFamily(
    "tensor products",
    ("tensor_product", "tp_conv"),
    "csrc/tensor_product.cpp",
    "fastflow.triton_kernels.tensor_product",
)
cpp_unavailable_reason = _FAMILY.cpp_unavailable_reason
triton_unavailable_reason = _FAMILY.triton_unavailable_reason
_resolve = _FAMILY.resolve


# ---- fake (meta) kernels: output shapes for torch.compile / torch.export ----


# The checks run here too: a meta or fake input sends even the C++ ops here instead of to their kernels.


def _tensor_product_fake(x1, x2, weights, paths, cg_index, cg_value, cg_offsets, dim_out, precision="fp32"):
    check_inputs(x1, x2, weights, paths, cg_index, cg_value, cg_offsets, dim_out)
    return x1.new_empty(x1.size(0), dim_out)


def _tensor_product_backward_fake(grad_out, x1, x2, weights, paths, cg_index, cg_value, cg_offsets):
    _check_tensor_product_backward(grad_out, x1, x2, weights, paths, cg_index, cg_value, cg_offsets)
    return torch.empty_like(x1), torch.empty_like(x2), torch.empty_like(weights)


def _tp_conv_fake(
    node_feats,
    edge_attrs,
    weights,
    edge_src,
    edge_dst,
    n_nodes,
    paths,
    cg_index,
    cg_value,
    cg_offsets,
    dim_out,
    precision="fp32",
):
    check_conv_inputs(
        node_feats,
        edge_attrs,
        weights,
        edge_src,
        edge_dst,
        n_nodes,
        paths,
        cg_index,
        cg_value,
        cg_offsets,
        dim_out,
    )
    return node_feats.new_empty(n_nodes, dim_out)


def _tp_conv_backward_fake(
    grad_out, node_feats, edge_attrs, weights, edge_src, edge_dst, paths, cg_index, cg_value, cg_offsets
):
    _check_tp_conv_backward(
        grad_out, node_feats, edge_attrs, weights, edge_src, edge_dst, paths, cg_index, cg_value, cg_offsets
    )
    return torch.empty_like(node_feats), torch.empty_like(edge_attrs), torch.empty_like(weights)


def _check_tensor_product_backward(grad_out, x1, x2, weights, paths, cg_index, cg_value, cg_offsets):
    check_grad("tensor_product_backward", grad_out, x1.size(0) if torch.is_tensor(x1) else None, x1)
    check_inputs(x1, x2, weights, paths, cg_index, cg_value, cg_offsets, grad_out.size(1))


def _check_tp_conv_backward(
    grad_out, node_feats, edge_attrs, weights, edge_src, edge_dst, paths, cg_index, cg_value, cg_offsets
):
    check_grad("tp_conv_backward", grad_out, None, node_feats)
    check_conv_inputs(
        node_feats,
        edge_attrs,
        weights,
        edge_src,
        edge_dst,
        grad_out.size(0),
        paths,
        cg_index,
        cg_value,
        cg_offsets,
        grad_out.size(1),
    )


# ---- autograd: fused backward kernel, or the reference's VJP when the backward builds a graph ----


def tensor_product_grads_reference(grad_out, x1, x2, weights, paths, cg_index, cg_value, cg_offsets):
    """Gradients of sum(grad_out * tensor_product) wrt (x1, x2, weights), path by path with einsum: the reference's
    backward written out, so it runs without autograd (inside an op) and is differentiable itself (create_graph)."""
    Z = x1.shape[0]
    grad_x1, grad_x2, grad_w = torch.zeros_like(x1), torch.zeros_like(x2), torch.zeros_like(weights)
    for path in _dense_paths(x1, x2, weights, paths, cg_index, cg_value, cg_offsets):
        t, s, w = path.indices
        a, b, C, W = path.a, path.b, path.C, path.W
        g = grad_out[:, path.cols_out].reshape(Z, *path.out_shape)
        grad_x1[:, path.cols1] += torch.einsum(f"z{t}k,z{s}j,ijk,{w}->zui", g, b, C, W).flatten(1)
        grad_x2[:, path.cols2] += torch.einsum(f"z{t}k,zui,ijk,{w}->z{s}j", g, a, C, W).flatten(1)
        if path.cols_w is not None:
            grad = torch.einsum(f"z{t}k,zui,z{s}j,ijk->{w}", g, a, b, C)  # [(Z,) *weight shape]
            grad_w[..., path.cols_w] += grad.flatten(weights.dim() - 1)
    return grad_x1, grad_x2, grad_w


def tp_conv_grads_reference(
    grad_out, node_feats, edge_attrs, weights, edge_src, edge_dst, paths, cg_index, cg_value, cg_offsets
):
    """Gradients of sum(grad_out * tp_conv) wrt (node_feats, edge_attrs, weights), like the above."""
    grad_x1, grad_edge_attrs, grad_w = tensor_product_grads_reference(
        grad_out[edge_dst], node_feats[edge_src], edge_attrs, weights, paths, cg_index, cg_value, cg_offsets
    )
    return torch.zeros_like(node_feats).index_add(0, edge_src, grad_x1), grad_edge_attrs, grad_w


def _tp_setup_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs[:7])


def _conv_setup_context(ctx, inputs, output):
    node_feats, edge_attrs, weights, edge_src, edge_dst, _, paths, cg_index, cg_value, cg_offsets = inputs[
        :10
    ]
    ctx.save_for_backward(
        node_feats, edge_attrs, weights, edge_src, edge_dst, paths, cg_index, cg_value, cg_offsets
    )


def _make_backward(fused, reference, n_inputs: int, n_float: int = 3):
    """Autograd formula: ``fused(grad, *saved)`` normally, ``reference(grad, *saved)`` under create_graph."""

    def backward(ctx, grad):
        saved = ctx.saved_tensors
        grad = grad.contiguous()
        if torch.is_grad_enabled():  # create_graph=True: keep the graph, through the reference
            grads = reference(grad, *saved)
        else:
            grads = fused()(grad, *saved)
        needs = ctx.needs_input_grad
        return tuple(g if needs[i] else None for i, g in enumerate(grads)) + (None,) * (n_inputs - n_float)

    return backward


# The reference VJP as ops of their own (first-order backward of backends without a backward kernel): opaque to
# torch.compile / AOT tracing, which cannot run the reference's data-dependent loop over paths on fake tensors.
@torch.library.custom_op("fastflow::tensor_product_backward_reference", mutates_args=())
def tensor_product_backward_reference(
    grad_out: torch.Tensor,
    x1: torch.Tensor,
    x2: torch.Tensor,
    weights: torch.Tensor,
    paths: torch.Tensor,
    cg_index: torch.Tensor,
    cg_value: torch.Tensor,
    cg_offsets: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return tensor_product_grads_reference(grad_out, x1, x2, weights, paths, cg_index, cg_value, cg_offsets)


@torch.library.custom_op("fastflow::tp_conv_backward_reference", mutates_args=())
def tp_conv_backward_reference(
    grad_out: torch.Tensor,
    node_feats: torch.Tensor,
    edge_attrs: torch.Tensor,
    weights: torch.Tensor,
    edge_src: torch.Tensor,
    edge_dst: torch.Tensor,
    paths: torch.Tensor,
    cg_index: torch.Tensor,
    cg_value: torch.Tensor,
    cg_offsets: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return tp_conv_grads_reference(
        grad_out, node_feats, edge_attrs, weights, edge_src, edge_dst, paths, cg_index, cg_value, cg_offsets
    )


tensor_product_backward_reference.register_fake(_tensor_product_backward_fake)
tp_conv_backward_reference.register_fake(_tp_conv_backward_fake)
_REFERENCE_BACKWARD = {
    "tensor_product": tensor_product_backward_reference,
    "tp_conv": tp_conv_backward_reference,
}


def _cpp_backward(name):
    def get():
        if torch._C._dispatch_has_kernel_for_dispatch_key(f"fastflow::{name}_backward", "CPU"):
            return getattr(torch.ops.fastflow, f"{name}_backward").default
        return _REFERENCE_BACKWARD[name]

    return get


def _cpp_ops():
    """torch.ops.fastflow, with the fake kernels and autograd of these ops registered (schemas in C++)."""
    _FAMILY.require_cpp()
    _bind_cpp_ops()
    return torch.ops.fastflow


def _bind_cpp_ops():
    """Register the fake kernels and autograd of the C++ ops, where fastflow._C has them (an older build may not)."""
    if not hasattr(torch.ops.fastflow, "tp_conv"):
        return
    register_cpp_op(
        "tensor_product",
        _tensor_product_fake,
        _make_backward(_cpp_backward("tensor_product"), tensor_product_grads_reference, 8),
        _tp_setup_context,
    )
    register_cpp_op("tensor_product_backward", _tensor_product_backward_fake)
    register_cpp_op(
        "tp_conv",
        _tp_conv_fake,
        _make_backward(_cpp_backward("tp_conv"), tp_conv_grads_reference, 11),
        _conv_setup_context,
    )
    register_cpp_op("tp_conv_backward", _tp_conv_backward_fake)


bind_cpp_ops(_bind_cpp_ops)


# ---- Triton: custom ops around fastflow.triton_kernels.tensor_product (imported lazily) ----
# custom_op, not triton_op: see cache_forecast.py.


def _triton_kernels():
    return importlib.import_module(
        "fastflow.triton_kernels.tensor_product"
    )  # lazy: fastflow never needs triton


@torch.library.custom_op("fastflow::tensor_product_triton", mutates_args=())
def tensor_product_triton(
    x1: torch.Tensor,
    x2: torch.Tensor,
    weights: torch.Tensor,
    paths: torch.Tensor,
    cg_index: torch.Tensor,
    cg_value: torch.Tensor,
    cg_offsets: torch.Tensor,
    dim_out: int,
    precision: str = "fp32",
) -> torch.Tensor:
    # Every Triton op checks before launching: a kernel launched on wrong shapes reads out of bounds.
    check_inputs(x1, x2, weights, paths, cg_index, cg_value, cg_offsets, dim_out)
    check_triton_precision("tensor_product", precision, x1.dtype, "triton")
    return _triton_kernels().tensor_product(
        x1, x2, weights, paths, cg_index, cg_value, cg_offsets, dim_out, precision=precision
    )


@torch.library.custom_op("fastflow::tensor_product_backward_triton", mutates_args=())
def tensor_product_backward_triton(
    grad_out: torch.Tensor,
    x1: torch.Tensor,
    x2: torch.Tensor,
    weights: torch.Tensor,
    paths: torch.Tensor,
    cg_index: torch.Tensor,
    cg_value: torch.Tensor,
    cg_offsets: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    _check_tensor_product_backward(grad_out, x1, x2, weights, paths, cg_index, cg_value, cg_offsets)
    return tuple(
        _triton_kernels().tensor_product_backward(
            grad_out, x1, x2, weights, paths, cg_index, cg_value, cg_offsets
        )
    )


@torch.library.custom_op("fastflow::tp_conv_triton", mutates_args=())
def tp_conv_triton(
    node_feats: torch.Tensor,
    edge_attrs: torch.Tensor,
    weights: torch.Tensor,
    edge_src: torch.Tensor,
    edge_dst: torch.Tensor,
    n_nodes: int,
    paths: torch.Tensor,
    cg_index: torch.Tensor,
    cg_value: torch.Tensor,
    cg_offsets: torch.Tensor,
    dim_out: int,
    precision: str = "fp32",
) -> torch.Tensor:
    check_conv_inputs(
        node_feats,
        edge_attrs,
        weights,
        edge_src,
        edge_dst,
        n_nodes,
        paths,
        cg_index,
        cg_value,
        cg_offsets,
        dim_out,
    )
    check_triton_precision("tp_conv", precision, node_feats.dtype, "triton")
    return _triton_kernels().tp_conv(
        node_feats,
        edge_attrs,
        weights,
        edge_src,
        edge_dst,
        n_nodes,
        paths,
        cg_index,
        cg_value,
        cg_offsets,
        dim_out,
        precision=precision,
    )


@torch.library.custom_op("fastflow::tp_conv_backward_triton", mutates_args=())
def tp_conv_backward_triton(
    grad_out: torch.Tensor,
    node_feats: torch.Tensor,
    edge_attrs: torch.Tensor,
    weights: torch.Tensor,
    edge_src: torch.Tensor,
    edge_dst: torch.Tensor,
    paths: torch.Tensor,
    cg_index: torch.Tensor,
    cg_value: torch.Tensor,
    cg_offsets: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    _check_tp_conv_backward(
        grad_out, node_feats, edge_attrs, weights, edge_src, edge_dst, paths, cg_index, cg_value, cg_offsets
    )
    return tuple(
        _triton_kernels().tp_conv_backward(
            grad_out,
            node_feats,
            edge_attrs,
            weights,
            edge_src,
            edge_dst,
            paths,
            cg_index,
            cg_value,
            cg_offsets,
        )
    )


def _triton_backward(name):
    def get():
        if hasattr(_triton_kernels(), f"{name}_backward"):
            return {"tensor_product": tensor_product_backward_triton, "tp_conv": tp_conv_backward_triton}[
                name
            ]
        return _REFERENCE_BACKWARD[name]

    return get


tensor_product_triton.register_fake(_tensor_product_fake)
tensor_product_backward_triton.register_fake(_tensor_product_backward_fake)
tp_conv_triton.register_fake(_tp_conv_fake)
tp_conv_backward_triton.register_fake(_tp_conv_backward_fake)
tensor_product_triton.register_autograd(
    _make_backward(_triton_backward("tensor_product"), tensor_product_grads_reference, 9),
    setup_context=_tp_setup_context,
)
tp_conv_triton.register_autograd(
    _make_backward(_triton_backward("tp_conv"), tp_conv_grads_reference, 12),
    setup_context=_conv_setup_context,
)
