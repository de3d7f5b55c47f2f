"""MACE's ``SymmetricContraction`` on ``fastflow::symmetric_contraction`` (fastflow.ops.symmetric_contraction).

``SymmetricContraction(mace_module)`` adopts the MACE module's children (its ``contractions``: weights and U
buffers, same objects under the same names, so the state dict is unchanged) and evaluates ``forward(x, y)`` with
x ``[N, C, I]`` and y the one-hot node attributes ``[N, E]`` as one fused op. The sparse plan of the U tensors is
built once (non-persistent buffers, they follow ``.to()``); the per-element term coefficients are one small matmul of
the weights per call, so gradients reach the weights (training) and x (forces).

Node attributes that are not one-hot (any MACE model's are) run the original module. ``torch.jit.script`` compiles
the original MACE module in its place (``__prepare_scriptable__``).
"""

from __future__ import annotations

import torch
from torch import nn

from fastflow.ops.symmetric_contraction import build_plan, contraction_coefficients, symmetric_contraction


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
        weights_max = module.contractions[0].weights_max
        in_dim = module.contractions[0].U_tensors(1).shape[-2]
        plan = build_plan(_u_blocks(module), in_dim)
        self.out_dims, self.q_offsets, self.k_offsets = plan.out_dims, plan.q_offsets, plan.k_offsets
        device = weights_max.device
        self.register_buffer("monomials", plan.monomials.to(device), persistent=False)
        self.register_buffer("terms", plan.terms.to(device), persistent=False)
        self.register_buffer("u", plan.u.to(device, weights_max.dtype), persistent=False)

    @property
    def original(self) -> nn.Module:
        return self._original[0]

    def weights(self) -> torch.Tensor:
        """All weights ``[E, K, C]`` in the plan's column order."""
        return torch.cat([w for c in self.contractions for w in [c.weights_max, *c.weights]], 1)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if y.dim() != 2 or not bool(((y == 0) | (y == 1)).all() & (y.sum(1) == 1).all()):
            return self.original(x, y)  # not one-hot: MACE's own contraction
        weights = self.weights()
        coeffs = contraction_coefficients(self.u.to(weights.dtype), weights, self.q_offsets, self.k_offsets)
        elements = y.argmax(1)
        return symmetric_contraction(
            x, elements, coeffs.to(x.dtype), self.monomials, self.terms, self.out_dims, backend=self.backend
        )

    def __prepare_scriptable__(self):
        """torch.jit.script compiles MACE's own module in this one's place."""
        return self.original

    def extra_repr(self) -> str:
        return f"{self.irreps_in} -> {self.irreps_out}, terms={self.terms.size(0)}, backend={self.backend!r}"
