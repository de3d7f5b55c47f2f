"""e3nn-compatible tensor products: the descriptor (this package), the ops (fastflow.ops.tensor_product) and the
modules (fastflow.nn.TensorProduct, fastflow.nn.TPConv). Importing this package never imports e3nn."""

from fastflow.tp.descriptor import Instruction, Irrep, TPDescriptor, irreps_string, parse_irreps

__all__ = ["Instruction", "Irrep", "TPDescriptor", "irreps_string", "parse_irreps"]
