"""TPDescriptor: built from e3nn modules, hashable and cached, refusing what it cannot describe with clear errors."""

import pytest
import torch
from e3nn import o3

from fastflow.tp import Instruction, TPDescriptor, parse_irreps

from .common import random_tensor_product, seed_of


def test_from_e3nn_reads_irreps_instructions_and_sizes():
    tp = o3.FullyConnectedTensorProduct("3x0e+2x1o", "1x0e+1x1o", "4x0e+2x1o+1x1e", _optimize_einsums=False)
    d = TPDescriptor.from_e3nn(tp)
    assert (d.irreps_in1, d.irreps_in2, d.irreps_out) == ("3x0e+2x1o", "1x0e+1x1o", "4x0e+2x1o+1x1e")
    assert [(i.i_in1, i.i_in2, i.i_out, i.mode, i.has_weight) for i in d.instructions] == [
        (i.i_in1, i.i_in2, i.i_out, i.connection_mode, i.has_weight) for i in tp.instructions
    ]
    assert [i.path_weight for i in d.instructions] == [i.path_weight for i in tp.instructions]
    assert (d.dim_in1, d.dim_in2, d.dim_out, d.weight_numel) == (9, 4, 13, tp.weight_numel)
    assert d.weight_shapes() == tuple(i.path_shape for i in tp.instructions)


def test_hashable_equal_for_equal_products_and_tensors_cached():
    def make():
        return o3.FullyConnectedTensorProduct("2x0e+1x1o", "1x1o", "1x0e+2x1o", _optimize_einsums=False)

    a, b = TPDescriptor.from_e3nn(make()), TPDescriptor.from_e3nn(make())
    assert a == b and hash(a) == hash(b) and len({a, b}) == 1
    assert a.tensors(torch.float32) is b.tensors(
        torch.float32
    )  # one cache entry per (descriptor, dtype, device)
    assert a.tensors(torch.float64) is not a.tensors(torch.float32)
    paths, cg_index, cg_value, cg_offsets = a.tensors(torch.float64)
    assert (
        paths.dtype == cg_index.dtype == cg_offsets.dtype == torch.int64 and cg_value.dtype == torch.float64
    )
    assert paths.shape[1] == 12 and cg_offsets[-1] == len(cg_value) == len(cg_index)
    other = TPDescriptor.from_e3nn(
        o3.FullyConnectedTensorProduct("2x0e+1x1o", "1x1o", "1x0e+2x1o", irrep_normalization="norm")
    )
    assert other != a


def test_mul_zero_blocks_keep_indices_and_weight_offsets():
    tp = o3.TensorProduct("0x1e+2x1o", "1x1o", "0x0o+2x0e", [(0, 0, 0, "uvw", True), (1, 0, 1, "uvw", True)])
    d = TPDescriptor.from_e3nn(tp)
    paths = d.tensors()[0]
    assert len(paths) == 1 and paths[0, 10] == 0  # the empty path emits nothing, weight offset unaffected
    x1, x2, w = torch.randn(3, 6), torch.randn(3, 3), torch.randn(tp.weight_numel)
    from fastflow.ops.tensor_product import tensor_product

    torch.testing.assert_close(
        tensor_product(x1, x2, w, *d.tensors(), d.dim_out, backend="reference"), tp(x1, x2, w)
    )


def test_parse_irreps():
    assert parse_irreps("32x0e + 1o+2x2y") == ((32, 0, 1), (1, 1, -1), (2, 2, 1))
    assert parse_irreps("") == ()
    assert parse_irreps(o3.Irreps("2x1e+0x3o")) == ((2, 1, 1), (0, 3, -1))
    with pytest.raises(ValueError, match="cannot parse irrep '2x1q'"):
        parse_irreps("1x0e+2x1q")


def test_unsupported_modes_and_modules_are_refused_by_name():
    full = o3.FullTensorProduct("2x1o", "2x1o")  # mode uvuv
    with pytest.raises(
        ValueError, match="connection mode 'uvuv' is not supported; supported modes: uvw, uvu"
    ):
        TPDescriptor.from_e3nn(full)
    with pytest.raises(TypeError, match="TensorSquare overrides TensorProduct.forward"):
        TPDescriptor.from_e3nn(o3.TensorSquare("2x1o"))
    with pytest.raises(TypeError, match="expected an e3nn.o3.TensorProduct, got Linear"):
        TPDescriptor.from_e3nn(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="'u<vw' is not supported"):
        TPDescriptor.create("2x0e", "2x0e", "1x0e", [(0, 0, 0, "u<vw", True)])


def test_inconsistent_instructions_are_refused():
    with pytest.raises(ValueError, match=r"parity 1 x 1 cannot give -1"):
        TPDescriptor("1x0e", "1x0e", "1x0o", (Instruction(0, 0, 0, "uvw", True, 1.0),))
    with pytest.raises(ValueError, match=r"l_out = 3 is outside \|1 - 1\| .. 2"):
        TPDescriptor("1x1o", "1x1o", "1x3e", (Instruction(0, 0, 0, "uvw", True, 1.0),))
    with pytest.raises(ValueError, match="mode uvu needs mul_in1 == mul_out"):
        TPDescriptor("2x0e", "1x0e", "3x0e", (Instruction(0, 0, 0, "uvu", True, 1.0),))
    with pytest.raises(ValueError, match="refers to block 2 of irreps_in2"):
        TPDescriptor("2x0e", "1x0e", "2x0e", (Instruction(0, 2, 0, "uvu", True, 1.0),))
    with pytest.raises(ValueError, match="mode uvw needs weights"):
        TPDescriptor("2x0e", "1x0e", "2x0e", (Instruction(0, 0, 0, "uvw", False, 1.0),))
    with pytest.raises(ValueError, match="irrep_normalization must be one of"):
        TPDescriptor.create("1x0e", "1x0e", "1x0e", [(0, 0, 0, "uvw", True)], irrep_normalization="unit")


def test_irrep_normalization_none_is_just_path_weights():
    tp = random_tensor_product("uvu", seed_of("none"), irrep_normalization="none", path_normalization="none")
    d = TPDescriptor.from_e3nn(tp)
    assert all(i.path_weight == pytest.approx(1.0) for i in d.instructions)
