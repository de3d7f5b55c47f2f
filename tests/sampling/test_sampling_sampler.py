import dataclasses

import pytest
import torch

from fastflow.models import Semla, SemlaConfig
from fastflow.sampling import (
    QM9_SIZE_COUNTS,
    FlowState,
    draw_sizes,
    model_step,
    plan_batches,
    sample,
    time_grid,
)

from .stubs import StubModel

SIZES = [7, 12, 5, 9, 3]


@pytest.fixture(scope="module")
def semla():
    torch.manual_seed(0)
    return Semla(SemlaConfig.preset("tiny")).eval()


def _same(a, b):
    assert a.sizes == b.sizes
    for name in ("coords", "type_probs", "bond_probs", "charge_probs"):
        for x, y in zip(getattr(a, name), getattr(b, name)):
            assert torch.equal(x, y), name


def test_result_shapes_and_stats(semla):
    result = sample(semla, 5, steps=3, sizes=SIZES, batch_size=2)
    assert len(result) == 5 and len(result.graphs) == len(result.molecules) == 5
    for n, c, tp, bp, cp, g in zip(
        SIZES, result.coords, result.type_probs, result.bond_probs, result.charge_probs, result.graphs
    ):
        assert c.shape == (n, 3) and tp.shape == (n, 18) and bp.shape == (n, n, 5) and cp.shape == (n, 7)
        assert torch.allclose(tp.sum(-1), torch.ones(n)) and g.n_atoms == n
    stats = result.stats
    assert stats["nfe"] == 5 * 3 and stats["steps"] == 3 and stats["n_batches"] == 3
    assert stats["molecules_per_second"] > 0 and stats["wall_seconds"] >= stats["sampling_seconds"] > 0


def test_same_seed_is_bit_identical(semla):
    _same(sample(semla, 4, steps=4, seed=11), sample(semla, 4, steps=4, seed=11))


def test_different_seeds_differ(semla):
    a = sample(semla, 3, steps=3, seed=1, sizes=[6, 6, 6])
    b = sample(semla, 3, steps=3, seed=2, sizes=[6, 6, 6])
    assert all(not torch.allclose(x, y) for x, y in zip(a.coords, b.coords))


@pytest.mark.parametrize("dtype, atol", [(torch.float64, 1e-10), (torch.float32, 5e-4)])
def test_batch_independence(semla, dtype, atol):
    # fp32 tolerance: the padded forward differs from the unpadded one by ~1e-6 (matmul blocking), and the
    # random tiny model amplifies that over the steps; in float64 the agreement is to rounding.
    model = Semla(SemlaConfig.preset("tiny")).to(dtype).eval()
    model.load_state_dict(semla.state_dict())
    batched = sample(model, 5, steps=6, seed=3, sizes=SIZES, batch_size=5)
    alone = sample(model, 5, steps=6, seed=3, sizes=SIZES, batch_size=1)
    mixed = sample(model, 5, steps=6, seed=3, sizes=SIZES, batch_size=2, max_batch_atoms=20)
    for other in (alone, mixed):
        for i in range(5):
            assert torch.equal(batched.graphs[i].atom_types, other.graphs[i].atom_types)
            assert torch.equal(batched.graphs[i].bond_types, other.graphs[i].bond_types)
            assert torch.allclose(batched.coords[i], other.coords[i], atol=atol, rtol=0)
            assert torch.allclose(batched.bond_probs[i], other.bond_probs[i], atol=atol, rtol=0)


def test_batch_independence_is_exact_for_a_padding_blind_model():
    a = sample(StubModel(), 5, steps=5, sizes=SIZES, batch_size=5)
    b = sample(StubModel(), 5, steps=5, sizes=SIZES, batch_size=1)
    _same(a, b)
    assert [g.atom_types.tolist() for g in a.graphs] == [g.atom_types.tolist() for g in b.graphs]


def test_last_prediction_is_the_sample_in_angstrom():
    model = StubModel()
    result = sample(model, 2, steps=3, sizes=[4, 6])
    for n, c in zip([4, 6], result.coords):
        assert torch.allclose(c, StubModel.target(n) * model.config.coord_std)
    unscaled = sample(model, 1, steps=2, sizes=[4], coord_scale=1.0)
    assert torch.allclose(unscaled.coords[0], StubModel.target(4))


def test_step_hook_called_once_per_step_with_the_schedule():
    seen = []

    def step_fn(model, state, cond):
        seen.append((state.step, state.n_steps, state.t.clone(), state.mol_index.tolist()))
        return model_step(model, state, cond)

    result = sample(StubModel(), 3, steps=4, schedule="log", sizes=[3, 5, 4], batch_size=3, step_fn=step_fn)
    grid = time_grid("log", 4).float()
    assert [s[0] for s in seen] == [0, 1, 2, 3] and all(s[1] == 4 for s in seen)
    assert all(torch.equal(s[2], grid[k].expand(3)) for k, s in enumerate(seen))
    assert sorted(seen[0][3]) == [0, 1, 2]
    assert result.stats["nfe"] == 12


def test_nfe_counts_what_the_step_function_reports():
    def every_other_step(model, state, cond):  # a cache-like step: "forecast" odd steps
        pred = model_step(model, state, cond)
        return dataclasses.replace(pred, nfe=0) if state.step % 2 else pred

    result = sample(StubModel(), 6, steps=5, sizes=[3] * 6, batch_size=4, step_fn=every_other_step)
    assert result.stats["nfe"] == 6 * 3 and result.stats["n_batches"] == 2


@pytest.mark.parametrize("self_cond", [False, True])
def test_self_conditioning_inputs(self_cond):
    model = StubModel(self_cond=self_cond)
    sample(model, 2, steps=3, sizes=[3, 4], batch_size=2)
    first, second = model.calls[0], model.calls[1]
    if not self_cond:
        assert all(call["cond_coords"] is None and call["cond_bonds"] is None for call in model.calls)
        return
    assert all((first[name] == 0).all() for name in ("cond_coords", "cond_atomics", "cond_bonds"))
    mask = first["atom_mask"]
    with torch.no_grad():
        prev = model_step(StubModel(), _state_from_call(first), None)
    assert torch.allclose(second["cond_coords"], prev.coords)
    expected_types = torch.softmax(prev.type_logits, -1) * mask.unsqueeze(-1)
    assert torch.allclose(second["cond_atomics"], expected_types)


def _state_from_call(call):
    t, atomics = call["inv_feats"][..., 0, 0], call["inv_feats"][..., 1:]
    return FlowState(
        call["coords"], atomics, call["edge_feats"], call["atom_mask"], t, 0, 1, torch.arange(len(t))
    )


def test_model_mode_is_restored(semla):
    semla.train()
    sample(semla, 1, steps=1, sizes=[3])
    assert semla.training
    semla.eval()
    sample(semla, 1, steps=1, sizes=[3])
    assert not semla.training


def test_sizes_drawn_from_histogram_are_index_keyed():
    assert torch.equal(draw_sizes(10, seed=5)[:4], draw_sizes(4, seed=5))
    sizes = draw_sizes(2000, seed=0)
    assert set(sizes.tolist()) <= set(QM9_SIZE_COUNTS) and 17 < sizes.float().mean() < 19.5
    assert set(draw_sizes(50, 0, {4: 1, 9: 3}).tolist()) == {4, 9}
    assert set(draw_sizes(50, 0, torch.tensor([5.0, 0, 0, 1])).tolist()) == {3}  # no 0-atom molecules


def test_plan_batches_sorted_balanced_and_complete():
    sizes = torch.tensor([9, 3, 7, 3, 12, 5, 8])
    batches = plan_batches(sizes, batch_size=4)
    assert [len(b) for b in batches] == [4, 3]
    assert sorted(torch.cat(batches).tolist()) == list(range(7))
    assert sizes[batches[0]].max() <= sizes[batches[1]].min()
    for batch in plan_batches(sizes, batch_size=10, max_batch_atoms=20):
        assert len(batch) * int(sizes[batch].max()) <= 20


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        (dict(n_molecules=0), ValueError, "n_molecules"),
        (dict(sizes=[3, 4]), ValueError, "one atom count per molecule"),
        (dict(sizes=[3, 0, 4]), ValueError, "at least 1 atom"),
        (dict(sizes=[3, 32, 4]), ValueError, "max_atoms-1 = 31"),
        (dict(schedule="cosine"), ValueError, "unknown schedule"),
        (dict(steps=0), ValueError, "steps must be"),
        (dict(batch_size=0), ValueError, "batch_size"),
        (dict(sizes=[3, 4, 5], size_distribution={3: 1}), ValueError, "either sizes or size_distribution"),
        (dict(device="cuda"), ValueError, "model is on cpu"),
        (dict(sizes=[3, 4, 5], max_batch_atoms=4), ValueError, "max_batch_atoms"),
        (dict(seed=2**70), ValueError, "seed must be an integer"),
        (dict(seed=1.5), ValueError, "seed must be an integer"),
        (dict(seed=True), ValueError, "seed must be an integer"),
        (dict(noise_level=float("nan")), ValueError, "noise_level"),
        (dict(noise_level=-0.5), ValueError, "noise_level"),
        (dict(coord_scale=-1.0), ValueError, "coord_scale"),
        (dict(coord_scale=float("inf")), ValueError, "coord_scale"),
    ],
)
def test_errors(kwargs, error, message):
    args = dict(n_molecules=3, steps=2) | kwargs
    with pytest.raises(error, match=message):
        sample(StubModel(), **args)


def test_nan_from_the_model_names_the_step():
    with pytest.raises(FloatingPointError, match="step 2 of 4"):
        sample(StubModel(nan_at_step=2), 2, steps=4, sizes=[3, 4])
