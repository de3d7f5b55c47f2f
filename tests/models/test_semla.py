"""The Semla model: upstream equality, equivariance, padding independence and input validation."""

import json

import pytest
import torch

from fastflow.models import Semla, SemlaConfig
from fastflow.models.semla import EquivariantMLP

from .conftest import FIXTURES, perturbed_model, random_inputs

OUTPUTS = ("coords", "type_logits", "bond_logits", "charge_logits")


def real_parts(outputs, mask):
    """The outputs restricted to real atoms / real pairs (padding values are not part of the contract)."""
    m = mask.bool()
    pair = m[:, :, None] & m[:, None, :]
    return [outputs[0][m], outputs[1][m], outputs[2][pair], outputs[3][m]]


def max_rel_err(a, b):
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


def random_rotation(generator, dtype):
    q, r = torch.linalg.qr(torch.randn(3, 3, generator=generator, dtype=dtype))
    q = q * torch.sign(torch.diagonal(r))
    return q if torch.det(q) > 0 else -q


# --------------------------------------------------------------------------------------- upstream equality


@pytest.mark.parametrize("tag", ["sc", "nosc"])
def test_matches_upstream_outputs(upstream_fixture, tag):
    """Weights, inputs and outputs were produced by upstream's SemlaGenerator (see fixtures/generate_*.py)."""
    config = SemlaConfig.preset("tiny", self_cond=(tag == "sc"))
    model = Semla(config).eval()
    weights = {
        k[len(f"{tag}.param.") :]: v for k, v in upstream_fixture.items() if k.startswith(f"{tag}.param.")
    }
    model.load_state_dict(weights, strict=True)
    inputs = {
        k[len(f"{tag}.input.") :]: v for k, v in upstream_fixture.items() if k.startswith(f"{tag}.input.")
    }
    expected = [upstream_fixture[f"{tag}.output.{name}"] for name in OUTPUTS]
    with torch.no_grad():
        got = model(**inputs)
    mask = inputs["atom_mask"]
    for name, g, e in zip(OUTPUTS, real_parts(got, mask), real_parts(expected, mask)):
        err = max_rel_err(g, e)
        print(f"{tag} {name}: max rel err {err:.2e}")
        assert err < 1e-5, name


@pytest.mark.parametrize("preset", ["semlaflow", "small", "tiny"])
def test_parameter_names_and_shapes_match_upstream(preset):
    config = SemlaConfig.preset(preset)
    ours = {k: list(v.shape) for k, v in Semla(config).state_dict().items()}
    if preset == "semlaflow":
        upstream = json.loads((FIXTURES / "upstream_semlaflow_params.json").read_text())
        assert ours == upstream
        assert sum(v.numel() for v in Semla(config).parameters()) == 23_301_407
    else:  # same module tree: every name of the tiny upstream fixture, scaled
        assert set(ours) >= {
            "dynamics.layers.0.edge_feat_norm.weight",
            "dynamics.refine_layer.message_mlp.2.bias",
            f"dynamics.layers.{config.n_layers - 1}.message_ff.message_mlp.2.weight",
        }


def test_semlaflow_preset_defaults():
    c = SemlaConfig.preset("semlaflow")
    assert (c.d_model, c.n_layers, c.d_message, c.d_edge, c.n_coord_sets, c.n_attn_heads) == (
        384,
        12,
        128,
        128,
        64,
        32,
    )


def test_equivariant_mlp_is_the_outer_product_sum():
    """The rank-1 form equals upstream's [B,3,N,P,P] outer product summed over its last axis."""
    torch.manual_seed(1)
    mlp = EquivariantMLP(d_model=12, n_coord_sets=5, proj_sets=7).double()
    X, h = torch.randn(2, 5, 17, 3, dtype=torch.double), torch.randn(2, 17, 12, dtype=torch.double)
    a = mlp.node_proj(h).unsqueeze(1)
    Y = mlp.coord_proj(X.transpose(1, -1))
    outer = (a.unsqueeze(-1) * Y.unsqueeze(-2)).sum(-1)
    expected = mlp.attn_proj(outer).transpose(1, -1)
    torch.testing.assert_close(mlp(X, h), expected, rtol=1e-12, atol=1e-12)


# --------------------------------------------------------------------------------------- symmetries


@pytest.mark.parametrize("self_cond", [True, False])
@pytest.mark.parametrize("seed", [0, 1])
def test_equivariance_rotation_translation_permutation(self_cond, seed):
    config = SemlaConfig.preset("tiny", self_cond=self_cond)
    model = perturbed_model(config, seed=seed, dtype=torch.double)
    g = torch.Generator().manual_seed(100 + seed)
    sizes = [5, 3, 8]
    inputs = random_inputs(config, sizes, n_pad=2, generator=g, dtype=torch.double)
    mask = inputs["atom_mask"]
    with torch.no_grad():
        reference = model(**inputs)

    R, shift = random_rotation(g, torch.double), torch.randn(3, generator=g, dtype=torch.double)
    # Permute real atoms within each molecule; padding stays at the end.
    N = mask.size(1)
    perm = torch.stack([torch.cat([torch.randperm(n, generator=g), torch.arange(n, N)]) for n in sizes])
    bidx = torch.arange(len(sizes))[:, None]

    def transform(name, value):
        value = value[bidx, perm]
        if value.dim() == 4:  # pair tensors: permute j too
            value = value[bidx[..., None], torch.arange(N)[None, :, None], perm[:, None, :]]
        if name in ("coords", "cond_coords"):
            value = (value @ R.T + shift) * mask[bidx, perm][..., None]
        return value

    moved = {k: transform(k, v) if k != "atom_mask" else v[bidx, perm] for k, v in inputs.items()}
    with torch.no_grad():
        out = model(**moved)
    expected = [transform(name, value) for name, value in zip(("x", "t", "b", "c"), reference)]
    expected[0] = expected[0] @ R.T  # outputs are zero-CoM: rotate, no shift
    for name, got, exp in zip(
        OUTPUTS, real_parts(out, moved["atom_mask"]), real_parts(expected, moved["atom_mask"])
    ):
        assert max_rel_err(got, exp) < 1e-9, name


def test_outputs_do_not_depend_on_padding_or_batch_mates():
    config = SemlaConfig.preset("tiny")
    model = perturbed_model(config)
    g = torch.Generator().manual_seed(7)
    batch = random_inputs(config, [6, 4, 9], n_pad=3, generator=g)
    with torch.no_grad():
        together = model(**batch)
        alone = model(**{k: v[1:2, :4] if v.dim() < 4 else v[1:2, :4, :4] for k, v in batch.items()})
    for name, a, b in zip(
        OUTPUTS,
        real_parts(
            [o[1:2, :4] if o.dim() < 4 else o[1:2, :4, :4] for o in together], batch["atom_mask"][1:2, :4]
        ),
        real_parts(alone, batch["atom_mask"][1:2, :4]),
    ):
        assert max_rel_err(a, b) < 1e-5, name


def test_bond_logits_are_symmetric():
    config = SemlaConfig.preset("tiny")
    model = perturbed_model(config)
    with torch.no_grad():
        _, _, bonds, _ = model(**random_inputs(config, [5, 7]))
    torch.testing.assert_close(bonds, bonds.transpose(1, 2))


# --------------------------------------------------------------------------------------- bad inputs


@pytest.fixture(scope="module")
def tiny():
    return perturbed_model(SemlaConfig.preset("tiny"))


def test_nan_and_inf_coordinates_are_refused(tiny):
    inputs = random_inputs(tiny.config, [4, 3])
    for bad in (float("nan"), float("inf")):
        broken = dict(inputs, coords=inputs["coords"].clone())
        broken["coords"][0, 1, 2] = bad
        with pytest.raises(ValueError, match="coords contains NaN or inf"):
            tiny(**broken)


def test_empty_batch_and_all_padding_rows_are_refused(tiny):
    inputs = random_inputs(tiny.config, [4, 3])
    empty = {k: v[:0] for k, v in inputs.items()}
    with pytest.raises(ValueError, match="empty batch"):
        tiny(**empty)
    padded = dict(inputs, atom_mask=inputs["atom_mask"].clone())
    padded["atom_mask"][1] = 0
    with pytest.raises(ValueError, match=r"molecules \[1\] .* no real atoms"):
        tiny(**padded)


def test_mismatched_shapes_and_dtypes_are_refused(tiny):
    inputs = random_inputs(tiny.config, [4, 3])
    with pytest.raises(ValueError, match=r"inv_feats must have shape \[2, 4, 19\]"):
        tiny(**dict(inputs, inv_feats=inputs["inv_feats"][..., :-1]))
    with pytest.raises(ValueError, match=r"edge_feats must have shape"):
        tiny(**dict(inputs, edge_feats=inputs["edge_feats"][:, :3]))
    with pytest.raises(ValueError, match=r"coords must be a \[B, N, 3\] tensor"):
        tiny(**dict(inputs, coords=inputs["coords"][..., :2]))
    with pytest.raises(TypeError, match="dtype torch.float64"):
        tiny(**dict(inputs, coords=inputs["coords"].double()))
    with pytest.raises(ValueError, match="atom_mask must have shape"):
        tiny(**dict(inputs, atom_mask=inputs["atom_mask"][:, :2]))
    with pytest.raises(ValueError, match="cond_coords is required"):
        tiny(**dict(inputs, cond_coords=None))


def test_too_many_atoms_is_refused():
    config = SemlaConfig.preset("tiny", max_atoms=8)
    model = Semla(config)
    with pytest.raises(ValueError, match="max_atoms-1 = 7"):
        model(**random_inputs(config, [8]))


def test_unknown_or_invalid_configs_are_refused():
    with pytest.raises(ValueError, match="unknown SemlaConfig preset 'huge'"):
        SemlaConfig.preset("huge")
    with pytest.raises(ValueError, match="n_attn_heads=5 must divide d_model=32"):
        SemlaConfig.preset("tiny", n_attn_heads=5)
    with pytest.raises(ValueError, match="coord_norm"):
        SemlaConfig.preset("tiny", coord_norm="unit")
    with pytest.raises(ValueError, match="unknown SemlaConfig fields"):
        SemlaConfig.from_dict({"d_model": 32, "colour": "red"})
