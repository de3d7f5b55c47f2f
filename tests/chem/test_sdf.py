import numpy as np
import pytest

from fastflow.chem import read_sdf, write_sdf

from .helpers import cdk2_mols


def test_round_trip(tmp_path):
    mols = list(cdk2_mols()[:5])
    path = tmp_path / "out.sdf"
    n = write_sdf(path, mols[:2] + [None] + mols[2:], props=[{"score": i} for i in range(6)])
    assert n == 5
    back = read_sdf(path)
    assert len(back) == 5
    for original, read, index in zip(mols, back, [0, 1, 3, 4, 5]):
        assert [a.GetSymbol() for a in read.GetAtoms()] == [a.GetSymbol() for a in original.GetAtoms()]
        np.testing.assert_allclose(
            read.GetConformer().GetPositions(), original.GetConformer().GetPositions(), atol=1e-4
        )
        assert read.GetIntProp("fastflow_index") == index
        assert read.GetProp("score") == str(index)
    assert not original.HasProp("fastflow_index")  # the caller's molecules are not touched
    assert [p.name for p in tmp_path.iterdir()] == ["out.sdf"]


def test_failed_write_leaves_old_file_and_no_temp(tmp_path):
    path = tmp_path / "out.sdf"
    path.write_text("old")
    with pytest.raises(TypeError, match=r"mols\[1\] must be an RDKit Mol"):
        write_sdf(path, [cdk2_mols()[0], "not a molecule"])
    assert path.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["out.sdf"]


def test_props_length_checked(tmp_path):
    with pytest.raises(ValueError, match="one entry per molecule"):
        write_sdf(tmp_path / "x.sdf", [cdk2_mols()[0]], props=[])


def test_read_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError):
        read_sdf(tmp_path / "missing.sdf")
