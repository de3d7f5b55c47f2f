"""The adaptive policy's error measures: error="sample" (where a forecast error changes the sample) and the former
error="relative", on hand-built forecasts and through the hook."""

import math
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from fastflow import CacheConfig, patch_model
from fastflow.cache.policies import relative_error, sample_error, sample_error_parts

SCALE = 1.7233  # Å per model unit, as the packaged model's coord_std


def outputs(sizes, N=None, V=6, K=5, C=3, seed=0, dtype=torch.float64):
    """Sampler-layout outputs with zero padding: x̂₁ [B,N,3], type [B,N,V], bond [B,N,N,K] (symmetric: no-bond
    ahead by 4 to 8 everywhere), charge [B,N,C] logits; and the bool mask."""
    g = torch.Generator().manual_seed(seed)
    B, N = len(sizes), N or max(sizes)
    mask = torch.arange(N) < torch.tensor(sizes)[:, None]
    coords = torch.randn(B, N, 3, generator=g, dtype=dtype)
    types = 3 * torch.randn(B, N, V, generator=g, dtype=dtype)
    bonds = torch.randn(B, N, N, K, generator=g, dtype=dtype)
    bonds[..., 0] += 4 + 4 * torch.rand(B, N, N, generator=g, dtype=dtype)
    bonds = bonds + bonds.transpose(1, 2)
    charges = 3 * torch.randn(B, N, C, generator=g, dtype=dtype)
    pair = mask[:, :, None] & mask[:, None, :]
    zero = [torch.where(mask[..., None], x, 0.0) for x in (coords, types, charges)]
    return [zero[0], zero[1], torch.where(pair[..., None], bonds, 0.0), zero[2]], mask


def copy(xs):
    return [x.clone() for x in xs]


def test_a_coordinate_offset_of_005_angstrom_scores_005_angstrom():
    b, mask = outputs([5, 3, 7])
    a = copy(b)
    g = torch.Generator().manual_seed(1)
    direction = torch.nn.functional.normalize(torch.randn(3, 7, 3, generator=g, dtype=torch.float64), dim=-1)
    a[0] = b[0] + torch.where(
        mask[..., None], direction * 0.05 / SCALE, 0.0
    )  # 0.05 Å per atom, any direction
    parts = sample_error_parts(a, b, mask, SCALE)
    torch.testing.assert_close(
        parts["coords"], torch.full((3,), 0.05, dtype=torch.float64), rtol=1e-12, atol=0
    )
    assert all(torch.equal(p, torch.zeros(3, dtype=torch.float64)) for p in parts["logits"])
    # Against the tolerance: Å / coord_reference.
    torch.testing.assert_close(sample_error(a, b, mask, SCALE), torch.full((3,), 0.5, dtype=torch.float64))
    torch.testing.assert_close(sample_error(a, b, mask, SCALE, coord_reference=0.05), torch.ones(3).double())


def test_an_argmax_flip_scores_above_a_larger_perturbation_that_flips_nothing():
    b, mask = outputs([6])
    bonds = b[2]
    bonds[0, 1, 2] = bonds[0, 2, 1] = torch.tensor([1.0, 0.8, -1, -1, -1], dtype=torch.float64)  # a near tie
    flip = copy(b)
    flip[2][0, 1, 2, 1] += 0.3  # the pair (1, 2) turns single: its argmax flips, in one direction
    flip[2][0, 2, 1, 1] += 0.3
    rest = copy(b)
    rest[0] = b[0] + 0.0005 / SCALE / math.sqrt(3)  # every atom 0.0005 Å: a rigid translation
    rest[1] = b[1] + 2.0  # every type logit shifted: the softmax, hence the sample, does not move
    rest[2] = b[2] + 0.05 * (torch.arange(5) == 0)  # no-bond gains 0.05 on every clear pair: no flip possible
    rest[2][0, 1, 2] = rest[2][0, 2, 1] = b[2][0, 1, 2]
    rest[3] = b[3] - 1.0
    assert _norm(rest, b) > 10 * _norm(flip, b)
    score_flip, score_rest = sample_error(flip, b, mask, SCALE), sample_error(rest, b, mask, SCALE)
    assert score_flip.item() > 1 > 0.1 > score_rest.item()
    # The former measure ranks them the other way round: the flip is a tiny part of the bond logits' norm.
    assert relative_error(flip, b).item() < relative_error(rest, b).item()
    # A perturbation that stays under 1 cannot flip anything; one over 1 by the margin's gap is a flip.
    near = copy(b)
    near[2][0, 1, 2, 1] += 0.1
    near[2][0, 2, 1, 1] += 0.1
    assert sample_error(near, b, mask, SCALE).item() == pytest.approx(0.5)
    assert torch.equal(near[2][0, 1, 2].argmax(), b[2][0, 1, 2].argmax())


@pytest.mark.parametrize("which", [0, 1, 2, 3])
def test_padding_and_the_bond_diagonal_do_not_count(which):
    b, mask = outputs([4, 6, 2], N=8)
    a = copy(b)
    a[0] = a[0] + 0.01
    a[2][..., 3] += 0.2
    before = sample_error(a, b, mask, SCALE)
    pad = ~mask
    pair_pad = ~(mask[:, :, None] & mask[:, None, :]) | torch.eye(8, dtype=torch.bool)
    for x in (a, b):
        garbage = torch.full_like(x[which], float("nan"))
        garbage[..., 0] = 1e6
        keep = pair_pad if which == 2 else pad
        x[which] = torch.where(keep.view(keep.shape + (1,)), garbage, x[which])
    assert torch.equal(sample_error(a, b, mask, SCALE), before)


def test_each_molecule_alone_scores_as_in_its_batch():
    b, mask = outputs([4, 6, 2, 5], N=7, seed=2)
    a, _ = outputs([4, 6, 2, 5], N=7, seed=3)
    a = [0.1 * x + y for x, y in zip(a, b)]
    together = sample_error(a, b, mask, SCALE)
    for i, n in enumerate([4, 6, 2, 5]):
        crop = [x[i : i + 1, :n, :n] if x.dim() == 4 else x[i : i + 1, :n] for x in (*a, *b)]
        alone = sample_error(crop[:4], crop[4:], mask[i : i + 1, :n], SCALE)
        assert alone.item() == together[i].item()


def test_coordinates_enter_only_through_a_rigid_motion_invariant():
    b, mask = outputs([5, 7], seed=4)
    a = copy(b)
    a[0] = a[0] + 0.02 * torch.randn(
        a[0].shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64
    )
    a[0] = torch.where(mask[..., None], a[0], 0.0)
    rotation = torch.linalg.qr(
        torch.randn(3, 3, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    )[0]
    shift = torch.tensor([0.3, -1.0, 2.0], dtype=torch.float64)
    moved = [copy(a), copy(b)]
    for x in moved:
        x[0] = torch.where(mask[..., None], x[0] @ rotation.T + shift, 0.0)
    torch.testing.assert_close(
        sample_error(*moved, mask, SCALE), sample_error(a, b, mask, SCALE), rtol=1e-12, atol=0
    )


def test_relative_error_is_unchanged():
    """error="relative": the largest over outputs of ‖a − b‖ / ‖b‖ over each molecule's entries."""
    b, mask = outputs([3, 5], seed=7)
    a, _ = outputs([3, 5], seed=8)
    expected = torch.tensor(
        [max((x[i] - y[i]).norm().item() / y[i].norm().item() for x, y in zip(a, b)) for i in range(2)],
        dtype=torch.float64,
    )
    torch.testing.assert_close(relative_error(a, b), expected)


@pytest.mark.parametrize(
    "bad",
    [
        dict(error="l2"),
        dict(coord_reference=0.0),
        dict(coord_reference=float("inf")),
        dict(coord_reference=True),
        dict(tolerance=0.1, error="Sample"),
    ],
)
def test_bad_measures_are_refused(bad):
    with pytest.raises(ValueError):
        CacheConfig(**bad)


def test_labels_name_the_adaptive_measure():
    assert "error" not in repr(CacheConfig(interval=3))  # fixed-policy labels read as before
    assert repr(CacheConfig(tolerance=0.5)).endswith("error='sample', coord_reference=0.1)")
    assert repr(CacheConfig(tolerance=0.1, error="relative")).endswith("error='relative')")


def _norm(a, b):
    return math.sqrt(sum((x - y).square().sum().item() for x, y in zip(a, b)))


# -- through the hook --------------------------------------------------------------------------------------------


class Curves(nn.Module):
    """Outputs that are polynomials of the solver time t (inv_feats[..., 0]) per molecule (its id in
    inv_feats[..., 1], so that a sub-batch knows who is who):

    molecule 0: a bond (pair 0–1) whose single-bond logit 0.39 + 10 t³ overtakes the no-bond one (1) at t ≈ 0.38.
        From t = 0.1, 0.2, 0.3, Taylor 2 forecasts 0.97 at t = 0.4 (no bond, by 0.03; the network says 1.03: a
        bond) and Taylor 1 (t = 0.2, 0.3) 0.85: their difference is 4 times the gap;
    molecule 1: x̂₁ bends by 0.01 t² model units and a type logit by 0.01 t², far from any argmax flip.

    Everything else is constant; no-bond leads every other pair by 7, so the bond logits' norm is large. Padding
    outputs hold garbage (the hook must not read it)."""

    def __init__(self):
        super().__init__()
        self.config = SimpleNamespace(coord_std=1.0)

    def forward(self, coords, inv_feats, atom_mask=None):
        B, N, _ = coords.shape
        x = torch.arange(3 * N, dtype=coords.dtype).view(1, N, 3).sin().repeat(B, 1, 1)
        types = torch.linspace(0, 4, 6, dtype=coords.dtype).repeat(B, N, 1)
        bonds = torch.zeros(B, N, N, 5, dtype=coords.dtype)
        bonds[..., 0] = 8.0
        charges = torch.tensor([3.0, 0.0, 0.0], dtype=coords.dtype).repeat(B, N, 1)
        for row, (t, molecule) in enumerate(inv_feats[:, 0, :2].tolist()):
            if molecule == 0:
                bonds[row, 0, 1, 0] = bonds[row, 1, 0, 0] = 1.0
                bonds[row, 0, 1, 1] = bonds[row, 1, 0, 1] = 0.39 + 10 * t**3
            else:
                x[row] += 0.01 * t**2
                types[row, :, 0] += 0.01 * t**2
        pad = ~atom_mask.bool()
        x[pad] = 1e3
        types[pad] = torch.arange(6, 0, -1, dtype=coords.dtype)
        return x, types, bonds, charges


@pytest.mark.parametrize(
    "error, tolerance, evaluated", [("sample", 0.5, {0: 4, 1: 3}), ("relative", 0.02, {0: 3, 1: 3})]
)
def test_the_policy_refreshes_a_forecast_that_would_flip_a_bond(error, tolerance, evaluated):
    """Three evaluations (warm-up), then one adaptive step at t = 0.4: error="sample" evaluates molecule 0, whose
    forecast would keep a bond that the network flips, and forecasts molecule 1, which is only slightly off;
    error="relative" forecasts both (the flip is a sliver of the bond logits' norm)."""
    model = Curves()
    handle = patch_model(model, cache=CacheConfig(interval=10, warmup=3, tolerance=tolerance, error=error))
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]])
    inv_feats = torch.zeros(2, 4, 7, dtype=torch.float64)
    inv_feats[1, :, 1] = 1  # molecule ids
    coords = torch.zeros(2, 4, 3, dtype=torch.float64)
    try:
        for t in (0.1, 0.2, 0.3, 0.4):
            inv_feats[..., 0] = t
            out = model(coords, inv_feats.clone(), atom_mask=mask)
        stats = handle.stats()
    finally:
        handle.unpatch()
    assert stats["evaluations_per_molecule"] == evaluated
    truth = model(coords, inv_feats, atom_mask=mask)
    flips = out[2][0, 0, 1].argmax() != truth[2][0, 0, 1].argmax()
    assert bool(flips) == (error == "relative")  # what the forecast would have done to molecule 0's bond
    if error == "sample":
        assert stats["error_estimates"]["count"] == 1 and stats["error_estimates"]["max"] < 0.01
