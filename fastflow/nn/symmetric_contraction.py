"""MACE's ``SymmetricContraction`` on ``fastflow::symmetric_contraction`` (fastflow.ops.symmetric_contraction).

``SymmetricContraction(mace_module)`` adopts the MACE module's children (its ``contractions``: weights and U
buffers, same objects under the same names, so the state dict is unchanged) and evaluates ``forward(x, y)`` with
x ``[N, C, I]`` and y the one-hot node attributes ``[N, E]`` as one fused op. The sparse plan of the U tensors is
built once (non-persistent buffers, they follow ``.to()``); the per-element term coefficients are one small matmul of
the weights per call, so gradients reach the weights (training) and x (forces).

Node attributes that are not one-hot (any MACE model's are) raise: the fused op evaluates one element's polynomial
per node. The plan is rebuilt if a U buffer changes in place (``load_state_dict``). ``torch.jit.script`` compiles
``_ScriptedSymmetricContraction`` in its place (``__prepare_scriptable__``): the same children and plan buffers,
forward calling the C++ op directly, so a scripted patched MACE runs the fused contraction; a process that loads the
TorchScript file must ``import fastflow`` (the op's autograd is registered there).
"""

from __future__ import annotations

import torch
from torch import nn

from fastflow.nn.tensor_product import _adopt, _require_cpp_for_script
from fastflow.ops.symmetric_contraction import (
    build_plan,
    contraction_coefficients,
    cpp_unavailable_reason,
    symmetric_contraction,
)


def unsupported_reason(module: nn.Module) -> str | None:
    """Why ``module`` is not a MACE ``SymmetricContraction`` this module can run, or None."""
    if type(module).__name__ != "SymmetricContraction":
        return f"{type(module).__name__} is not a SymmetricContraction"
    contractions = getattr(module, "contractions", None)
    if not isinstance(contractions, nn.ModuleList) or len(contractions) == 0:
        return "no contractions ModuleList"
    for index, contraction in enumerate(contractions):
        for attribute in ("correlation", "weights_max", "weights", "U_tensors"):
            if not hasattr(contraction, attribute):
                return f"contractions[{index}] has no {attribute}"
        if len(contraction.weights) != contraction.correlation - 1:
            return f"contractions[{index}] has {len(contraction.weights)} lower-order weights, expected ν - 1"
        if contraction.weights_max.dim() != 3:
            return f"contractions[{index}].weights_max is not [elements, K, channels] (element-dependent weights)"
    return None


def _u_blocks(module: nn.Module) -> list[list[torch.Tensor]]:
    """Per output irrep, its U tensors ``[d_o, I, …, I, K]`` from ν = correlation down to 1 (its weight order)."""
    blocks = []
    for contraction in module.contractions:
        block = []
        for nu in range(contraction.correlation, 0, -1):
            U = contraction.U_tensors(nu)
            if U.dim() == nu + 1:  # scalar outputs: MACE squeezes the d_o = 1 axis
                U = U.unsqueeze(0)
            block.append(U)
        blocks.append(block)
    return blocks


class SymmetricContraction(nn.Module):
    """A MACE ``SymmetricContraction`` as one fused op (see the module docstring)."""

    def __init__(self, module: nn.Module, backend: str = "auto"):
        super().__init__()
        reason = unsupported_reason(module)
        if reason is not None:
            raise TypeError(f"SymmetricContraction: cannot fuse this module: {reason}")
        self.contractions = module.contractions  # same object: state_dict keys and values unchanged
        self._original = [module]  # a list: not a child (its parameters are ours already)
        self.backend = backend
        self.irreps_in, self.irreps_out = (
            getattr(module, "irreps_in", None),
            getattr(module, "irreps_out", None),
        )
        self.num_elements = int(module.contractions[0].weights_max.size(0))
        self._refresh_plan()

    def _u_key(self) -> tuple:
        return tuple((id(U), U._version) for block in _u_blocks(self) for U in block)

    def _refresh_plan(self) -> None:
        """(Re)build the plan from the U buffers as they are now."""
        weights_max = self.contractions[0].weights_max
        in_dim = self.contractions[0].U_tensors(1).shape[-2]
        plan = build_plan(_u_blocks(self), in_dim)
        self.out_dims, self.q_offsets, self.k_offsets = plan.out_dims, plan.q_offsets, plan.k_offsets
        device = weights_max.device
        self.register_buffer("monomials", plan.monomials.to(device), persistent=False)
        self.register_buffer("terms", plan.terms.to(device), persistent=False)
        self.register_buffer("u", plan.u.to(device, weights_max.dtype), persistent=False)
        self._plan_key = self._u_key()

    @property
    def original(self) -> nn.Module:
        return self._original[0]

    def weights(self) -> torch.Tensor:
        """All weights ``[E, K, C]`` in the plan's column order."""
        return torch.cat([w for c in self.contractions for w in [c.weights_max, *c.weights]], 1)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        compiling = torch.compiler.is_compiling()
        if not compiling and self._u_key() != self._plan_key:
            self._refresh_plan()
        elements = y.argmax(1) if compiling else one_hot_elements(y, self.num_elements)
        weights = self.weights()
        coeffs = contraction_coefficients(self.u.to(weights.dtype), weights, self.q_offsets, self.k_offsets)
        return symmetric_contraction(
            x, elements, coeffs.to(x.dtype), self.monomials, self.terms, self.out_dims, backend=self.backend
        )

    def __prepare_scriptable__(self):
        """What torch.jit.script compiles in its place (see _ScriptedSymmetricContraction)."""
        return _ScriptedSymmetricContraction(self)

    def extra_repr(self) -> str:
        return f"{self.irreps_in} -> {self.irreps_out}, terms={self.terms.size(0)}, backend={self.backend!r}"


def one_hot_elements(node_attrs: torch.Tensor, num_elements: int) -> torch.Tensor:
    """Element indices ``[N]`` (int64) of one-hot node attributes ``[N, num_elements]``; anything else raises
    (TorchScript-compatible: the scripted module calls it too)."""
    if node_attrs.dim() != 2 or node_attrs.size(1) != num_elements:
        raise ValueError(
            "SymmetricContraction: node_attrs must be [N, "
            + str(num_elements)
            + "] one-hot element attributes, got shape "
            + str(node_attrs.shape)
        )
    elements = node_attrs.argmax(1)
    if node_attrs.size(0) > 0:
        hot = node_attrs.gather(1, elements.unsqueeze(1))
        if not bool((hot == 1).all() & (node_attrs.sum(1) == 1).all() & (node_attrs >= 0).all()):
            raise ValueError(
                "SymmetricContraction: node_attrs must be one-hot (one 1 per row, zeros elsewhere): the fused op "
                "evaluates one element's weights per node"
            )
    return elements


class _ScriptedSymmetricContraction(nn.Module):
    """SymmetricContraction for TorchScript: the same children and plan buffers, forward =
    torch.ops.fastflow.symmetric_contraction (its C++ checks; autograd through the formula fastflow registers)."""

    def __init__(self, fused: SymmetricContraction):
        super().__init__()
        from fastflow.ops.symmetric_contraction import _cpp_op

        _require_cpp_for_script(fused, cpp_unavailable_reason, _cpp_op)
        if fused._u_key() != fused._plan_key:
            fused._refresh_plan()
        _adopt(self, fused)
        self.num_elements: int = fused.num_elements
        self.out_dims: list[int] = list(fused.out_dims)
        self.q_offsets: list[int] = list(fused.q_offsets)
        self.k_offsets: list[int] = list(fused.k_offsets)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        elements = one_hot_elements(y, self.num_elements)
        weights: list[torch.Tensor] = []
        for contraction in self.contractions:
            weights.append(contraction.weights_max)
            for w in contraction.weights:
                weights.append(w)
        stacked = torch.cat(weights, 1)
        coeffs = contraction_coefficients(self.u.to(stacked.dtype), stacked, self.q_offsets, self.k_offsets)
        return torch.ops.fastflow.symmetric_contraction(
            x.contiguous(), elements, coeffs.contiguous(), self.monomials, self.terms, self.out_dims
        )
