"""``fastflow bench kernels``: the fused Semla kernels against the reference, measured side by side in one run.

- op: ``fastflow::semla_attention`` for one core layer of the config — fused backend vs the reference op eager vs
  ``torch.compile`` of the reference op;
- forward: the whole generator unpatched (the reference) vs ``patch_model(kernels=...)`` vs ``torch.compile`` of
  the unpatched model, with the patched outputs' max relative error;
- memory: the peak activation memory of one forward, unpatched vs patched;
- sampling: molecules/s of a model with kernels, with the predictive cache, and with both.

Times are medians of interleaved repeats after warm-up, so a noisy machine slows every variant alike. FLOPs are
counted by ``torch.utils.flop_counter`` on the split (minimal) formulation — the patched model on its reference
op — and set against the machine's measured fp32 matmul rate. Peak memory is the activation memory of one
forward under ``torch.no_grad()`` on one intra-op thread: the peak of the live bytes allocated by torch's CPU
allocator during the call, above those live before it (inputs and weights excluded), replayed from the
profiler's memory events. Allocations inside the fused C++ op (its ``at::empty`` tile scratch) are counted;
memory outside torch's allocator (MKL's GEMM buffers, ``std::vector`` row scratch) is not.
"""

from __future__ import annotations

import json
import warnings
from functools import partial
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode, register_flop_formula

from fastflow.benchmarks.timing import machine_header, machine_metadata, median_seconds, peak_allocated_bytes
from fastflow.chem.vocab import N_ATOM_TYPES, N_BOND_TYPES
from fastflow.models import Semla, SemlaConfig
from fastflow.ops.semla_attention import semla_attention, semla_attention_flops
from fastflow.patch import patch_model

CASES = [(32, 18), (8, 44), (2, 100)]  # (molecules, atoms): QM9-like, GEOM-like, one large pair
OUTPUTS = ("coords", "types", "bonds", "charges")


def random_inputs(config: SemlaConfig, batch: int, atoms: int, seed: int = 0) -> dict:
    """Generator inputs for ``batch`` molecules of ``atoms`` atoms (no padding), self-conditioning included."""
    g = torch.Generator().manual_seed(seed)
    B, N, V, K = batch, atoms, N_ATOM_TYPES, N_BOND_TYPES
    one_hot = torch.nn.functional.one_hot
    inputs = {
        "coords": torch.randn(B, N, 3, generator=g),
        "inv_feats": torch.cat(
            [
                torch.rand(B, 1, 1, generator=g).expand(B, N, 1),
                one_hot(torch.randint(2, V, (B, N), generator=g), V).float(),
            ],
            -1,
        ),
        "edge_feats": one_hot(torch.randint(0, K, (B, N, N), generator=g), K).float(),
        "atom_mask": torch.ones(B, N, dtype=torch.long),
    }
    if config.self_cond:
        inputs.update(
            cond_coords=torch.randn(B, N, 3, generator=g),
            cond_atomics=torch.softmax(torch.randn(B, N, V, generator=g), -1),
            cond_bonds=torch.softmax(torch.randn(B, N, N, K, generator=g), -1),
        )
    return inputs


def layer_op_inputs(config: SemlaConfig, batch: int, atoms: int, seed: int = 0) -> dict:
    """Random arguments of ``semla_attention`` shaped like one core layer of ``config``."""
    g = torch.Generator().manual_seed(seed)
    B, N = batch, atoms
    F, S, H = config.d_message_hidden or config.d_message, config.n_coord_sets, config.n_attn_heads
    d_head = config.d_model // H

    def randn(*shape, scale=1.0):
        return torch.randn(*shape, generator=g) * scale

    return {
        "node_terms_i": randn(B, N, F),
        "node_terms_j": randn(B, N, F),
        "gram_coords": randn(B, S, N, 3),
        "gram_weight": randn(F, S, scale=S**-0.5),
        "out_weight": randn(H + S, F, scale=F**-0.5),
        "out_bias": randn(H + S),
        "values": randn(B, N, H, d_head),
        "attn_coords": randn(B, S, N, 3),
        "adjacency": ~torch.eye(N, dtype=torch.bool).expand(B, N, N).contiguous(),
    }


def _register_flop_formulas() -> None:
    for op in (torch.ops.fastflow.semla_attention, torch.ops.fastflow.semla_attention_triton):
        if op not in torch.utils.flop_counter.flop_registry:
            register_flop_formula(op)(semla_attention_flops)


def count_flops(fn) -> int:
    _register_flop_formulas()
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def max_relative_error(got, expected) -> float:
    return max(
        ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()
        for a, b in zip(got, expected)
        if b.numel()
    )


def compiled_or_none(fn, example: dict):
    """torch.compile(fn) warmed up on ``example``, or None with a printed reason when it does not compile here."""
    try:
        torch._dynamo.reset()  # a fresh, static-shape compile per case: no recompile limit, no stale graphs
        compiled = torch.compile(fn, dynamic=False)
        with torch.inference_mode():
            compiled(**example)
        return compiled
    except Exception as error:  # noqa: BLE001 — any compiler failure means "no compiled row", and is reported
        print(f"  torch.compile failed: {type(error).__name__}: {str(error).splitlines()[0][:160]}")
        return None


def timed_row(
    B: int, N: int, variants: dict, fused: str, flops: int, error: float, repeats: int, peak_gflops: float
) -> dict:
    """Median times of the variants (reference first), with speedups and the fused variant's FLOP rate."""
    with torch.inference_mode():
        seconds = median_seconds(variants, repeats, warmup=1)
    row = {
        "molecules": B,
        "atoms": N,
        "flops": flops,
        "max_rel_error": error,
        **{f"{name}_ms": 1e3 * value for name, value in seconds.items()},
        "speedup": seconds["reference"] / seconds[fused],
        "gflops": flops / seconds[fused] / 1e9,
    }
    row["fraction_of_matmul"] = row["gflops"] / peak_gflops
    if "compiled" in seconds:
        row["speedup_vs_compiled"] = seconds["compiled"] / seconds[fused]
    return row


def bench_op(
    config: SemlaConfig,
    backend: str,
    repeats: int,
    compile_reference: bool,
    peak_gflops: float,
    precision: str = "fp32",
):
    """One core layer's semla_attention: fused backend vs reference eager vs compiled reference."""
    from fastflow.ops.semla_attention import semla_attention_reference

    rows = []
    for B, N in CASES:
        args = layer_op_inputs(config, B, N)
        variants = {
            "reference": partial(semla_attention, **args, backend="reference"),
            backend: partial(semla_attention, **args, backend=backend, precision=precision),
        }
        if compile_reference and (compiled := compiled_or_none(semla_attention_reference, args)) is not None:
            variants["compiled"] = partial(compiled, **args)
        with torch.inference_mode():
            error = max_relative_error(variants[backend](), variants["reference"]())
            flops = count_flops(variants[backend])
        rows.append(timed_row(B, N, variants, backend, flops, error, repeats, peak_gflops))
    return rows


def bench_forward(
    config: SemlaConfig,
    backend: str,
    repeats: int,
    compile_reference: bool,
    peak_gflops: float,
    precision: str = "fp32",
):
    """The whole generator: unpatched vs patched vs compiled unpatched vs compiled patched; FLOPs of the patched
    (split) form."""
    reference = Semla(config).eval()
    fused = Semla(config).eval()
    fused.load_state_dict(reference.state_dict())
    patch_model(fused, kernels=backend, precision=precision)
    rows = []
    for B, N in CASES:
        if N >= config.max_atoms:
            print(
                f"  ({B} x {N} atoms skipped: the config embeds sizes below max_atoms = {config.max_atoms})"
            )
            continue
        inputs = random_inputs(config, B, N)
        variants = {"reference": partial(reference, **inputs), backend: partial(fused, **inputs)}
        if compile_reference and (compiled := compiled_or_none(reference, inputs)) is not None:
            variants["compiled"] = partial(compiled, **inputs)
        if compile_reference and (compiled_fused := compiled_or_none(fused, inputs)) is not None:
            variants["compiled_fused"] = partial(compiled_fused, **inputs)  # the patched model, compiled
        with torch.inference_mode():
            error = max_relative_error(variants[backend](), variants["reference"]())
            flops = count_flops(variants[backend])
        row = timed_row(B, N, variants, backend, flops, error, repeats, peak_gflops)
        if "compiled_fused_ms" in row:
            row["compiled_fused_vs_fused"] = row[f"{backend}_ms"] / row["compiled_fused_ms"]
        rows.append(row)
    return rows


def bench_memory(config: SemlaConfig, backend: str) -> list[dict]:
    """Peak activation memory of one forward, unpatched vs patched, at each size."""
    rows = []
    for B, N in CASES:
        if N < config.max_atoms:
            reference, fused = (peak_memory_mib(config, B, N, variant) for variant in ("reference", backend))
            rows.append(
                {
                    "molecules": B,
                    "atoms": N,
                    "reference_peak_mib": reference,
                    f"{backend}_peak_mib": fused,
                    "ratio": fused / reference,
                }
            )
    return rows


def peak_memory_mib(config: SemlaConfig, B: int, N: int, kernels: str) -> float:
    """Peak activation memory (MiB) of one forward of a random-weight ``config`` model on B x N atoms,
    unpatched (``kernels="reference"``) or ``patch_model(kernels=kernels)``: the peak of the live bytes
    torch's CPU allocator holds during the call, above those held before it (``peak_allocated_bytes``, one
    thread)."""
    model = Semla(config).eval()
    if kernels != "reference":
        patch_model(model, kernels=kernels)
    inputs = random_inputs(config, B, N)
    with torch.no_grad():
        model(**inputs)  # warm-up: lazy initialisation is not activation memory
        return peak_allocated_bytes(lambda: model(**inputs)) / 2**20


def bench_sampling(n: int, steps: int, backend: str, seed: int = 0, precision: str = "fp32") -> list[dict]:
    """Molecules/s of the packaged model: reference, fused kernels, cache (Taylor-2, D=2), both."""
    from fastflow.cache import CacheConfig
    from fastflow.pretrained import load_pretrained
    from fastflow.sampling import sample

    rows, unfused = [], {}
    for kernels, cache in [
        ("reference", None),
        (backend, None),
        ("reference", CacheConfig(interval=2)),
        (backend, CacheConfig(interval=2)),
    ]:
        model = load_pretrained()
        handle = patch_model(
            model, kernels=kernels, cache=cache, precision="fp32" if kernels == "reference" else precision
        )
        result = sample(
            model, n, steps=steps, seed=seed, size_distribution=model.size_counts, kernels=kernels
        )  # the solver step's fused op too: "reference" is the whole reference path
        row = {
            "kernels": kernels,
            "cache": "none" if cache is None else "taylor-2, D=2",
            "molecules": n,
            "steps": steps,
            "nfe": result.stats["nfe"],
            "seconds": result.stats["sampling_seconds"],
            "molecules_per_second": result.stats["molecules_per_second"],
            "cache_hit_rate": handle.stats().get("hit_rate", 0.0),
        }
        if kernels == "reference":
            unfused[row["cache"]] = result
        else:  # same noise, same cache: molecules differ only where fp32 rounding flips an argmax
            twin = unfused[row["cache"]]
            row["same_graph_as_reference"] = sum(
                _same_graph(a, b) for a, b in zip(result.graphs, twin.graphs)
            )
            row["max_coord_difference"] = max(
                (a - b).abs().max().item() for a, b in zip(result.coords, twin.coords)
            )
        rows.append(row)
    base = rows[0]["molecules_per_second"]
    for row in rows:
        row["speedup"] = row["molecules_per_second"] / base
    return rows


def _same_graph(a, b) -> bool:
    return all(
        torch.equal(x, y)
        for x, y in ((a.atom_types, b.atom_types), (a.bond_types, b.bond_types), (a.charges, b.charges))
    )


def print_table(title: str, rows: list[dict], columns: list[str]) -> None:
    print(f"\n{title}")
    print("  ".join(f"{c:>14}" for c in columns))
    for row in rows:
        cells = []
        for c in columns:
            value = row.get(c)
            if isinstance(value, float):
                cells.append(f"{value:>14.3g}" if c in ("max_rel_error",) else f"{value:>14.2f}")
            else:
                cells.append(f"{'-' if value is None else value:>14}")
        print("  ".join(cells))


def run(
    presets=("semlaflow", "small"),
    backend: str = "auto",
    repeats: int = 5,
    compile_reference: bool = True,
    sampling_molecules: int = 64,
    sampling_steps: int = 100,
    out: Path | None = None,
    parts=("op", "forward", "memory", "sampling"),
    precision: str = "fp32",
):
    """Run the chosen parts, print the tables, write JSON to ``out`` (when given) and return the results.
    ``precision`` applies to the fused variants of op, forward and sampling (memory is measured in fp32)."""
    from fastflow.ops.backends import resolve_backend, resolve_precision

    device = "cpu" if not torch.cuda.is_available() else "cuda"
    backend = resolve_backend(backend, device)
    precision = resolve_precision(precision, device)
    if backend == "reference":
        raise RuntimeError(
            "no fused backend is available here; `fastflow bench kernels` compares one to the reference"
        )
    machine = machine_metadata()
    peak = machine["gemm_gflops"]["fp32"]
    results = {
        "metadata": {
            **machine,
            "backend": backend,
            "precision": precision,
            "repeats": repeats,
            "matmul_gflops": peak,
        },
        "op": {},
        "forward": {},
        "memory": {},
    }
    print(machine_header(machine))
    print(
        f"backend {backend}, precision {precision}; gflops columns are fractions of the fp32 matmul rate "
        f"{peak:.1f} GFLOP/s"
    )
    op_columns = [
        "molecules",
        "atoms",
        "reference_ms",
        "compiled_ms",
        f"{backend}_ms",
        "speedup",
        "speedup_vs_compiled",
        "gflops",
        "fraction_of_matmul",
        "max_rel_error",
    ]
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*TF32.*")
        for preset in presets:
            config = SemlaConfig.preset(preset)
            if "op" in parts:
                results["op"][preset] = bench_op(
                    config, backend, repeats * 4, compile_reference, peak, precision
                )
                print_table(
                    f"semla_attention, one core layer of '{preset}'", results["op"][preset], op_columns
                )
            if "forward" in parts:
                results["forward"][preset] = bench_forward(
                    config, backend, repeats, compile_reference, peak, precision
                )
                forward_columns = [
                    *op_columns[:5],
                    "compiled_fused_ms",
                    "compiled_fused_vs_fused",
                    *op_columns[5:],
                ]
                print_table(f"generator forward, '{preset}'", results["forward"][preset], forward_columns)
            if "memory" in parts:
                results["memory"][preset] = bench_memory(config, backend)
                print_table(
                    f"peak activation memory of one forward, '{preset}' (MiB, one thread)",
                    results["memory"][preset],
                    ["molecules", "atoms", "reference_peak_mib", f"{backend}_peak_mib", "ratio"],
                )
    if sampling_molecules and "sampling" in parts:
        results["sampling"] = bench_sampling(sampling_molecules, sampling_steps, backend, precision=precision)
        print_table(
            f"sampling, packaged model, {sampling_molecules} molecules x {sampling_steps} steps",
            results["sampling"],
            [
                "kernels",
                "cache",
                "nfe",
                "seconds",
                "molecules_per_second",
                "speedup",
                "same_graph_as_reference",
                "max_coord_difference",
            ],
        )
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(results, indent=1) + "\n")
        print(f"\n-> {out}")
    return results
