"""The matrix-product precision of fused modules: float32, or bfloat16 operands on the invariant path.

Mixed-precision design (``patch_model(model, precision="bf16")``): the GEMMs of the invariant path take
bfloat16 operands with float32 accumulation — the node feed-forward, the message projections and the per-atom
halves of the message MLP's first linear, the attention's value and output projections, and inside
``fastflow::semla_attention`` the product of the message MLP's second linear (over all pairs). Everything that
carries geometry stays float32: coordinates and coordinate sets, their projections, the Gram and distance
terms, norms, softmax statistics, the sampler's state and the cache history. Activations enter and leave each
bf16 GEMM as float32, so the residual stream is float32 throughout.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fastflow.memo import TensorMemo
from fastflow.ops.backends import PRECISIONS


class MatmulPrecision:
    """Runs a module's linears in one precision; for "bf16" it holds bfloat16 copies of their parameters.

    The copies are cast once and recast when a parameter changes (its in-place version counter moves, or it is
    replaced), so inference pays no per-call cast of the weights. With autograd recording, or under torch.compile
    / export tracing, the cast happens per call instead (gradients reach the float32 parameters; the compiler
    sees a plain cast).
    """

    def __init__(self, precision: str = "fp32"):
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
        self.precision = precision
        self._copies = TensorMemo()

    def weight(self, param: torch.Tensor | None) -> torch.Tensor | None:
        """``param`` in the GEMM operand dtype (bfloat16 for "bf16", else itself)."""
        if param is None or self.precision != "bf16":
            return param
        tracing = torch.compiler.is_compiling() or torch.compiler.is_exporting()
        if tracing or (torch.is_grad_enabled() and param.requires_grad):
            return param.to(torch.bfloat16)
        return self._copies.get((param,), lambda: param.detach().to(torch.bfloat16))

    def linear(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """x · Wᵀ + b. "bf16": bfloat16 operands, float32 accumulation (ATen's CPU bf16 GEMM runs on AMX or
        AVX512-BF16), the result back in x's dtype. ``weight`` may be a slice of a cached parameter's copy."""
        if self.precision != "bf16":
            return F.linear(x, weight, bias)
        return F.linear(x.to(torch.bfloat16), weight, bias).to(x.dtype)

    def __call__(self, x: torch.Tensor, layer: nn.Module) -> torch.Tensor:
        """Apply an ``nn.Linear``, or an ``nn.Sequential`` of linears and activations, in this precision. In bf16
        a sequential's hidden activations stay bfloat16 between its linears (one cast in, one out: per-linear
        casts cost 1.6x the whole chain's time at the semlaflow feed-forward's shape). SiLU runs in place on the
        linear's fresh output where autograd does not need it (a [3072, 512] feed-forward: 9.8 → 6.3 ms)."""
        bf16 = self.precision == "bf16"
        modules = layer if isinstance(layer, nn.Sequential) else (layer,)
        out = x.to(torch.bfloat16) if bf16 else x
        for module in modules:
            if isinstance(module, nn.Linear):
                out = F.linear(out, self.weight(module.weight), self.weight(module.bias))
            elif isinstance(module, nn.SiLU) and out is not x and not out.requires_grad:
                out = F.silu(out, inplace=True)
            else:
                out = module(out)
        return out.to(x.dtype) if bf16 else out

    def __deepcopy__(self, memo):
        return MatmulPrecision(self.precision)  # a copy's parameters are new objects: cast afresh

    def __repr__(self) -> str:
        return f"MatmulPrecision({self.precision!r})"
