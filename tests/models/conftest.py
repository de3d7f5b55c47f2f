from pathlib import Path

import torch

from fastflow.chem.vocab import N_ATOM_TYPES, N_BOND_TYPES

FIXTURES = Path(__file__).parent / "fixtures"


def random_inputs(config, sizes, n_pad=0, generator=None, dtype=torch.float32):
    """Random Semla inputs for molecules of the given sizes, padded to max(sizes) + n_pad atoms."""
    g = generator if generator is not None else torch.Generator().manual_seed(0)
    B, N, V, K = len(sizes), max(sizes) + n_pad, N_ATOM_TYPES, N_BOND_TYPES
    mask = (torch.arange(N) < torch.tensor(sizes)[:, None]).long()
    coords = torch.randn(B, N, 3, generator=g, dtype=dtype) * mask[..., None]
    t = torch.rand(B, 1, 1, generator=g, dtype=dtype).expand(B, N, 1)
    types = torch.nn.functional.one_hot(torch.randint(2, V, (B, N), generator=g), V).to(dtype)
    bond_idx = torch.randint(0, K, (B, N, N), generator=g)
    inputs = {
        "coords": coords,
        "inv_feats": torch.cat([t, types], -1),
        "edge_feats": torch.nn.functional.one_hot(bond_idx, K).to(dtype),
        "atom_mask": mask,
    }
    if config.self_cond:
        inputs["cond_coords"] = torch.randn(B, N, 3, generator=g, dtype=dtype) * mask[..., None]
        inputs["cond_atomics"] = torch.softmax(torch.randn(B, N, V, generator=g, dtype=dtype), -1)
        inputs["cond_bonds"] = torch.softmax(torch.randn(B, N, N, K, generator=g, dtype=dtype), -1)
    return inputs


def perturbed_model(config, seed=0, dtype=torch.float32):
    """A model whose LayerNorm and CoordNorm weights are off their trivial initial values."""
    from fastflow.models import Semla

    torch.manual_seed(seed)
    model = Semla(config).to(dtype).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model
