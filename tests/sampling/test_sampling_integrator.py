import pytest
import torch

from fastflow.sampling import (
    FlowState,
    discrete_flow_probs,
    euler_coords,
    integrate_step,
    rng,
    sample_categorical,
)
from fastflow.sampling.prior import sample_prior


def direct_step_probs(c, p, t, dt, eta):
    """The uniform-noise CTMC step, one entry at a time, from the formula (upstream _uniform_sample_step)."""
    K = len(p)
    t = min(max(t, 1e-5), 1 - 1e-5)
    eta = eta if t + dt < 1 else 0.0
    out = [
        min(1.0, dt * p[k] * (1 + 2 * eta * (K - 1) * t) / (1 - t) + dt * eta * p[c]) if k != c else 0.0
        for k in range(K)
    ]
    out[c] = max(0.0, 1.0 - sum(out))
    return out


@pytest.mark.parametrize(
    "t, dt, eta",
    [
        (0.0, 0.05, 1.0),
        (0.3, 0.1, 1.0),
        (0.7, 0.2, 0.5),
        (0.95, 0.06, 1.0),
        (0.99, 0.01, 1.0),
        (0.5, 0.3, 2.0),
    ],
)
def test_step_probs_match_formula(t, dt, eta):
    g = torch.Generator().manual_seed(0)
    probs = torch.softmax(3 * torch.randn(2, 4, 5, generator=g, dtype=torch.float64), -1)
    classes = torch.randint(0, 5, (2, 4), generator=g)
    got = discrete_flow_probs(classes, probs, torch.full((2,), t, dtype=torch.float64), dt, eta)
    for b in range(2):
        for i in range(4):
            expected = direct_step_probs(int(classes[b, i]), probs[b, i].tolist(), t, dt, eta)
            assert got[b, i].tolist() == pytest.approx(expected, abs=1e-12)


def test_step_probs_clamp_and_stay():
    # A huge step: off-diagonal entries clamp at 1 and staying becomes impossible.
    probs = torch.tensor([[[0.1, 0.6, 0.3]]])
    got = discrete_flow_probs(torch.tensor([[0]]), probs, torch.tensor([0.5]), 0.9, 1.0)
    assert got[0, 0].tolist() == pytest.approx([0.0, 1.0, 0.54])  # η = 0 as t + Δt ≥ 1


def test_sample_categorical_is_inverse_cdf():
    weights = torch.tensor([[0.0, 2.0, 0.0, 1.0, 1.0]]).expand(5, 5)
    u = torch.tensor([0.0, 0.49, 0.5, 0.74, 0.99])
    assert sample_categorical(weights, u).tolist() == [1, 1, 3, 3, 4]  # zero-weight classes never picked


def test_empirical_transitions_match_step_probs():
    n_mol, n_atoms, K, dt = 4000, 2, 6, 0.15
    keys = rng.molecule_keys(7, torch.arange(n_mol))
    probs = torch.softmax(torch.tensor([0.5, 2.0, -1.0, 0.0, 1.0, 0.3]), -1)
    classes = torch.tensor([1, 4]).expand(n_mol, n_atoms)
    t = torch.full((n_mol,), 0.4)
    step_probs = discrete_flow_probs(classes, probs.expand(n_mol, n_atoms, K), t, dt, 1.0)
    u = rng.uniform(rng.combine(rng.atom_keys(keys, n_atoms), 11))
    drawn = sample_categorical(step_probs, u)
    for a in range(n_atoms):
        expected = step_probs[0, a] / step_probs[0, a].sum()
        freq = torch.bincount(drawn[:, a], minlength=K).float() / n_mol
        sigma = (expected * (1 - expected) / n_mol).sqrt()
        assert ((freq - expected).abs() <= 5 * sigma + 1e-3).all(), (freq, expected)


def test_euler_coords():
    x = torch.randn(2, 3, 3)
    x1 = torch.randn(2, 3, 3)
    t = torch.tensor([0.2, 0.6])
    got = euler_coords(x, x1, t, 0.1)
    assert torch.allclose(got, x + 0.1 * (x1 - x) / (1 - t.view(-1, 1, 1)))


def test_integrate_step_keeps_padding_zero_and_advances_time():
    sizes = torch.tensor([3, 5])
    keys = rng.molecule_keys(0, torch.arange(2))
    coords, atomics, bonds, mask = sample_prior(keys, sizes, 6)
    state = FlowState(coords, atomics, bonds, mask, torch.zeros(2), 0, 4, torch.arange(2))
    grid = torch.tensor([0.0, 0.25, 0.5, 0.75, 1.0], dtype=torch.float64)
    type_logits, bond_logits = torch.randn(2, 6, 18), torch.randn(2, 6, 6, 5)
    new, type_probs, bond_probs = integrate_step(
        state, torch.randn(2, 6, 3), type_logits, bond_logits, grid, 1.0, keys
    )
    pair_mask = mask.unsqueeze(-1) & mask.unsqueeze(-2)
    assert new.step == 1 and torch.equal(new.t, torch.full((2,), 0.25))
    assert (new.coords[~mask] == 0).all() and torch.equal(new.atomics.sum(-1), mask.float())
    assert torch.equal(new.bonds.sum(-1), pair_mask.float())
    assert torch.allclose(type_probs, torch.softmax(type_logits, -1) * mask[..., None], atol=1e-6)
    assert torch.allclose(bond_probs, torch.softmax(bond_logits, -1) * pair_mask[..., None], atol=1e-6)
