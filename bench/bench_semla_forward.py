"""One Semla generator forward: fastflow's reference model and upstream SemlaFlow, each unpatched and patched.

    python bench/bench_semla_forward.py [--preset semlaflow] [--repeats 5] [--kernels auto]

Upstream is timed only if ``semlaflow`` is importable (a checkout of github.com/rssrwn/semla-flow on PYTHONPATH);
all models then run the same weights on the same inputs, alternating, so the ratios are measured side by side.
"+kernels" is ``fastflow.patch_model(model, kernels=...)``: the fused modules swapped into either implementation.
Prints a table and writes ``bench/results/semla_forward.json``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from fastflow.benchmarks.kernels import random_inputs
from fastflow.benchmarks.timing import machine_metadata
from fastflow.models import Semla, SemlaConfig
from fastflow.patch import patch_model

CASES = [(32, 18), (8, 44), (2, 100)]  # (molecules, atoms): QM9-like, GEOM-like, one large pair


def upstream_generator(config: SemlaConfig):
    try:
        from semlaflow.models.semla import EquiInvDynamics, SemlaGenerator
    except ImportError:
        return None
    c = config
    dynamics = EquiInvDynamics(
        c.d_model,
        c.d_message,
        c.n_coord_sets,
        c.n_layers,
        n_attn_heads=c.n_attn_heads,
        d_message_hidden=c.d_message_hidden,
        d_edge=c.d_edge,
        bond_refine=c.bond_refine,
        self_cond=c.self_cond,
        coord_norm=c.coord_norm,
    )
    return SemlaGenerator(
        c.d_model,
        dynamics,
        c.vocab_size,
        c.n_atom_feats,
        d_edge=c.d_edge,
        n_edge_types=c.n_edge_types,
        self_cond=c.self_cond,
        size_emb=c.size_emb,
        max_atoms=c.max_atoms,
    ).eval()


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="semlaflow")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--kernels", default="auto", help="fused backend for the patched rows (default auto)")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "semla_forward.json")
    args = parser.parse_args()

    config = SemlaConfig.preset(args.preset)
    models = {"fastflow": Semla(config).eval()}
    upstream = upstream_generator(config)
    if upstream is not None:
        upstream.load_state_dict(models["fastflow"].state_dict())
        models["upstream"] = upstream
    for name in list(models):
        patched = Semla(config).eval() if name == "fastflow" else upstream_generator(config)
        patched.load_state_dict(models["fastflow"].state_dict())
        patch_model(patched, kernels=args.kernels)
        models[f"{name}+kernels"] = patched

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
        for name in models:
            if "upstream_ms" in row:
                row[f"{name}_speedup_vs_upstream"] = row["upstream_ms"] / row[f"{name}_ms"]
        rows.append(row)

    header = ["molecules", "atoms"] + [f"{name}_ms" for name in models]
    if upstream is not None:
        header += [f"{name}_speedup_vs_upstream" for name in models if name != "upstream"]
    print(
        f"Semla forward, preset {args.preset!r}, {torch.get_num_threads()} threads, median of {args.repeats}"
    )
    print("  ".join(f"{h.replace('_speedup_vs_upstream', ' x'):>18}" for h in header))
    for row in rows:
        print("  ".join(f"{row[h]:>18.2f}" if isinstance(row[h], float) else f"{row[h]:>18}" for h in header))
    if upstream is None:
        print("(upstream semlaflow not importable: only fastflow timed)")

    args.out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"preset": args.preset, "repeats": args.repeats, "kernels": args.kernels, **machine_metadata()}
    args.out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
