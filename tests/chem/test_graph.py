import pytest
import torch

from fastflow.chem import N_ATOM_TYPES, N_BOND_TYPES, N_CHARGE_TYPES, MolGraph

from .helpers import star


def _fields(n=3):
    return dict(
        coords=torch.zeros(n, 3),
        atom_types=torch.full((n,), 3),
        bond_types=torch.zeros(n, n, dtype=torch.long),
        charges=torch.zeros(n, dtype=torch.long),
    )


def test_valid_graph():
    g = MolGraph(**_fields())
    assert g.n_atoms == 3


@pytest.mark.parametrize(
    "field, value, error, match",
    [
        ("coords", torch.zeros(3, 2), ValueError, r"coords must have shape \(3, 3\), got \(3, 2\)"),
        ("coords", torch.zeros(3, 3, dtype=torch.long), TypeError, "coords must be a floating point"),
        ("coords", torch.tensor([[0.0, 0, 0], [float("nan"), 0, 0], [0, 0, 0]]), ValueError, "NaN or inf"),
        ("coords", torch.tensor([[0.0, 0, 0], [float("inf"), 0, 0], [0, 0, 0]]), ValueError, "NaN or inf"),
        ("coords", [[0.0] * 3] * 3, TypeError, "coords must be a torch.Tensor"),
        ("atom_types", torch.full((3,), 3.0), TypeError, "atom_types must be a torch.long"),
        ("atom_types", torch.full((3, 1), 3), ValueError, r"atom_types must be a tensor of shape \(n,\)"),
        (
            "atom_types",
            torch.full((3,), N_ATOM_TYPES),
            ValueError,
            r"atom_types values must lie in \[0, 18\)",
        ),
        (
            "bond_types",
            torch.zeros(3, 2, dtype=torch.long),
            ValueError,
            r"bond_types must have shape \(3, 3\)",
        ),
        ("bond_types", torch.full((3, 3), N_BOND_TYPES), ValueError, "bond_types values must lie"),
        ("bond_types", torch.zeros(3, 3, dtype=torch.int32), TypeError, "bond_types must be a torch.long"),
        ("charges", torch.zeros(4, dtype=torch.long), ValueError, r"charges must have shape \(3,\)"),
        ("charges", torch.full((3,), -1), ValueError, "charges values must lie"),
        ("charges", torch.full((3,), N_CHARGE_TYPES), ValueError, "charges values must lie"),
    ],
)
def test_bad_inputs_raise_clear_errors(field, value, error, match):
    fields = _fields()
    fields[field] = value
    with pytest.raises(error, match=match):
        MolGraph(**fields)


def test_empty_graph_raises():
    with pytest.raises(ValueError, match="at least one atom"):
        MolGraph(**_fields(0))


def test_from_predictions_argmaxes_and_reads_lower_triangle():
    n = 4
    atom_scores = torch.randn(n, N_ATOM_TYPES)
    charge_scores = torch.randn(n, N_CHARGE_TYPES)
    bond_scores = torch.zeros(n, n, N_BOND_TYPES)
    bond_scores[..., 0] = 1.0  # no bond everywhere ...
    bond_scores[1, 0, 2] = 5.0  # ... but double in the lower triangle
    bond_scores[0, 1, 1] = 9.0  # ... contradicted by single in the upper triangle (ignored)
    bond_scores[0, 2, 3] = 9.0  # upper triangle only: ignored
    g = MolGraph.from_predictions(torch.randn(n, 3), atom_scores, bond_scores, charge_scores)
    assert torch.equal(g.atom_types, atom_scores.argmax(-1))
    assert torch.equal(g.charges, charge_scores.argmax(-1))
    expected = torch.zeros(n, n, dtype=torch.long)
    expected[1, 0] = expected[0, 1] = 2
    assert torch.equal(g.bond_types, expected)


def test_from_predictions_checks_dimensions():
    with pytest.raises(ValueError, match="bond_scores must have 3 dimensions"):
        MolGraph.from_predictions(torch.zeros(2, 3), torch.zeros(2, 18), torch.zeros(2, 2), torch.zeros(2, 7))


def test_to_rdkit_delegates_to_convert():
    mol = star("C", 4).to_rdkit()
    assert mol.GetNumAtoms() == 5 and mol.GetNumBonds() == 4
