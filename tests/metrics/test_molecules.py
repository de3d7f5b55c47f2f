import math

from rdkit import Chem

from fastflow.chem import ATOM_INDEX, graph_to_mol, mol_to_graph
from fastflow.metrics import canonical_smiles_set, is_valid, novelty, uniqueness, validity
from tests.chem.helpers import cdk2_mols, graph, star


def test_validity_counts_none_in_denominator():
    mols = list(cdk2_mols()[:3]) + [None]
    assert validity(mols) == 0.75
    assert validity(mols, connected=True) == 0.75


def test_two_fragments_valid_but_not_connected():
    methane_and_water = graph(
        ["C", "H", "H", "H", "H", "O", "H", "H"],
        {(1, 0): 1, (2, 0): 1, (3, 0): 1, (4, 0): 1, (6, 5): 1, (7, 5): 1},
    )
    mol = graph_to_mol(methane_and_water)
    assert is_valid(mol) and not is_valid(mol, connected=True)


def test_invalid_molecules():
    assert graph_to_mol(star("C", 5)) is None
    assert not is_valid(graph_to_mol(star("C", 5), sanitize=False))
    g = star("C", 4)
    g.atom_types[0] = ATOM_INDEX["<MASK>"]
    assert validity([graph_to_mol(g)]) == 0.0


def test_missing_hydrogen_is_filled_by_rdkit():
    # As upstream: atoms are built without NoImplicit, so sanitisation adds the missing H and CH3 "radical"
    # fragments count as valid.
    assert is_valid(graph_to_mol(star("C", 3)))


def test_uniqueness():
    mols = [graph_to_mol(mol_to_graph(m)) for m in cdk2_mols()[:4]]
    assert uniqueness(mols) == 1.0
    assert uniqueness(mols + mols[:2] + [None]) == 4 / 6
    assert math.isnan(uniqueness([None]))


def test_novelty_against_training_smiles():
    mols = [graph_to_mol(mol_to_graph(m)) for m in cdk2_mols()[:4]]
    # Training SMILES written differently (with stereo, explicit H) still match after canonicalisation.
    train = [Chem.MolToSmiles(m) for m in cdk2_mols()[:2]] + ["not a smiles"]
    assert novelty(mols, train) == 0.5
    assert novelty(mols + [mols[0], None], canonical_smiles_set(train)) == 2 / 5
    assert novelty(mols, []) == 1.0


def test_sanitize_failure_names_why():
    from fastflow.metrics.molecules import sanitize_failure

    masked = star("C", 4)
    masked.atom_types[0] = ATOM_INDEX["<MASK>"]
    ring5 = {(i, (i + 1) % 5): 4 for i in range(5)}  # an all-aromatic 5-ring of carbons: no Kekulé structure
    benzene = {(i, (i + 1) % 6): 4 for i in range(6)}
    cases = {
        "unbuildable": masked,
        "valence": star("C", 5),
        "aromatic_outside_ring": graph(["C", "C", "C"], {(0, 1): 4, (1, 2): 4}),
        "kekulize": graph(["C"] * 5 + ["H"] * 5, {**ring5, **{(i, i + 5): 1 for i in range(5)}}),
        None: graph(["C"] * 6 + ["H"] * 6, {**benzene, **{(i, i + 6): 1 for i in range(6)}}),
    }
    for expected, g in cases.items():
        assert sanitize_failure(g) == expected, expected
        assert is_valid(graph_to_mol(g)) == (expected is None)
