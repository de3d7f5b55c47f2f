"""``patch_model``: the one place that knows both models and kernels. It swaps fused modules (:mod:`fastflow.nn`)
in for the Semla layers and feed-forwards, for e3nn / cuequivariance tensor products and for MACE's symmetric
contractions, and installs the predictive feature cache (:mod:`fastflow.cache`).

The instance is mutated, never its class: swapped children are put back by ``unpatch()``, and hooks are instance
attributes ``forward`` that ``unpatch()`` deletes again. Patching twice with the same arguments returns the same
handle. Fused modules adopt the original modules' parameters under the same names, so ``state_dict()`` is the
same before and after.
"""

from __future__ import annotations

import itertools
import sys
import types
import warnings

import torch
from torch import nn

from fastflow.cache import CacheConfig, CacheHook
from fastflow.models.cache_adapter import SemlaCacheAdapter
from fastflow.models.semla import Semla
from fastflow.nn.semla import FusedBondRefine, FusedNodeFeedForward, FusedSemlaLayer, fused_semla_forward
from fastflow.nn.symmetric_contraction import SymmetricContraction, unsupported_reason
from fastflow.nn.tensor_product import (
    EdgeIndexTPConv,
    ScatterTPConv,
    TensorProduct,
    cuequivariance_unavailable_reason,
)
from fastflow.ops.backends import TP_BACKENDS, BackendUnavailable, resolve_backend, resolve_precision
from fastflow.runtime import cpu_isa

_ATTRIBUTE = "_fastflow_patch"


class PatchHandle:
    """What ``patch_model`` did to one model instance; ``unpatch()`` undoes it."""

    def __init__(self, model: nn.Module, kernels: str, cache: CacheConfig | None, precision: str = "fp32"):
        self.model, self.kernels, self.cache = model, kernels, cache
        # "reference" swaps nothing; otherwise the backend the fused ops run (raises if an explicit one is missing,
        # warns once if "auto" has no fast backend on this device). "cuequivariance": tensor products on
        # cuequivariance's CUDA kernels, everything else as "auto".
        device = _device(model)
        if kernels == "cuequivariance":
            reason = cuequivariance_unavailable_reason(device)
            if reason is not None:
                raise BackendUnavailable(
                    f"kernels='cuequivariance' is not available here: {reason}. Use kernels='auto' "
                    "(fastflow's C++ / Triton kernels)"
                )
        self.backend = (
            "reference"
            if kernels == "reference"
            else resolve_backend("auto" if kernels == "cuequivariance" else kernels, device)
        )
        if kernels == "reference" and precision not in ("fp32", "auto"):
            raise ValueError(
                f"precision={precision!r} applies to fused modules; kernels='reference' swaps none (use "
                "kernels='auto')"
            )
        self.requested_precision = precision
        self.precision = "fp32" if kernels == "reference" else resolve_precision(precision, device)
        # Tensor products resolve per call ("auto" falls back to the reference, with a warning, where fastflow._C or
        # the Triton module lacks them); an explicit backend must have them.
        self.tp_backend = kernels if kernels in ("cpp", "triton", "cuequivariance") else "auto"
        self.swaps, self.left_alone, self.fused_forward = [], [], None
        if kernels != "reference":
            self.swaps, self.left_alone = _plan_swaps(model, self.backend, self.tp_backend, self.precision)
            self.fused_forward = _plan_forward(model, self.backend, self.swaps, self.left_alone)
        if precision in ("tf32", "bf16") and any(
            isinstance(swap.fused, TensorProduct) and swap.fused.precision == "fp32" for swap in self.swaps
        ):
            warnings.warn(
                f"precision={precision!r}: the swapped tensor products compute in float32 here (their tf32 / "
                "bf16 variants are the Triton kernels'); report()['precision'] says what runs",
                stacklevel=3,
            )
        self.embeds_edges = any(getattr(swap.fused, "embeds_edges", False) for swap in self.swaps)
        self._hook = None if cache is None else CacheHook(model, cache, self.backend, SemlaCacheAdapter())
        self._saved_forward = None
        self.active = False

    def _install(self) -> None:
        for swap in self.swaps:
            swap.parent._modules[swap.name] = swap.fused
            for attribute, value in swap.flags.items():
                setattr(swap.parent, attribute, value)
        if (
            self.fused_forward is not None
        ):  # before the cache hook, which wraps whatever forward the model has
            self._saved_forward = self.model.__dict__.get("forward")
            self.model.forward = self.fused_forward
        if self._hook is not None:
            self._hook.install()
        setattr(self.model, _ATTRIBUTE, self)
        self.active = True

    def unpatch(self) -> None:
        """Restore the model exactly (its instance ``forward`` attributes as before); a second call is a no-op."""
        if not self.active:
            return
        if self._hook is not None:
            self._hook.remove()
        if self.fused_forward is not None:
            if self._saved_forward is None:
                del self.model.forward  # back to the class's forward
            else:
                self.model.forward = self._saved_forward
        for swap in reversed(self.swaps):
            swap.parent._modules[swap.name] = swap.original
            for attribute in swap.flags:
                delattr(swap.parent, attribute)
        delattr(self.model, _ATTRIBUTE)
        self.active = False

    def reset(self) -> None:
        """Forget the current trajectory and the statistics (new trajectories are also detected on their own)."""
        if self._hook is not None:
            self._hook.reset()

    def stats(self) -> dict:
        """Cache counters since the patch or ``reset()``: evaluations and forecasts (molecules × calls of the cached
        module), hit rate, trajectories, evaluations per molecule, and the adaptive policy's error estimates and
        calibration ratios (count, mean, p50, p95, max). Empty without a cache."""
        return {} if self._hook is None else self._hook.stats.summary()

    def report(self) -> dict:
        """What was swapped, which backend the cache's op uses, and what is cached where."""
        report = {
            "active": self.active,
            "kernels": {
                "requested": self.kernels,
                "backend": self.backend,
                "swapped": [
                    {
                        "module": swap.path,
                        "from": type(swap.original).__name__,
                        "to": type(swap.fused).__name__,
                    }
                    for swap in self.swaps
                ]
                + (
                    [
                        {
                            "module": "(forward)",
                            "from": f"{type(self.model).__name__}.forward",
                            "to": "fused_semla_forward (pair tail as fastflow::bond_head"
                            + (
                                "; edge_in_proj inside the first semla_attention)"
                                if self.embeds_edges
                                else ")"
                            ),
                        }
                    ]
                    if self.fused_forward
                    else []
                ),
                "left_alone": self.left_alone,
            },
            "precision": {
                "requested": self.requested_precision,
                "used": self.precision,
                "why": _precision_reason(self.requested_precision, self.precision, _device(self.model)),
            },
        }
        tp_precisions = {swap.fused.precision for swap in self.swaps if isinstance(swap.fused, TensorProduct)}
        if tp_precisions:
            (used,) = tp_precisions
            report["precision"]["tensor_products"] = (
                f"{used}: operands of the shared-weight uvw products on tensor cores (Triton); other paths float32"
                if used != "fp32"
                else "fp32"
                + (" (tf32 / bf16 tensor products are Triton's)" if self.precision != "fp32" else "")
            )
        if self.cache is not None:
            hook = self._hook
            report["cache"] = {
                "forecaster": self.cache.forecaster,
                "order": self.cache.order,
                "clock": self.cache.clock,
                "policy": (
                    f"adaptive per molecule, tolerance {self.cache.tolerance}, at most "
                    f"{self.cache.interval - 1} forecasts in a row"
                )
                if self.cache.adaptive
                else f"fixed interval {self.cache.interval}",
                "warmup": self.cache.warmup,
                "cooldown": self.cache.cooldown,
                "where": "whole model" if self.cache.block is None else self.cache.block,
                "skipped_prefix": [
                    name for name, m in self.model.named_modules() if any(m is p for p in hook.prefix)
                ],
                "history": "float32 (float64 for float64 models), stored by value",
                "cache_forecast_backend": self.backend,
            }
        return report

    def __repr__(self) -> str:
        return (
            f"PatchHandle(kernels={self.kernels!r}, cache={self.cache!r}, precision={self.precision!r}, "
            f"active={self.active})"
        )


def _precision_reason(requested: str, used: str, device: torch.device) -> str:
    where = f"cpu ISA {'/'.join(cpu_isa()) or 'baseline'}" if device.type == "cpu" else device.type
    if used == "fp32":
        return f"{requested} → fp32 ({where})" if requested == "auto" else "float32 products (the default)"
    scope = "bf16 operands, fp32 accumulation on the invariant path; coordinates fp32"
    return f"{requested} → {used} ({where}): {scope}" if requested == "auto" else f"{used}: {scope}"


def patch_model(
    model: nn.Module, kernels: str = "auto", cache: CacheConfig | None = None, precision: str = "fp32"
) -> PatchHandle:
    """Speed up ``model`` in place and return the handle that undoes it.

    kernels: "auto" (fused modules on the fastest backend for the model's device: C++ on CPU, Triton on CUDA;
        one warning if that backend is missing, then the PyTorch reference ops), "cpp" or "triton" (that backend
        or an error), "reference" (no swaps; the cache's op runs in PyTorch), or "cuequivariance" (tensor
        products on cuequivariance's CUDA kernels, the rest as "auto"; an error where those are not installed).
    cache: None, or a :class:`~fastflow.cache.CacheConfig`.
    precision: the matrix products of the fused Semla modules: "fp32" (default), "bf16" (bfloat16 operands with
        float32 accumulation on the invariant path; coordinates, Gram terms, softmax statistics and the residual
        stream stay float32 — see :mod:`fastflow.nn.precision`), "tf32" (CUDA only), or "auto" (bf16 where the
        CPU has AMX-BF16 or AVX512-BF16 or the GPU has bf16 tensor cores, else fp32). An explicit bf16 or tf32
        the hardware lacks raises. ``handle.report()["precision"]`` says what was chosen and why.

    Swapped: Semla layers, feed-forwards and bond refinement (by class name and structure); e3nn's
    ``o3.TensorProduct`` and its subclasses called as ``forward(x1, x2, weight)`` (``FullyConnectedTensorProduct``,
    ``ElementwiseTensorProduct``, ...) with modes uvw/uvu/uvv/uuw/uuu; cuequivariance's
    ``ChannelWiseTensorProduct`` / ``FullyConnectedTensorProduct`` in the mul_ir layout. Tensor products are replaced
    by :class:`fastflow.nn.TensorProduct` holding the same weight objects. Convolutions (gather → product with
    per-edge weights → scatter-sum) run as one ``fastflow::tp_conv``: MACE interaction blocks' ``conv_tp`` (through
    MACE's own ``conv_fusion`` call) and NequIP's ``TensorProductScatter``. Anything else recognised but
    unsupported (``TensorSquare``, mode ``uvuv``, the ir_mul layout, ...) is left alone and listed with the reason
    in ``handle.report()["kernels"]["left_alone"]``.

    With ``kernels="reference"`` and ``cache=None`` the outputs equal the unpatched model's bit for bit; with fused
    kernels they match within fp32 rounding (relative error ≤ 1e-5).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"patch_model needs a torch.nn.Module, got {type(model).__name__}")
    if kernels not in TP_BACKENDS:
        raise ValueError(f"unknown kernels={kernels!r}; expected one of {TP_BACKENDS}")
    if cache is not None and not isinstance(cache, CacheConfig):
        raise TypeError(
            f"cache must be a fastflow.CacheConfig or None, got {type(cache).__name__}"
            + (" (use CacheConfig(**options))" if isinstance(cache, dict) else "")
        )
    existing = model.__dict__.get(_ATTRIBUTE)
    if existing is not None:
        if (existing.kernels, existing.cache, existing.requested_precision) == (kernels, cache, precision):
            return existing
        raise RuntimeError(
            f"model is already patched ({existing!r}); call handle.unpatch() before patching it "
            "with other options"
        )
    handle = PatchHandle(model, kernels, cache, precision)
    handle._install()
    return handle


class _Swap:
    """One child module replaced by its fused stand-in; ``flags``: instance attributes set on the parent while
    patched (MACE's ``conv_fusion``, which makes its blocks call the fused convolution)."""

    def __init__(
        self, path: str, parent: nn.Module, name: str, original: nn.Module, fused: nn.Module, flags=None
    ):
        self.path, self.parent, self.name, self.original, self.fused = path, parent, name, original, fused
        self.flags = flags or {}


# Modules recognised by class name (fastflow's and upstream SemlaFlow's share them) and checked by structure.
_FUSABLE = {
    "EquiMessagePassingLayer": "layer",
    "NodeFeedForward": "feed_forward",
    "BondRefine": "bond_refine",
}


def _tensor_product_classes() -> tuple[type, ...]:
    """e3nn's and cuequivariance's tensor-product classes, from modules already imported (a model cannot hold
    instances of a library that was never imported, so neither is imported here)."""
    classes = []
    o3 = sys.modules.get("e3nn.o3")
    if o3 is not None and hasattr(o3, "TensorProduct"):
        classes.append(o3.TensorProduct)
    cuet = sys.modules.get("cuequivariance_torch")
    if cuet is not None:
        classes += [
            getattr(cuet, name)
            for name in ("ChannelWiseTensorProduct", "FullyConnectedTensorProduct")
            if hasattr(cuet, name)
        ]
    return tuple(classes)


def _plan_swaps(
    model: nn.Module, backend: str, tp_backend: str = "auto", precision: str = "fp32"
) -> tuple[list[_Swap], list[dict]]:
    """The fused stand-ins for every recognised Semla module and tensor product (outermost first), and the modules
    left alone."""
    swaps, left_alone, inside = [], [], []
    tp_classes = _tensor_product_classes()
    tp_precision = None  # the tensor products' precision, resolved at the first one
    for path, module in model.named_modules():
        if any(path.startswith(prefix + ".") for prefix in inside):
            continue
        if path and _is_nequip_tp_scatter(module, tp_classes):
            parent_path, _, name = path.rpartition(".")
            try:
                fused = ScatterTPConv(module, backend=tp_backend)
            except (TypeError, ValueError) as error:  # its .tp is then swapped alone, if it can be
                left_alone.append({"module": path, "class": type(module).__name__, "reason": str(error)})
                continue
            swaps.append(_Swap(path, model.get_submodule(parent_path), name, module, fused))
            inside.append(path)
            continue
        if tp_classes and isinstance(module, tp_classes):
            if tp_backend in ("cpp", "triton"):
                from fastflow.ops.tensor_product import _resolve

                _resolve(tp_backend, _device(model))  # an explicit backend without these ops raises here
            parent_path, _, name = path.rpartition(".")
            parent = model.get_submodule(parent_path)
            conv_reason = _mace_conv_reason(parent, name, module) if path else "not in a MACE block"
            flags = {}
            try:
                if not path:
                    raise TypeError(
                        "the model itself is the tensor product; use fastflow.nn.TensorProduct(model)"
                    )
                if conv_reason is None:
                    fused, flags = EdgeIndexTPConv(module, backend=tp_backend), {"conv_fusion": "fastflow"}
                else:
                    if tp_precision is None:
                        tp_precision = _tensor_product_precision(precision, tp_backend, _device(model))
                    fused = TensorProduct(module, backend=tp_backend, precision=tp_precision)
            except (TypeError, ValueError) as error:
                left_alone.append({"module": path, "class": type(module).__name__, "reason": str(error)})
                continue
            if conv_reason is not None and conv_reason != "not in a MACE block":
                left_alone.append(
                    {
                        "module": path,
                        "class": type(module).__name__,
                        "reason": f"convolution not fused ({conv_reason}); only its tensor product is swapped",
                    }
                )
            swaps.append(_Swap(path, parent, name, module, fused, flags))
            inside.append(path)
            continue
        if path and _is_mace_symmetric_contraction(module):
            parent_path, _, name = path.rpartition(".")
            reason = unsupported_reason(module)
            try:
                fused = (
                    SymmetricContraction(
                        module, backend=tp_backend if tp_backend in ("cpp", "triton") else "auto"
                    )
                    if reason is None
                    else None
                )
            except (TypeError, ValueError) as error:
                reason = str(error)
            if reason is not None:
                left_alone.append({"module": path, "class": type(module).__name__, "reason": reason})
            else:
                swaps.append(_Swap(path, model.get_submodule(parent_path), name, module, fused))
            inside.append(path)
            continue
        kind = _FUSABLE.get(type(module).__name__)
        if kind is None:
            continue
        reason = _unsupported_reason(module, kind)
        if reason is not None:
            left_alone.append({"module": path, "class": type(module).__name__, "reason": reason})
            continue
        parent_path, _, name = path.rpartition(".")
        parent = model.get_submodule(parent_path)
        if kind == "layer":
            fused = FusedSemlaLayer(module, backend=backend, precision=precision)
        elif kind == "feed_forward":
            fused = FusedNodeFeedForward(module, precision=precision)
        else:
            fused = FusedBondRefine(module)
        swaps.append(_Swap(path, parent, name, module, fused))
        inside.append(path)
    return swaps, left_alone


def _tensor_product_precision(precision: str, tp_backend: str, device: torch.device) -> str:
    """The swapped tensor products' precision: tf32 / bf16 where they run on Triton (on CPUs the C++ kernels
    compute in float32, as the report says)."""
    if precision == "fp32" or tp_backend not in ("auto", "triton"):
        return "fp32"
    from fastflow.ops.tensor_product import _resolve

    return precision if _resolve(tp_backend, device) == "triton" else "fp32"


def _is_nequip_tp_scatter(module: nn.Module, tp_classes: tuple[type, ...]) -> bool:
    """NequIP's own TensorProductScatter (tp(x[edge_src], edge_attr, edge_weight), scatter-sum to edge_dst) around an
    e3nn tensor product; not its OpenEquivariance / cuEquivariance subclasses, which fuse already."""
    cls = type(module)
    return (
        cls.__name__ == "TensorProductScatter"
        and cls.__module__.startswith("nequip.")
        and bool(tp_classes)
        and isinstance(getattr(module, "tp", None), tp_classes)
    )


def _is_mace_symmetric_contraction(module: nn.Module) -> bool:
    """MACE's product-basis ``SymmetricContraction`` (not its cuEquivariance wrapper, which fuses already)."""
    cls = type(module)
    return cls.__name__ == "SymmetricContraction" and cls.__module__.startswith("mace.")


def _mace_conv_reason(parent: nn.Module, name: str, module: nn.Module) -> str | None:
    """None if ``module`` is the ``conv_tp`` of a MACE interaction block whose forward calls
    ``conv_tp(node_feats, edge_attrs, tp_weights, edge_index)`` when the block has ``conv_fusion`` (gather, product
    with per-edge weights and scatter-sum in one call); else why not ("not in a MACE block" for any other module)."""
    interaction = any(
        cls.__name__ == "InteractionBlock" and cls.__module__.startswith("mace.")
        for cls in type(parent).__mro__
    )
    if not interaction or name != "conv_tp":
        return "not in a MACE block"
    if "conv_fusion" not in type(parent).forward.__code__.co_consts:
        return f"{type(parent).__name__}.forward has no conv_fusion branch"
    if hasattr(parent, "conv_fusion"):
        return f"the block already fuses its convolution (conv_fusion={parent.conv_fusion!r})"
    if getattr(module, "shared_weights", True) or getattr(module, "internal_weights", True):
        return "its weights are not per edge"
    return None


def _plan_forward(model: nn.Module, backend: str, swaps: list[_Swap], left_alone: list[dict]):
    """The fused generator forward for fastflow's ``Semla`` (its pair tail as one ``fastflow::bond_head``), or None;
    a generator that cannot take it is listed in ``left_alone`` with the reason. With it, the first layer's fused
    stand-in embeds the raw edge input itself (``edge_in_proj`` inside ``fastflow::semla_attention``)."""
    if type(model).__name__ not in ("Semla", "SemlaGenerator"):
        return None
    reason = None
    if not isinstance(model, Semla):
        reason = (
            "the fused pair tail needs fastflow's Semla forward; upstream's generator keeps its unfused tail"
        )
    elif backend == "reference":
        reason = "the reference backend has no fused fastflow::bond_head; the pair tail runs unfused"
    else:
        head = model.edge_out_proj
        if not (isinstance(head, nn.Sequential) and len(head) == 3 and isinstance(head[1], nn.SiLU)):
            reason = "the bond head is not Linear → SiLU → Linear"
    if reason is not None:
        left_alone.append({"module": "(forward)", "class": type(model).__name__, "reason": reason})
        return None
    first = next((swap.fused for swap in swaps if swap.original is model.dynamics.layers[0]), None)
    embedding = model.edge_in_proj
    if not isinstance(first, FusedSemlaLayer):
        left_alone.append(
            {"module": "edge_in_proj", "class": "Sequential", "reason": "the first layer is not fused"}
        )
    elif not (
        isinstance(embedding, nn.Sequential) and len(embedding) == 3 and isinstance(embedding[1], nn.SiLU)
    ):
        left_alone.append(
            {
                "module": "edge_in_proj",
                "class": type(embedding).__name__,
                "reason": "not Linear → SiLU → Linear",
            }
        )
    else:
        first.embed_edges_with(embedding)
    return types.MethodType(fused_semla_forward, model)


def _unsupported_reason(module: nn.Module, kind: str) -> str | None:
    """Why ``module`` does not have the structure the fused module reads, or None."""
    try:
        if kind == "bond_refine":
            M = module.node_proj.out_features
            if module.message_mlp[0].in_features != 2 * M + 2 + module.edge_norm.normalized_shape[0]:
                return "message MLP input is not [m_i, m_j, |x_i - x_j|², x_i·x_j, LN(e_ij)]"
            return None
        if kind == "feed_forward":
            ff = module
            width = ff.equivariant_mlp.attn_proj.weight.shape
            if ff.invariant_mlp.node_ff[0].in_features != ff.node_norm.normalized_shape[0] + width[0]:
                return "invariant MLP input is not [h, |X_s|]"
            return None
        messages, coord_attn = module.message_ff, module.coord_attn
        M, S, H = messages.node_proj.out_features, module.n_coord_sets, module.n_attn_heads
        E_in, E_out = module.d_edge_in or 0, module.d_edge_out or 0
        first, second = messages.message_mlp[0], messages.message_mlp[2]
        if first.in_features != 2 * M + S + E_in:
            return f"message MLP reads {first.in_features} features, expected 2·{M} + {S} + {E_in}"
        if second.out_features != H + S + E_out:
            return f"message MLP writes {second.out_features} channels, expected {H} + {S} + {E_out}"
        if coord_attn.coord_proj.weight.shape != (S, S) or coord_attn.attn_proj.weight.shape != (S, S):
            return "coordinate attention projects to a different number of sets"
        if module.node_attn.in_proj.out_features != module.node_attn.d_model:
            return "node attention width differs from d_model"
        if getattr(messages.coord_norm, "norm", "none") not in (None, "none"):
            return "message coordinates are not centred-only"
    except (AttributeError, IndexError, TypeError) as error:
        return f"unexpected structure ({error})"
    return None


def _device(model: nn.Module) -> torch.device:
    return next(itertools.chain(model.parameters(), model.buffers()), torch.zeros(())).device
