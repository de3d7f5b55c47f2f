"""Token vocabularies shared by the model, the sampler and the chemistry code (SemlaFlow's, index for index).

Index 0 is ``<PAD>`` and 1 is ``<MASK>`` so that checkpoints trained upstream read the same logits.
"""

ATOM_VOCAB: tuple[str, ...] = (
    "<PAD>",
    "<MASK>",
    "H",
    "C",
    "N",
    "O",
    "F",
    "P",
    "S",
    "Cl",
    "Br",
    "B",
    "Al",
    "Si",
    "As",
    "I",
    "Hg",
    "Bi",
)
ATOM_INDEX: dict[str, int] = {symbol: i for i, symbol in enumerate(ATOM_VOCAB)}
N_ATOM_TYPES = len(ATOM_VOCAB)  # V = 18

# Bond classes: 0 none, 1 single, 2 double, 3 triple, 4 aromatic.
BOND_ORDERS: tuple[float, ...] = (0.0, 1.0, 2.0, 3.0, 1.5)
N_BOND_TYPES = len(BOND_ORDERS)  # K_b = 5

# Charge class index -> formal charge, as upstream: {0:0, 1:+1, 2:+2, 3:+3, 4:-1, 5:-2, 6:-3}.
CHARGES: tuple[int, ...] = (0, 1, 2, 3, -1, -2, -3)
CHARGE_INDEX: dict[int, int] = {charge: i for i, charge in enumerate(CHARGES)}
N_CHARGE_TYPES = len(CHARGES)  # 7

# Dataset coordinate standard deviations (Å) used to scale coordinates to unit variance.
QM9_COORD_STD = 1.723299503326416
GEOM_COORD_STD = 2.407038688659668
