"""tl.dot in one of fastflow's precisions, shared by the kernels that have tf32 / bf16 variants."""

import triton
import triton.language as tl


@triton.jit
def dot(x, y, acc, PRECISION: tl.constexpr):
    """acc + x · y. PRECISION: "ieee" (exact float32 / float64 products), "tf32" (TF32 tensor cores), or "bf16"
    (both operands rounded to bfloat16, float32 accumulation)."""
    # if / else, not an early return: Triton compiles the statements after a return in a constexpr branch too
    if PRECISION == "bf16":
        out = tl.dot(x.to(tl.bfloat16), y.to(tl.bfloat16), acc, out_dtype=tl.float32)
    else:
        out = tl.dot(x, y, acc, input_precision=PRECISION)
    return out
