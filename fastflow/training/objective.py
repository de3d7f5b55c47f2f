"""SemlaFlow's training objective (upstream ``MolecularCFM.training_step`` / ``_loss`` and ``GeometricInterpolant``).

For a batch of data molecules x₁ (coordinates in model units, zero CoM, randomly rotated):

- prior x₀ from :func:`fastflow.sampling.prior.sample_prior` (zero-CoM normals; atom and bond tokens uniform
  over all classes, bonds drawn per ordered pair), keyed by random per-molecule keys;
- optional equivariant OT: Hungarian matching of prior to data atoms, then the Kabsch rotation of the prior;
- t ~ Beta(2, 1); x_t = t·x₁ + (1 − t)·x₀ + 0.2·ε, re-centred to zero CoM like the sampler's states; each
  atom / ordered pair token takes its data value with probability t, else its prior draw ("unmask"
  interpolation of the ``uniform-sample`` flow);
- self-conditioning half the time: a no-grad pass whose x̂₁ and softmaxed types / bonds become the inputs;
- loss: coordinate MSE on x̂₁ + cross-entropies for atom types (× 0.2), bonds over all pairs of real atoms,
  diagonal included (× 0.5 for QM9) and charges (× 1).

Per-molecule averages over real atoms (pairs), then a batch mean. Upstream's coordinate term averages over the
padded N instead of the real atoms; with size buckets the two differ by the padding fraction only.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from fastflow.chem.vocab import N_ATOM_TYPES, N_BOND_TYPES
from fastflow.sampling.prior import one_hot_masked, sample_prior, zero_com


@dataclass(frozen=True)
class Objective:
    """Weights and noise of the objective (SemlaFlow's QM9 settings)."""

    coord_weight: float = 1.0
    type_weight: float = 0.2
    bond_weight: float = 0.5
    charge_weight: float = 1.0
    coord_noise_std: float = 0.2
    self_cond_prob: float = 0.5
    equivariant_ot: bool = False


def random_rotations(n: int, generator: torch.Generator) -> torch.Tensor:
    """``[n,3,3]`` rotation matrices, uniform on SO(3) (normalised Gaussian quaternions)."""
    w, x, y, z = F.normalize(torch.randn(n, 4, generator=generator), dim=-1).unbind(-1)
    return torch.stack(
        [
            1 - 2 * (y * y + z * z),
            2 * (x * y - w * z),
            2 * (x * z + w * y),
            2 * (x * y + w * z),
            1 - 2 * (x * x + z * z),
            2 * (y * z - w * x),
            2 * (x * z - w * y),
            2 * (y * z + w * x),
            1 - 2 * (x * x + y * y),
        ],
        dim=-1,
    ).view(n, 3, 3)


def equivariant_ot(prior: torch.Tensor, data: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Prior coordinates permuted (Hungarian on squared distances) and then rotated (Kabsch) onto the data,
    molecule by molecule. prior, data ``[B,N,3]`` zero-CoM; mask ``[B,N]``."""
    from scipy.optimize import linear_sum_assignment
    from scipy.spatial.transform import Rotation

    matched = prior.clone()
    for b, n in enumerate(mask.sum(-1).tolist()):
        x0, x1 = prior[b, :n].double().numpy(), data[b, :n].double().numpy()
        cost = ((x1[:, None, :] - x0[None, :, :]) ** 2).sum(-1)
        _, cols = linear_sum_assignment(cost)
        x0 = x0[cols]
        rotation = Rotation.align_vectors(x1, x0)[0] if n > 1 else Rotation.identity()
        matched[b, :n] = torch.from_numpy(rotation.apply(x0)).to(prior.dtype)
    return matched


def interpolate(
    batch: dict[str, torch.Tensor], generator: torch.Generator, objective: Objective
) -> dict[str, torch.Tensor]:
    """The noisy state x_t of a data batch (see the module docstring): ``t [B]``, ``coords [B,N,3]``,
    one-hot ``atomics [B,N,V]`` and ``bonds [B,N,N,K]``, and the targets (rotated ``target_coords``)."""
    mask = batch["mask"]
    B, N = mask.shape
    sizes = mask.sum(-1)
    pair_mask = mask.unsqueeze(-1) & mask.unsqueeze(-2)
    x1 = batch["coords"] @ random_rotations(B, generator).transpose(1, 2)  # rows are atoms: x R^T

    keys = torch.randint(-(2**63), 2**63 - 1, (B,), generator=generator)
    x0, prior_atomics, prior_bonds, _ = sample_prior(keys, sizes, N)
    if objective.equivariant_ot:
        x0 = equivariant_ot(x0, x1, mask)

    t = torch.rand(B, generator=generator).sqrt()  # inverse CDF of Beta(2, 1): F(t) = t²
    tb = t.view(B, 1, 1)
    noise = torch.randn(B, N, 3, generator=generator) * objective.coord_noise_std
    coords = zero_com(tb * x1 + (1 - tb) * x0 + noise, mask)

    keep_atom = torch.rand(B, N, generator=generator) < t.view(B, 1)
    keep_bond = torch.rand(B, N, N, generator=generator) < tb
    atom_classes = torch.where(keep_atom, batch["atom_types"], prior_atomics.argmax(-1))
    bond_classes = torch.where(keep_bond, batch["bonds"], prior_bonds.argmax(-1))
    return {
        "t": t,
        "coords": coords,
        "atomics": one_hot_masked(atom_classes, N_ATOM_TYPES, mask),
        "bonds": one_hot_masked(bond_classes, N_BOND_TYPES, pair_mask),
        "target_coords": x1,
    }


def _forward(model, noisy, mask, cond):
    t = noisy["t"].view(-1, 1, 1).expand(-1, mask.size(1), 1)
    return model(
        noisy["coords"],
        torch.cat([t, noisy["atomics"]], dim=-1),
        edge_feats=noisy["bonds"],
        cond_coords=cond[0],
        cond_atomics=cond[1],
        cond_bonds=cond[2],
        atom_mask=mask,
    )


def flow_loss(
    model: torch.nn.Module,
    batch: dict[str, torch.Tensor],
    generator: torch.Generator,
    objective: Objective = Objective(),
) -> tuple[torch.Tensor, dict[str, float]]:
    """Total loss of one batch and its weighted parts (floats: coords, types, bonds, charges)."""
    mask = batch["mask"]
    noisy = interpolate(batch, generator, objective)
    cond = (None, None, None)
    if model.config.self_cond:
        cond = (
            torch.zeros_like(noisy["coords"]),
            torch.zeros_like(noisy["atomics"]),
            torch.zeros_like(noisy["bonds"]),
        )
        if torch.rand((), generator=generator) < objective.self_cond_prob:
            with torch.no_grad():
                coords, type_logits, bond_logits, _ = _forward(model, noisy, mask, cond)
            pair_mask = (mask.unsqueeze(-1) & mask.unsqueeze(-2)).unsqueeze(-1)
            cond = (
                coords,
                F.softmax(type_logits, -1) * mask.unsqueeze(-1),
                F.softmax(bond_logits, -1) * pair_mask,
            )
    coords, type_logits, bond_logits, charge_logits = _forward(model, noisy, mask, cond)

    m = mask.float()
    pair_m = m.unsqueeze(-1) * m.unsqueeze(-2)
    n_atoms = m.sum(-1)
    coord_loss = ((coords - noisy["target_coords"]).square().sum(-1) * m).sum(-1) / (3 * n_atoms)
    type_loss = (
        F.cross_entropy(type_logits.transpose(1, -1), batch["atom_types"], reduction="none") * m
    ).sum(-1) / n_atoms
    bond_loss = (
        F.cross_entropy(bond_logits.permute(0, 3, 1, 2), batch["bonds"], reduction="none") * pair_m
    ).sum((1, 2)) / n_atoms.square()
    charge_loss = (
        F.cross_entropy(charge_logits.transpose(1, -1), batch["charges"], reduction="none") * m
    ).sum(-1) / n_atoms
    parts = {
        "coords": objective.coord_weight * coord_loss.mean(),
        "types": objective.type_weight * type_loss.mean(),
        "bonds": objective.bond_weight * bond_loss.mean(),
        "charges": objective.charge_weight * charge_loss.mean(),
    }
    return sum(parts.values()), {name: float(value.detach()) for name, value in parts.items()}
