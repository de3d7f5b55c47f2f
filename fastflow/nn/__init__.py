"""Fused stand-ins for model modules: Semla layers (fastflow.nn.semla) and e3nn-compatible tensor products."""

from fastflow.nn.tensor_product import TensorProduct, TPConv

__all__ = ["TPConv", "TensorProduct"]
