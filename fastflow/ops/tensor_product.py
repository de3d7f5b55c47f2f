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
"""

from __future__ import annotations

import torch

MODES = ("uvw", "uvu", "uvv", "uuw", "uuu")  # index = the mode code in paths[:, 0]
PATH_COLUMNS = ("mode", "off1", "mul1", "d1", "off2", "mul2", "d2", "off_out", "mul_out", "d_out", "w_off",
                "has_weight")
WEIGHT_INDICES = {"uvw": "uvw", "uvu": "uv", "uvv": "uv", "uuw": "uw", "uuu": "u"}


def tensor_product_reference(x1, x2, weights, paths, cg_index, cg_value, cg_offsets, dim_out: int):
    """The definition, path by path with dense CG blocks and einsum (autograd and double backward included)."""
    Z = x1.shape[0]
    out = x1.new_zeros(Z, dim_out)
    shared = weights.dim() == 1
    for p, (mode, off1, mul1, d1, off2, mul2, d2, off_out, mul_out, d_out, w_off, has_weight) in enumerate(
            paths.tolist()):
        mode = MODES[mode]
        a = x1[:, off1:off1 + mul1 * d1].reshape(Z, mul1, d1)
        b = x2[:, off2:off2 + mul2 * d2].reshape(Z, mul2, d2)
        start, stop = cg_offsets[p].item(), cg_offsets[p + 1].item()
        C = x1.new_zeros(d1, d2, d_out).index_put(tuple(cg_index[start:stop].T), cg_value[start:stop],
                                                 accumulate=True)
        w_idx = WEIGHT_INDICES[mode]
        w_shape = [{"u": mul1, "v": mul2, "w": mul_out}[c] for c in w_idx]
        if has_weight:
            size = int(torch.tensor(w_shape).prod())
            W = weights[..., w_off:w_off + size].reshape(*weights.shape[:-1], *w_shape)
        else:
            W = x1.new_ones(w_shape)
        z = "" if shared or not has_weight else "z"
        target = {"uvw": "w", "uvu": "u", "uvv": "v", "uuw": "w", "uuu": "u"}[mode]
        second = "v" if mode in ("uvw", "uvu", "uvv") else "u"
        result = torch.einsum(f"zui,z{second}j,ijk,{z}{w_idx}->z{target}k", a, b, C, W)
        out[:, off_out:off_out + mul_out * d_out] += result.reshape(Z, mul_out * d_out)
    return out


def tp_conv_reference(node_feats, edge_attrs, weights, edge_src, edge_dst, n_nodes: int, paths, cg_index,
                      cg_value, cg_offsets, dim_out: int):
    """Gather by edge source, tensor product per edge, scatter-sum to edge destinations."""
    messages = tensor_product_reference(node_feats[edge_src], edge_attrs, weights, paths, cg_index, cg_value,
                                        cg_offsets, dim_out)
    return node_feats.new_zeros(n_nodes, dim_out).index_add(0, edge_dst, messages)
