"""One Semla generator forward: fastflow's reference model, side by side with upstream SemlaFlow when available.

    python bench/bench_semla_forward.py [--preset semlaflow] [--repeats 5]

Upstream is timed only if ``semlaflow`` is importable (a checkout of github.com/rssrwn/semla-flow on PYTHONPATH);
both models then run the same weights on the same inputs, alternating, so the ratio is measured side by side.
Prints a table and writes ``bench/results/semla_forward.json``.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch

from fastflow.chem.vocab import N_ATOM_TYPES, N_BOND_TYPES
from fastflow.models import Semla, SemlaConfig

CASES = [(32, 18), (8, 44)]  # (molecules, atoms): QM9-like and GEOM-like batches


def random_inputs(config: SemlaConfig, batch: int, atoms: int, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    B, N, V, K = batch, atoms, N_ATOM_TYPES, N_BOND_TYPES
    one_hot = torch.nn.functional.one_hot
    inputs = {
        "coords": torch.randn(B, N, 3, generator=g),
        "inv_feats": torch.cat([torch.rand(B, 1, 1, generator=g).expand(B, N, 1),
                                one_hot(torch.randint(2, V, (B, N), generator=g), V).float()], -1),
        "edge_feats": one_hot(torch.randint(0, K, (B, N, N), generator=g), K).float(),
        "atom_mask": torch.ones(B, N, dtype=torch.long),
    }
    if config.self_cond:
        inputs.update(cond_coords=torch.randn(B, N, 3, generator=g),
                      cond_atomics=torch.softmax(torch.randn(B, N, V, generator=g), -1),
                      cond_bonds=torch.softmax(torch.randn(B, N, N, K, generator=g), -1))
    return inputs


def upstream_generator(config: SemlaConfig):
    try:
        from semlaflow.models.semla import EquiInvDynamics, SemlaGenerator
    except ImportError:
        return None
    c = config
    dynamics = EquiInvDynamics(c.d_model, c.d_message, c.n_coord_sets, c.n_layers, n_attn_heads=c.n_attn_heads,
                               d_message_hidden=c.d_message_hidden, d_edge=c.d_edge, bond_refine=c.bond_refine,
                               self_cond=c.self_cond, coord_norm=c.coord_norm)
    return SemlaGenerator(c.d_model, dynamics, c.vocab_size, c.n_atom_feats, d_edge=c.d_edge,
                          n_edge_types=c.n_edge_types, self_cond=c.self_cond, size_emb=c.size_emb,
                          max_atoms=c.max_atoms).eval()


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="semlaflow")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "semla_forward.json")
    args = parser.parse_args()

    config = SemlaConfig.preset(args.preset)
    models = {"fastflow": Semla(config).eval()}
    upstream = upstream_generator(config)
    if upstream is not None:
        upstream.load_state_dict(models["fastflow"].state_dict())
        models["upstream"] = upstream

    rows = []
    for batch, atoms in CASES:
        inputs = random_inputs(config, batch, atoms)
        times = {name: [] for name in models}
        with torch.inference_mode():
            for model in models.values():  # warm-up
                model(**inputs)
            for _ in range(args.repeats):
                for name, model in models.items():
                    start = time.perf_counter()
                    model(**inputs)
                    times[name].append(time.perf_counter() - start)
        row = {"molecules": batch, "atoms": atoms}
        row.update({f"{name}_ms": 1e3 * statistics.median(ts) for name, ts in times.items()})
        if "upstream_ms" in row:
            row["speedup"] = row["upstream_ms"] / row["fastflow_ms"]
        rows.append(row)

    header = ["molecules", "atoms", "fastflow_ms"] + (["upstream_ms", "speedup"] if upstream is not None else [])
    print(f"Semla forward, preset {args.preset!r}, {torch.get_num_threads()} threads, median of {args.repeats}")
    print("  ".join(f"{h:>12}" for h in header))
    for row in rows:
        print("  ".join(f"{row[h]:>12.2f}" if isinstance(row[h], float) else f"{row[h]:>12}" for h in header))
    if upstream is None:
        print("(upstream semlaflow not importable: only fastflow timed)")

    args.out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"preset": args.preset, "threads": torch.get_num_threads(), "torch": torch.__version__,
            "cpu": platform.processor() or platform.machine(), "repeats": args.repeats}
    args.out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
