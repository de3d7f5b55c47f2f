"""``TensorProduct`` and ``TPConv``: e3nn-compatible tensor-product modules on fastflow's fused ops.

``TensorProduct(source, backend)`` computes what an ``e3nn.o3.TensorProduct`` computes. ``source`` is a
:class:`~fastflow.tp.TPDescriptor`, an e3nn tensor product (``TensorProduct``, ``FullyConnectedTensorProduct``, ...)
or a cuequivariance one (``ChannelWiseTensorProduct``, ``FullyConnectedTensorProduct`` with the mul_ir layout).
Built from a module, it adopts that module's parameters, buffers and children under the same names (the same
objects), so ``state_dict()`` keys and values are unchanged and training the fused module trains the original's
weights; ``forward`` takes the original's arguments (e3nn: ``x1, x2, weight=None`` with broadcasting batch
dimensions; cuequivariance: also ``indices_1, indices_2, indices_out, size_out``, the gather/scatter form, which
runs as one fused ``tp_conv``).

``TPConv(source, backend)``: ``forward(node_feats, edge_attrs, edge_weights, edge_src, edge_dst, n_nodes)`` = Σ over
edges into each node of ``TP(node_feats[edge_src], edge_attrs, edge_weights)``, fused (no ``[E, dim_out]`` tensor).

backend: "auto" (C++ on CPU, Triton on CUDA, else the PyTorch reference with one warning), "cpp", "triton",
"reference", or "cuequivariance" (cuequivariance's own CUDA kernels; needs ``cuequivariance_torch`` with
``cuequivariance_ops_torch`` and a CUDA device, else a RuntimeError saying which is missing).

precision (``TensorProduct``, ``TPConv``): "fp32" (default), or "tf32" / "bf16": the shared-weight uvw paths'
weight products as tensor-core matrix products in the Triton kernels (float32 modules; backend "triton", or "auto"
on a GPU). Per-edge weights (the message-passing convolutions of MACE and NequIP) leave no matrix product, so the
convolution modules below have no precision.
"""

from __future__ import annotations

import importlib.util

import numpy as np
import torch
from torch import nn

from fastflow.ops.backends import PRECISIONS, TP_BACKENDS, BackendUnavailable
from fastflow.ops.tensor_product import cpp_unavailable_reason, tensor_product, tp_conv
from fastflow.tp.descriptor import TPDescriptor


def cuequivariance_unavailable_reason(device: torch.device | str | None = None) -> str | None:
    """None if ``backend="cuequivariance"`` can run (on ``device``), else why not."""
    if importlib.util.find_spec("cuequivariance_torch") is None:
        return "cuequivariance_torch is not installed (`pip install cuequivariance-torch`)"
    if importlib.util.find_spec("cuequivariance_ops_torch") is None:
        return (
            "cuequivariance's CUDA kernels are not installed (`pip install cuequivariance-ops-torch-cu12`); "
            "its PyTorch fallback is no faster than e3nn"
        )
    if not torch.cuda.is_available():
        return "no CUDA device is available (cuequivariance's kernels are CUDA only)"
    if device is not None and torch.device(device).type != "cuda":
        return f"cuequivariance's kernels run on CUDA tensors, got {torch.device(device).type}"
    return None


def _check_backend(backend: str, cue_method: str | None) -> None:
    if backend not in TP_BACKENDS:
        raise ValueError(f"backend must be one of {TP_BACKENDS}, got {backend!r}")
    if backend in ("auto", "cpp"):
        cpp_unavailable_reason()  # loads fastflow._C now, so that torch.compile finds the ops registered
    if backend == "cuequivariance" and cue_method is None:
        reason = cuequivariance_unavailable_reason()
        if reason is not None:
            raise BackendUnavailable(
                f"backend='cuequivariance' is not available here: {reason}. Use backend='auto' "
                "(fastflow's C++ / Triton kernels)"
            )


def _check_precision(precision: str, backend: str) -> None:
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if precision != "fp32" and backend not in ("auto", "triton"):
        raise ValueError(
            f"precision {precision!r} runs on the Triton kernels (backend 'triton', or 'auto' on a GPU), not "
            f"backend={backend!r}"
        )


_TENSOR_NAMES = ("_tp_paths", "_tp_cg_index", "_tp_cg_value", "_tp_cg_offsets")


def _register_descriptor_tensors(
    module: nn.Module, descriptor: TPDescriptor, like: torch.Tensor | None
) -> None:
    """The descriptor's tensors as non-persistent buffers (not in state_dict; moved and cast with the module, and
    constants to torch.compile), in the dtype and device of ``like`` (default dtype on cpu without one)."""
    dtype = like.dtype if like is not None and like.is_floating_point() else torch.get_default_dtype()
    device = like.device if like is not None else torch.device("cpu")
    for name, tensor in zip(_TENSOR_NAMES, descriptor.tensors(dtype, device)):
        module.register_buffer(name, tensor.clone(), persistent=False)


def _descriptor_tensors(module: nn.Module, like: torch.Tensor):
    value = module._tp_cg_value
    if value.dtype == like.dtype and value.device == like.device:
        return module._tp_paths, module._tp_cg_index, value, module._tp_cg_offsets
    return module.descriptor.tensors(like.dtype, like.device)


def _adopt(fused: nn.Module, original: nn.Module) -> None:
    """The original's parameters, buffers and children, same objects under the same names and persistence."""
    for name, parameter in original._parameters.items():
        fused._parameters[name] = parameter
    for name, buffer in original._buffers.items():
        fused._buffers[name] = buffer
        if name in original._non_persistent_buffers_set:
            fused._non_persistent_buffers_set.add(name)
    for name, child in original._modules.items():
        fused._modules[name] = child


class TensorProduct(nn.Module):
    """e3nn's ``o3.TensorProduct`` on fastflow's ops (see the module docstring)."""

    def __init__(
        self,
        source,
        backend: str = "auto",
        shared_weights: bool | None = None,
        internal_weights: bool | None = None,
        _cue_method: str | None = None,
        precision: str = "fp32",
    ):
        super().__init__()
        _check_backend(backend, _cue_method)
        _check_precision(precision, backend)
        if isinstance(source, TPDescriptor):
            descriptor, original = source, None
        elif isinstance(source, nn.Module):
            descriptor, original = TPDescriptor.from_module(source), source
        else:
            raise TypeError(
                f"TensorProduct needs a TPDescriptor or a tensor-product module, got {type(source).__name__}"
            )
        self.descriptor = descriptor
        self.backend, self.precision = backend, precision
        self.flavour = "cuequivariance" if descriptor.source == "cuequivariance" else "e3nn"
        self._right = None
        if original is None:
            self.shared_weights = True if shared_weights is None else bool(shared_weights)
            self.internal_weights = (
                self.shared_weights and descriptor.weight_numel > 0
                if internal_weights is None
                else bool(internal_weights)
            )
            if self.internal_weights and not self.shared_weights:
                raise ValueError("internal weights are shared weights (shared_weights=False given)")
            if self.internal_weights and descriptor.weight_numel > 0:
                self.weight = nn.Parameter(torch.randn(descriptor.weight_numel))
            else:
                self.register_buffer("weight", torch.Tensor())
        else:
            if shared_weights is not None or internal_weights is not None:
                raise ValueError("shared_weights / internal_weights are read from the module given")
            _adopt(self, original)
            self.shared_weights = bool(original.shared_weights)
            self.internal_weights = bool(original.internal_weights)
            if self.flavour == "cuequivariance" and "weight" not in self._parameters:
                self.weight = None  # cuequivariance's modules keep weight = None without internal weights
            if getattr(original, "_did_compile_right", False):
                self._right = [original]  # hidden from nn.Module: right() is delegated
        weight = self._parameters.get("weight")
        _register_descriptor_tensors(
            self, descriptor, weight if weight is not None else self._buffers.get("weight")
        )
        self._cue = {} if backend == "cuequivariance" else None
        self._cue_method = _cue_method
        if backend == "cuequivariance":
            _cuequivariance_polynomial(
                descriptor, _cue_method
            )  # raises now if the descriptor cannot be mapped

    # ---- e3nn's properties ----

    @property
    def irreps_in1(self) -> str:
        return self.descriptor.irreps_in1

    @property
    def irreps_in2(self) -> str:
        return self.descriptor.irreps_in2

    @property
    def irreps_out(self) -> str:
        return self.descriptor.irreps_out

    @property
    def weight_numel(self) -> int:
        return self.descriptor.weight_numel

    def extra_repr(self) -> str:
        d = self.descriptor
        return (
            f"{d.irreps_in1} x {d.irreps_in2} -> {d.irreps_out}, {d.weight_numel} weights, "
            f"shared_weights={self.shared_weights}, internal_weights={self.internal_weights}, "
            f"backend={self.backend!r}"
            + (f", precision={self.precision!r}" if self.precision != "fp32" else "")
        )

    # ---- forward ----

    def _weights(self, weight, like: torch.Tensor) -> torch.Tensor:
        numel = self.descriptor.weight_numel
        if isinstance(weight, (list, tuple)):  # e3nn accepts one tensor per weighted instruction
            shapes = [
                s
                for s, ins in zip(self.descriptor.weight_shapes(), self.descriptor.instructions)
                if ins.has_weight
            ]
            batch = () if self.shared_weights else weight[0].shape[: weight[0].dim() - len(shapes[0])]
            weight = torch.cat([w.reshape(*batch, -1) for w in weight], dim=-1)
        if numel == 0:
            if weight is not None and weight.size(-1) != 0:
                raise ValueError(
                    f"TensorProduct: this product has no weights, got weight of shape {list(weight.shape)}"
                )
            return like.new_zeros(0)
        internal = self._parameters.get("weight") if self.internal_weights else None
        if weight is None:
            if internal is None:
                raise RuntimeError(
                    "TensorProduct: weights must be provided when the tensor product has no internal weights"
                )
            weight = internal
        elif internal is not None and self.flavour == "cuequivariance":
            raise ValueError("Internal weights are used, weight should be None")
        if weight.size(-1) != numel:
            raise ValueError(
                f"TensorProduct: weight must have {numel} entries in its last dimension "
                f"(weight_numel), got shape {list(weight.shape)}"
            )
        if weight.dim() > 1 and weight.shape[:-1].numel() == 1:
            return weight.reshape(numel)  # one row for every sample: shared ([1, W], cuequivariance's form)
        if self.shared_weights and weight.dim() != 1:
            raise ValueError(
                f"TensorProduct: shared weights must have shape [{numel}], got {list(weight.shape)}"
            )
        if not self.shared_weights and weight.dim() < 2:
            raise ValueError(
                "TensorProduct: without shared weights, weight must have a batch dimension, got shape "
                f"{list(weight.shape)}"
            )
        return weight

    def _check_features(self, x1, x2):
        d = self.descriptor
        for name, x, dim, irreps in (
            ("x1", x1, d.dim_in1, d.irreps_in1),
            ("x2", x2, d.dim_in2, d.irreps_in2),
        ):
            if not torch.is_tensor(x) or x.dim() == 0 or x.size(-1) != dim:
                got = list(x.shape) if torch.is_tensor(x) else type(x).__name__
                raise ValueError(
                    f"TensorProduct: {name} must have {dim} features in its last dimension "
                    f"(irreps {irreps}), got shape {got}"
                )

    def forward(
        self,
        x1: torch.Tensor,
        x2: torch.Tensor,
        weight=None,
        indices_1: torch.Tensor | None = None,
        indices_2: torch.Tensor | None = None,
        indices_out: torch.Tensor | None = None,
        size_out: int | None = None,
    ) -> torch.Tensor:
        self._check_features(x1, x2)
        weight = self._weights(weight, x1)
        d = self.descriptor
        if indices_1 is not None or indices_2 is not None or indices_out is not None:
            return self._indexed(x1, x2, weight, indices_1, indices_2, indices_out, size_out)
        shared = weight.dim() == 1
        batch = torch.broadcast_shapes(
            x1.shape[:-1], x2.shape[:-1], *(() if shared else (weight.shape[:-1],))
        )
        x1 = x1.expand(*batch, d.dim_in1).reshape(-1, d.dim_in1)
        x2 = x2.expand(*batch, d.dim_in2).reshape(-1, d.dim_in2)
        if not shared:
            weight = weight.expand(*batch, weight.size(-1)).reshape(-1, weight.size(-1))
        if self._cue is not None:
            out = self._cuequivariance(x1, x2, weight)
        else:
            out = tensor_product(
                x1,
                x2,
                weight,
                *_descriptor_tensors(self, x1),
                d.dim_out,
                backend=self.backend,
                precision=self.precision,
            )
        return out.reshape(*batch, d.dim_out)

    def _indexed(self, x1, x2, weight, indices_1, indices_2, indices_out, size_out):
        """cuequivariance's gather/scatter form: out[indices_out[e]] += TP(x1[indices_1[e]], x2[indices_2[e]])."""
        if indices_out is not None and size_out is None:
            raise ValueError("size_out should be provided if indices_out is provided")
        d = self.descriptor
        if indices_2 is not None:
            x2 = x2[indices_2]
        if indices_out is not None and indices_1 is not None and x2.dim() == 2:
            if self._cue is not None:
                return self._cuequivariance(x1, x2, weight, indices_1, indices_out, int(size_out))
            return tp_conv(
                x1,
                x2,
                weight,
                indices_1,
                indices_out,
                int(size_out),
                *_descriptor_tensors(self, x1),
                d.dim_out,
                backend=self.backend,
                precision=self.precision,
            )
        if indices_1 is not None:
            x1 = x1[indices_1]
        out = self.forward(x1, x2, weight)
        if indices_out is None:
            return out
        return out.new_zeros(int(size_out), d.dim_out).index_add(0, indices_out, out)

    def __prepare_scriptable__(self):
        """What torch.jit.script compiles in its place (see _ScriptedTensorProduct)."""
        return _ScriptedTensorProduct(self)

    def right(self, y: torch.Tensor, weight=None) -> torch.Tensor:
        """e3nn's ``right`` (partial evaluation), delegated to the original module (not fused)."""
        if self._right is None:
            raise RuntimeError(
                "right() is only available when built from an e3nn module compiled with compile_right=True"
            )
        return self._right[0].right(y, weight)

    def _cuequivariance(self, x1, x2, weight, edge_src=None, edge_dst=None, n_nodes=None):
        return _run_cuequivariance(
            self._cue, self.descriptor, self._cue_method, x1, x2, weight, edge_src, edge_dst, n_nodes
        )


class TPConv(nn.Module):
    """Fused tensor-product convolution (see the module docstring).

    source: a TPDescriptor, or an e3nn / cuequivariance tensor-product module (its descriptor; its internal
    weights, if any, are adopted as ``weight`` and used when ``edge_weights`` is None).
    internal_weights: with a descriptor, create a shared ``weight`` parameter (default False: weights are given
    per call, per edge ``[E, n_weights]`` or shared ``[n_weights]``).
    """

    def __init__(
        self,
        source,
        backend: str = "auto",
        internal_weights: bool = False,
        _cue_method: str | None = None,
        precision: str = "fp32",
    ):
        super().__init__()
        _check_backend(backend, _cue_method)
        _check_precision(precision, backend)
        if isinstance(source, TPDescriptor):
            self.descriptor = source
            if internal_weights and source.weight_numel > 0:
                self.weight = nn.Parameter(torch.randn(source.weight_numel))
            else:
                self.weight = None
        elif isinstance(source, nn.Module):
            self.descriptor = TPDescriptor.from_module(source)
            weight = source._parameters.get("weight")
            self.weight = weight if getattr(source, "internal_weights", False) else None
        else:
            raise TypeError(
                f"TPConv needs a TPDescriptor or a tensor-product module, got {type(source).__name__}"
            )
        self.backend, self.precision = backend, precision
        _register_descriptor_tensors(self, self.descriptor, self.weight)
        self._cue = {} if backend == "cuequivariance" else None
        self._cue_method = _cue_method
        if backend == "cuequivariance":
            _cuequivariance_polynomial(self.descriptor, _cue_method)

    def extra_repr(self) -> str:
        d = self.descriptor
        return f"{d.irreps_in1} x {d.irreps_in2} -> {d.irreps_out}, {d.weight_numel} weights, backend={self.backend!r}"

    def forward(
        self,
        node_feats: torch.Tensor,
        edge_attrs: torch.Tensor,
        edge_weights: torch.Tensor | None,
        edge_src: torch.Tensor,
        edge_dst: torch.Tensor,
        n_nodes: int | None = None,
    ) -> torch.Tensor:
        d = self.descriptor
        for name, x, dim, irreps in (
            ("node_feats", node_feats, d.dim_in1, d.irreps_in1),
            ("edge_attrs", edge_attrs, d.dim_in2, d.irreps_in2),
        ):
            if not torch.is_tensor(x) or x.dim() != 2 or x.size(-1) != dim:
                got = list(x.shape) if torch.is_tensor(x) else type(x).__name__
                raise ValueError(f"TPConv: {name} must have shape [·, {dim}] (irreps {irreps}), got {got}")
        if d.weight_numel == 0:
            edge_weights = node_feats.new_zeros(0)
        elif edge_weights is None:
            if self.weight is None:
                raise RuntimeError("TPConv: edge_weights must be given (no internal weights)")
            edge_weights = self.weight
        elif edge_weights.size(-1) != d.weight_numel:
            raise ValueError(
                f"TPConv: edge_weights must have {d.weight_numel} entries in the last dimension, got "
                f"shape {list(edge_weights.shape)}"
            )
        n_nodes = node_feats.size(0) if n_nodes is None else int(n_nodes)
        if self._cue is not None:
            return _run_cuequivariance(
                self._cue,
                d,
                self._cue_method,
                node_feats,
                edge_attrs,
                edge_weights,
                edge_src,
                edge_dst,
                n_nodes,
            )
        return tp_conv(
            node_feats,
            edge_attrs,
            edge_weights,
            edge_src,
            edge_dst,
            n_nodes,
            *_descriptor_tensors(self, node_feats),
            d.dim_out,
            backend=self.backend,
            precision=self.precision,
        )


class EdgeIndexTPConv(nn.Module):
    """A per-edge-weighted e3nn tensor product and the gather and scatter-sum around it, as one ``tp_conv``, called
    the way MACE's interaction blocks call a fused convolution (``conv_fusion``): ``forward(node_feats, edge_attrs,
    edge_weights, edge_index)`` = Σ over edges e into node n (``edge_index[1, e] = n``) of
    ``TP(node_feats[edge_index[0, e]], edge_attrs[e], edge_weights[e])``, one row per row of node_feats.

    Built from the e3nn tensor product it replaces (``shared_weights=False``, weights given per edge); it adopts that
    module's buffers so ``state_dict()`` is unchanged.
    """

    def __init__(self, source: nn.Module, backend: str = "auto"):
        super().__init__()
        _check_backend(backend, None)
        if not isinstance(source, nn.Module):
            raise TypeError(f"EdgeIndexTPConv needs a tensor-product module, got {type(source).__name__}")
        if getattr(source, "shared_weights", True) or getattr(source, "internal_weights", True):
            raise ValueError(
                "EdgeIndexTPConv needs per-edge weights (shared_weights=False, internal_weights=False)"
            )
        self.descriptor = TPDescriptor.from_module(source)
        if self.descriptor.weight_numel == 0:
            raise ValueError("EdgeIndexTPConv needs a weighted tensor product")
        self.backend = backend
        _adopt(self, source)
        _register_descriptor_tensors(self, self.descriptor, self._buffers.get("weight"))

    @property
    def weight_numel(self) -> int:
        return self.descriptor.weight_numel

    def extra_repr(self) -> str:
        d = self.descriptor
        return f"{d.irreps_in1} x {d.irreps_in2} -> {d.irreps_out}, {d.weight_numel} weights per edge, backend={self.backend!r}"

    def __prepare_scriptable__(self):
        """What torch.jit.script compiles in its place (see _ScriptedEdgeIndexTPConv)."""
        return _ScriptedEdgeIndexTPConv(self)

    def forward(
        self,
        node_feats: torch.Tensor,
        edge_attrs: torch.Tensor,
        edge_weights: torch.Tensor,
        edge_index: torch.Tensor,
    ) -> torch.Tensor:
        if not torch.is_tensor(edge_index) or edge_index.dim() != 2 or edge_index.size(0) != 2:
            got = list(edge_index.shape) if torch.is_tensor(edge_index) else type(edge_index).__name__
            raise ValueError(
                f"EdgeIndexTPConv: edge_index must have shape [2, E] (sender; receiver), got {got}"
            )
        d = self.descriptor
        return tp_conv(
            node_feats,
            edge_attrs,
            edge_weights,
            edge_index[0],
            edge_index[1],
            node_feats.size(0),
            *_descriptor_tensors(self, node_feats),
            d.dim_out,
            backend=self.backend,
        )


class ScatterTPConv(nn.Module):
    """NequIP's ``TensorProductScatter`` (an e3nn tensor product with per-edge weights on gathered rows, then a
    scatter-sum) as one ``tp_conv``: ``forward(x, edge_attr, edge_weight, edge_dst, edge_src)`` = Σ over edges e into
    node n (``edge_dst[e] = n``) of ``TP(x[edge_src[e]], edge_attr[e], edge_weight[e])``, one row per row of x.
    It keeps the original's children (``tp``) so ``state_dict()`` is unchanged.
    """

    def __init__(self, source: nn.Module, backend: str = "auto"):
        super().__init__()
        _check_backend(backend, None)
        tp = getattr(source, "tp", None)
        if not isinstance(tp, nn.Module):
            raise TypeError(
                f"ScatterTPConv needs a module with a tensor product .tp, got {type(source).__name__}"
            )
        if getattr(tp, "shared_weights", True) or getattr(tp, "internal_weights", True):
            raise ValueError(
                "ScatterTPConv needs per-edge weights (shared_weights=False, internal_weights=False)"
            )
        self.descriptor = TPDescriptor.from_module(tp)
        if self.descriptor.weight_numel == 0:
            raise ValueError("ScatterTPConv needs a weighted tensor product")
        self.backend = backend
        _adopt(self, source)
        _register_descriptor_tensors(self, self.descriptor, tp._buffers.get("weight"))

    def extra_repr(self) -> str:
        d = self.descriptor
        return f"{d.irreps_in1} x {d.irreps_in2} -> {d.irreps_out}, {d.weight_numel} weights per edge, backend={self.backend!r}"

    def forward(
        self,
        x: torch.Tensor,
        edge_attr: torch.Tensor,
        edge_weight: torch.Tensor,
        edge_dst: torch.Tensor,
        edge_src: torch.Tensor,
    ) -> torch.Tensor:
        d = self.descriptor
        return tp_conv(
            x,
            edge_attr,
            edge_weight,
            edge_src,
            edge_dst,
            x.size(0),
            *_descriptor_tensors(self, x),
            d.dim_out,
            backend=self.backend,
        )

    def __prepare_scriptable__(self):
        """What torch.jit.script compiles in its place (see _ScriptedScatterTPConv)."""
        return _ScriptedScatterTPConv(self)


# ---- TorchScript: the modules as torch.jit.script compiles them (torch.jit.script calls __prepare_scriptable__) ----


def _require_cpp_for_script(module: nn.Module, unavailable_reason=cpp_unavailable_reason, bind=None) -> None:
    """Scripted modules call the C++ op itself: the backend must be C++ (the Triton and reference paths and the
    Python argument checks are not TorchScript). ``unavailable_reason`` and ``bind`` (which registers the ops'
    autograd) are the op family's; the default is the tensor products'."""
    if module.backend not in ("auto", "cpp"):
        raise RuntimeError(
            f"{type(module).__name__}: torch.jit.script needs backend 'auto' or 'cpp', got {module.backend!r}"
        )
    if getattr(module, "precision", "fp32") != "fp32":
        raise RuntimeError(
            f"{type(module).__name__}: torch.jit.script runs the C++ ops (float32 products), not precision "
            f"{module.precision!r}"
        )
    reason = unavailable_reason()
    if reason is not None:
        raise RuntimeError(
            f"{type(module).__name__}: torch.jit.script calls fastflow's C++ ops, but {reason}"
        )
    if bind is None:
        from fastflow.ops.tensor_product import _cpp_ops as bind

    bind()  # their autograd, which forces need, registered now


class _ScriptedEdgeIndexTPConv(nn.Module):
    """EdgeIndexTPConv for TorchScript: the same buffers and parameters, forward = torch.ops.fastflow.tp_conv (its C++
    checks only; autograd through the formula fastflow registers, so a loading process must import fastflow)."""

    def __init__(self, conv: EdgeIndexTPConv):
        super().__init__()
        _require_cpp_for_script(conv)
        _adopt(self, conv)
        self.dim_out = conv.descriptor.dim_out
        self.weight_numel = conv.descriptor.weight_numel

    def forward(
        self,
        node_feats: torch.Tensor,
        edge_attrs: torch.Tensor,
        edge_weights: torch.Tensor,
        edge_index: torch.Tensor,
    ) -> torch.Tensor:
        return torch.ops.fastflow.tp_conv(
            node_feats.contiguous(),
            edge_attrs.contiguous(),
            edge_weights.contiguous(),
            edge_index[0].contiguous(),
            edge_index[1].contiguous(),
            node_feats.size(0),
            self._tp_paths,
            self._tp_cg_index,
            self._tp_cg_value,
            self._tp_cg_offsets,
            self.dim_out,
        )


class _ScriptedScatterTPConv(nn.Module):
    """ScatterTPConv for TorchScript, like _ScriptedEdgeIndexTPConv."""

    def __init__(self, conv: ScatterTPConv):
        super().__init__()
        _require_cpp_for_script(conv)
        _adopt(self, conv)
        self.dim_out = conv.descriptor.dim_out

    def forward(
        self,
        x: torch.Tensor,
        edge_attr: torch.Tensor,
        edge_weight: torch.Tensor,
        edge_dst: torch.Tensor,
        edge_src: torch.Tensor,
    ) -> torch.Tensor:
        return torch.ops.fastflow.tp_conv(
            x.contiguous(),
            edge_attr.contiguous(),
            edge_weight.contiguous(),
            edge_src.contiguous(),
            edge_dst.contiguous(),
            x.size(0),
            self._tp_paths,
            self._tp_cg_index,
            self._tp_cg_value,
            self._tp_cg_offsets,
            self.dim_out,
        )


class _ScriptedTensorProduct(nn.Module):
    """TensorProduct (e3nn flavour) for TorchScript: ``forward(x1, x2, weight=None)`` with broadcasting batch
    dimensions, on torch.ops.fastflow.tensor_product; the same parameters and buffers."""

    def __init__(self, tp: TensorProduct):
        super().__init__()
        _require_cpp_for_script(tp)
        if tp.flavour != "e3nn":
            raise RuntimeError(
                "TensorProduct: torch.jit.script supports the e3nn flavour (not cuequivariance's)"
            )
        _adopt(self, tp)
        d = tp.descriptor
        self.dim_in1, self.dim_in2, self.dim_out, self.weight_numel = (
            d.dim_in1,
            d.dim_in2,
            d.dim_out,
            d.weight_numel,
        )
        self.use_internal = tp.internal_weights and d.weight_numel > 0

    def forward(self, x1: torch.Tensor, x2: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
        if self.weight_numel == 0:
            weight = x1.new_zeros(0)
        elif weight is None:
            if not self.use_internal:
                raise RuntimeError("TensorProduct: weights must be provided (no internal weights)")
            weight = self.weight
        assert weight is not None
        if weight.dim() > 1 and weight.numel() == self.weight_numel:
            weight = weight.reshape(self.weight_numel)
        a, b = x1[..., :1], x2[..., :1]
        if weight.dim() > 1:
            a, b, _ = torch.broadcast_tensors(a, b, weight[..., :1])
        else:
            a, b = torch.broadcast_tensors(a, b)
        batch = a.shape[:-1]
        x1 = x1.expand(batch + [self.dim_in1]).reshape(-1, self.dim_in1)
        x2 = x2.expand(batch + [self.dim_in2]).reshape(-1, self.dim_in2)
        if weight.dim() > 1:
            weight = weight.expand(batch + [self.weight_numel]).reshape(-1, self.weight_numel)
        out = torch.ops.fastflow.tensor_product(
            x1.contiguous(),
            x2.contiguous(),
            weight.contiguous(),
            self._tp_paths,
            self._tp_cg_index,
            self._tp_cg_value,
            self._tp_cg_offsets,
            self.dim_out,
        )
        return out.reshape(batch + [self.dim_out])


# ---- backend="cuequivariance": the descriptor as a cuequivariance segmented polynomial ----


def _cuequivariance_polynomial(descriptor: TPDescriptor, method: str | None):
    """(polynomial, method) for cuequivariance_torch.SegmentedPolynomial: one segmented tensor product in the
    ir_mul layout ("uv,iu,jv,ku+ijk" for uvu, "uvw,iu,jv,kw+ijk" for uvw), coefficients from the descriptor."""
    import cuequivariance as cue

    modes = {ins.mode for ins in descriptor.instructions}
    subscripts = {"uvu": "uv,iu,jv,ku+ijk", "uvw": "uvw,iu,jv,kw+ijk"}
    if len(modes) != 1 or next(iter(modes)) not in subscripts:
        raise ValueError(
            f"backend='cuequivariance' maps descriptors whose instructions are all uvu or all uvw, "
            f"got modes {sorted(modes)}"
        )
    if not all(ins.has_weight for ins in descriptor.instructions):
        raise ValueError("backend='cuequivariance' needs every instruction weighted")
    stp = cue.SegmentedTensorProduct.from_subscripts(subscripts[next(iter(modes))])
    in1, in2, out = descriptor.blocks_in1, descriptor.blocks_in2, descriptor.blocks_out
    for operand, blocks in ((1, in1), (2, in2), (3, out)):
        for b in blocks:
            stp.add_segment(operand, (b.dim, b.mul))
    from fastflow.tp.descriptor import _wigner_3j

    for ins, shape in zip(descriptor.instructions, descriptor.weight_shapes()):
        segment = stp.add_segment(0, shape)
        a, b, c = in1[ins.i_in1], in2[ins.i_in2], out[ins.i_out]
        if 0 in (a.mul, b.mul, c.mul) or ins.path_weight == 0:
            continue
        if ins.cg is None:
            C = (_wigner_3j(a.l, b.l, c.l) * ins.path_weight).numpy()
        else:
            C = np.zeros((a.dim, b.dim, c.dim))
            for i, j, k, v in ins.cg:
                C[i, j, k] += v * ins.path_weight
        stp.add_path(segment, ins.i_in1, ins.i_in2, ins.i_out, c=C)
    polynomial = cue.SegmentedPolynomial(
        stp.operands[:3], stp.operands[3:], [(cue.Operation((0, 1, 2, 3)), stp)]
    )
    if method is None:
        flat = polynomial.flatten_coefficient_modes().squeeze_modes()
        uniform = flat.all_same_segment_shape() and len(flat.operations[0][1].subscripts.modes()) == 1
        method = "uniform_1d" if uniform else "naive"
    return polynomial, method


def _transpose_blocks(x: torch.Tensor, blocks, to_ir_mul: bool) -> torch.Tensor:
    parts, offset = [], 0
    for b in blocks:
        n = b.mul * b.dim
        block = x[..., offset : offset + n]
        shape = (b.mul, b.dim) if to_ir_mul else (b.dim, b.mul)
        parts.append(block.unflatten(-1, shape).transpose(-1, -2).flatten(-2))
        offset += n
    return torch.cat(parts, dim=-1) if parts else x


def _run_cuequivariance(
    cache, descriptor, method, x1, x2, weight, edge_src=None, edge_dst=None, n_nodes=None
):
    import cuequivariance_torch as cuet

    key = (x1.device, x1.dtype)
    if key not in cache:
        polynomial, chosen = _cuequivariance_polynomial(descriptor, method)
        cache[key] = cuet.SegmentedPolynomial(polynomial, method=chosen, math_dtype=x1.dtype).to(x1.device)
    function = cache[key]
    d = descriptor
    a = _transpose_blocks(x1, d.blocks_in1, True)
    b = _transpose_blocks(x2, d.blocks_in2, True)
    w = weight.reshape(1, -1) if weight.dim() == 1 else weight
    if edge_src is None:
        out = function([w, a, b])[0]
    else:
        out = function(
            [w, a, b],
            input_indices={1: edge_src},
            output_shapes={0: x1.new_empty(n_nodes, 1)},
            output_indices={0: edge_dst},
        )[0]
    return _transpose_blocks(out, d.blocks_out, False)
