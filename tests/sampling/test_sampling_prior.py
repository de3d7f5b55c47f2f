import math

import pytest
import torch

from fastflow.chem.vocab import N_ATOM_TYPES, N_BOND_TYPES
from fastflow.sampling import rng, sample_prior


def _prior(sizes, n_atoms=None, seed=0, indices=None, scale_ot=False):
    sizes = torch.tensor(sizes)
    indices = torch.arange(len(sizes)) if indices is None else torch.tensor(indices)
    keys = rng.molecule_keys(seed, indices)
    return sample_prior(keys, sizes, n_atoms or int(sizes.max()), scale_ot=scale_ot)


def test_shapes_padding_and_one_hots():
    coords, atomics, bonds, mask = _prior([3, 7, 5], n_atoms=9)
    assert coords.shape == (3, 9, 3) and atomics.shape == (3, 9, N_ATOM_TYPES)
    assert bonds.shape == (3, 9, 9, N_BOND_TYPES) and mask.shape == (3, 9) and mask.dtype == torch.bool
    assert mask.sum(1).tolist() == [3, 7, 5]
    pair_mask = mask.unsqueeze(-1) & mask.unsqueeze(-2)
    assert torch.equal(atomics.sum(-1), mask.float()) and torch.equal(bonds.sum(-1), pair_mask.float())
    assert (coords[~mask] == 0).all()


def test_zero_com_over_real_atoms():
    coords, _, _, mask = _prior([1, 4, 11], n_atoms=12)
    com = coords.sum(1) / mask.sum(1, keepdim=True)
    assert torch.allclose(com, torch.zeros_like(com), atol=1e-6)
    assert (coords[0, 0] == 0).all()  # a one-atom molecule sits at the origin


def test_prior_depends_only_on_seed_index_and_size():
    coords, atomics, bonds, _ = _prior([6], indices=[4])
    coords_p, atomics_p, bonds_p, _ = _prior([2, 6, 9], n_atoms=12, indices=[0, 4, 7])
    assert torch.equal(coords[0], coords_p[1, :6]) and torch.equal(atomics[0], atomics_p[1, :6])
    assert torch.equal(bonds[0], bonds_p[1, :6, :6])
    assert not torch.equal(_prior([6], seed=1)[0], _prior([6], seed=2)[0])


def test_categorical_prior_is_uniform_over_all_tokens_and_asymmetric():
    _, atomics, bonds, _ = _prior([20] * 500)
    type_counts = atomics.sum((0, 1))  # 10 000 atoms over 18 tokens, <PAD> and <MASK> included
    assert type_counts.min() > 0 and (type_counts - 10_000 / 18).abs().max() < 5 * math.sqrt(10_000 / 18)
    bond_counts = bonds.sum((0, 1, 2))
    assert (bond_counts - 200_000 / 5).abs().max() < 5 * math.sqrt(200_000 / 5)
    assert not torch.equal(bonds, bonds.transpose(1, 2))  # ordered pairs drawn independently (upstream quirk)


def test_gaussian_coordinates_statistics():
    coords, _, _, mask = _prior([50] * 200)
    x = coords[mask]
    # zero-CoM shrinks the variance by (n - 1) / n
    assert x.mean().abs() < 0.02 and x.var().item() == pytest.approx(49 / 50, abs=0.03)


def test_scale_ot_uses_each_molecules_own_size():
    plain = _prior([4, 15], seed=3)[0]
    scaled = _prior([4, 15], seed=3, scale_ot=True)[0]
    for b, n in enumerate([4, 15]):
        assert torch.allclose(scaled[b], plain[b] * 0.2 * math.log(n + 1), atol=1e-6)


def test_uniform_and_normal_keys():
    keys = rng.combine(123, torch.arange(100_000))
    u = rng.uniform(keys)
    assert u.dtype == torch.float32 and u.min() >= 0 and u.max() < 1 and abs(u.mean() - 0.5) < 0.01
    z = rng.normal(keys)
    assert torch.isfinite(z).all() and abs(z.mean()) < 0.02 and abs(z.std() - 1) < 0.02
    assert torch.equal(rng.uniform(keys), u)  # a pure function of the keys
