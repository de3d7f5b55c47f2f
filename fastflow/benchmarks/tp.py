"""``fastflow bench tp``: e3nn-compatible tensor products, fastflow's fused ops against e3nn, cuequivariance and
``torch.compile(e3nn)``, measured side by side in one run.

Configurations (NequIP's convolution: mode uvu, per-edge weights, node features x edge spherical harmonics ->
every uvu-reachable irrep up to the harmonics' degree, outputs sorted as NequIP does):
    l1   32x0e+32x1o               x  SH l <= 2
    l2   32x0e+32x1o+32x2e         x  SH l <= 2
    l3   32x0e+32x1o+32x2e+32x3o   x  SH l <= 3
for E edges (N = E / 20 nodes, random endpoints) and two ops:
    tensor_product  on gathered rows: out[e] = TP(x[src[e]], sh[e]; w[e])         [E, dim_out] out
    tp_conv         gather + product + scatter-sum to destinations               [N, dim_out] out
and two passes: forward (no autograd) and forward+backward (gradients of node features, edge attributes and
weights, as force training needs).

Variants: ``fastflow`` (the chosen backend), ``e3nn`` (``o3.TensorProduct``; for tp_conv with ``x[src]`` and
``index_add``), ``cuequivariance`` (``cuet.ChannelWiseTensorProduct`` with ``method="naive"``, its PyTorch path
and the only one on CPU; tp_conv through its ``indices_1`` / ``indices_out`` gather-scatter arguments), and
``e3nn_compiled`` (``torch.compile`` of the e3nn variant; skipped with the reason if it fails). Times are medians
of interleaved repeats after warm-up. ``max_rel_error`` is max|fastflow - e3nn| / max|e3nn| of the forward output.
"""

from __future__ import annotations

import argparse
import json
import platform
import warnings
from datetime import UTC, datetime
from pathlib import Path

import torch

from fastflow.benchmarks.timing import machine_header, machine_metadata, median_seconds

CONFIGS = {
    "l1": ("32x0e+32x1o", 2),
    "l2": ("32x0e+32x1o+32x2e", 2),
    "l3": ("32x0e+32x1o+32x2e+32x3o", 3),
}
EDGES = (2_000, 20_000, 200_000)
OPS = ("tensor_product", "tp_conv")
PASSES = ("forward", "forward+backward")
VARIANTS = ("fastflow", "e3nn", "cuequivariance", "e3nn_compiled")
RESULTS_DIR = Path(__file__).resolve().parents[2] / "bench" / "results"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--configs",
        nargs="+",
        choices=sorted(CONFIGS),
        default=list(CONFIGS),
        help="irreps configurations (default l1 l2 l3)",
    )
    parser.add_argument(
        "--edges", nargs="+", type=int, default=list(EDGES), help="edge counts (default 2k 20k 200k)"
    )
    parser.add_argument(
        "--degree", type=int, default=20, help="average in-degree: N = E / degree (default 20)"
    )
    parser.add_argument("--ops", nargs="+", choices=OPS, default=list(OPS))
    parser.add_argument("--passes", nargs="+", choices=PASSES, default=list(PASSES))
    parser.add_argument(
        "--backend",
        choices=("auto", "cpp", "triton", "reference"),
        default="auto",
        help="fastflow backend to measure (default auto)",
    )
    parser.add_argument("--repeats", type=int, default=5, help="timed repeats per variant (default 5)")
    parser.add_argument(
        "--compile",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also time torch.compile of the e3nn variant (default on)",
    )
    parser.add_argument(
        "--cuequivariance",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also time cuequivariance's ChannelWiseTensorProduct (default on, if installed)",
    )
    parser.add_argument(
        "--memory-limit-gb",
        type=float,
        default=12.0,
        help="skip the baselines of a case whose [E, ·] tensors would exceed this (default 12)",
    )
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON here")


def default_out(results_dir: Path = RESULTS_DIR) -> Path:
    date = datetime.now(UTC).date().isoformat()
    return Path(results_dir) / f"tp-{platform.node()}-{date}.json"


def nequip_tensor_product(irreps_node: str, lmax: int, **options):
    """NequIP's convolution product as an e3nn module: node features x spherical harmonics (l <= lmax) -> every
    uvu-reachable irrep with l <= lmax, per-edge weights, instructions permuted to the sorted output irreps (as
    NequIP builds it). options: further keyword arguments of ``o3.TensorProduct``; the module is built in the
    default dtype."""
    from e3nn import o3

    irreps_node, irreps_sh = o3.Irreps(irreps_node), o3.Irreps.spherical_harmonics(lmax)
    irreps_mid, instructions = [], []
    for i, (mul, ir_in) in enumerate(irreps_node):
        for j, (_, ir_edge) in enumerate(irreps_sh):
            for ir_out in ir_in * ir_edge:
                if ir_out.l <= lmax:
                    instructions.append((i, j, len(irreps_mid), "uvu", True))
                    irreps_mid.append((mul, ir_out))
    irreps_mid, permutation, _ = o3.Irreps(irreps_mid).sort()
    instructions = [(i, j, permutation[k], mode, train) for i, j, k, mode, train in instructions]
    return o3.TensorProduct(
        irreps_node,
        irreps_sh,
        irreps_mid,
        instructions,
        shared_weights=False,
        internal_weights=False,
        **options,
    )


def case_inputs(tp, n_edges: int, n_nodes: int, seed: int = 0) -> dict:
    from e3nn import o3

    g = torch.Generator().manual_seed(seed)
    vectors = torch.randn(n_edges, 3, generator=g)
    return {
        "node_feats": torch.randn(n_nodes, tp.irreps_in1.dim, generator=g),
        "edge_attrs": o3.spherical_harmonics(
            tp.irreps_in2, vectors, normalize=True, normalization="component"
        ),
        "weights": torch.randn(n_edges, tp.weight_numel, generator=g),
        "edge_src": torch.randint(n_nodes, (n_edges,), generator=g),
        "edge_dst": torch.randint(n_nodes, (n_edges,), generator=g),
    }


def cuequivariance_module(irreps_node: str, lmax: int):
    """cuequivariance's channel-wise product of the same shape (its own output order and normalisation)."""
    import cuequivariance as cue
    import cuequivariance_torch as cuet

    irreps_sh = "+".join(f"{l}{'e' if l % 2 == 0 else 'o'}" for l in range(lmax + 1))
    node = cue.Irreps("O3", irreps_node)
    filter_out = [cue.O3(l, p) for l in range(lmax + 1) for p in (1, -1)]  # outputs l <= lmax, as NequIP
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return cuet.ChannelWiseTensorProduct(
            node,
            cue.Irreps("O3", irreps_sh),
            filter_irreps_out=filter_out,
            layout=cue.mul_ir,
            shared_weights=False,
            internal_weights=False,
            method="naive",
        )


def _compiled(fn, example: tuple, backward: bool):
    """torch.compile(fn) warmed up (both passes), or the reason it failed."""
    try:
        torch._dynamo.reset()  # a fresh, static-shape compile per case: no recompile limit, no stale graphs
        compiled = torch.compile(fn, dynamic=False)
        out = compiled(*example)
        if backward:
            out.backward(torch.ones_like(out))
        return compiled, None
    except Exception as error:  # noqa: BLE001 — any compiler failure means "no compiled row", reported
        return None, f"{type(error).__name__}: {str(error).splitlines()[0][:200] if str(error) else ''}"


def bench_case(
    config: str,
    n_edges: int,
    degree: int,
    ops,
    passes,
    backend: str,
    repeats: int,
    compile_e3nn: bool,
    cuequivariance: bool,
    memory_limit_gb: float,
) -> list[dict]:
    from fastflow.nn import TensorProduct, TPConv

    irreps_node, lmax = CONFIGS[config]
    tp = nequip_tensor_product(irreps_node, lmax)
    n_nodes = max(1, n_edges // degree)
    data = case_inputs(tp, n_edges, n_nodes)
    fused_tp, fused_conv = TensorProduct(tp, backend=backend), TPConv(tp, backend=backend)
    cue_module, cue_weights, skipped = None, None, {}
    if cuequivariance:
        try:
            cue_module = cuequivariance_module(irreps_node, lmax)
            cue_weights = torch.randn(n_edges, cue_module.weight_numel)
        except ImportError as error:
            skipped["cuequivariance"] = f"not installed ({error})"
    # [E, ·] floats a baseline holds at once (messages, gathered rows, weights; about twice with gradients)
    baseline_bytes = 4 * n_edges * (tp.irreps_out.dim + tp.irreps_in1.dim + tp.weight_numel) * 3
    baselines = baseline_bytes <= memory_limit_gb * 2**30
    if not baselines:
        for name in ("e3nn", "cuequivariance", "e3nn_compiled"):
            skipped[name] = (
                f"estimated {baseline_bytes / 2**30:.1f} GiB > --memory-limit-gb {memory_limit_gb}"
            )
        cue_module = None
    src, dst = data["edge_src"], data["edge_dst"]

    def e3nn_conv(x, sh, w):
        messages = tp(x[src], sh, w)
        return messages.new_zeros(n_nodes, messages.size(1)).index_add(0, dst, messages)

    rows = []
    for op in ops:
        for pass_ in passes:
            backward = pass_ == "forward+backward"
            x = data["node_feats"] if op == "tp_conv" else data["node_feats"][src].contiguous()
            leaves = [t.clone().requires_grad_(backward) for t in (x, data["edge_attrs"], data["weights"])]
            cue_weights_leaf = None if cue_weights is None else cue_weights.clone().requires_grad_(backward)
            functions = {}
            if op == "tp_conv":
                functions["fastflow"] = lambda a, b, w: fused_conv(a, b, w, src, dst, n_nodes)
                if baselines:
                    functions["e3nn"] = e3nn_conv
                if cue_module is not None:
                    functions["cuequivariance"] = lambda a, b, w, cw=cue_weights_leaf: cue_module(
                        a, b, cw, indices_1=src, indices_out=dst, size_out=n_nodes
                    )
            else:
                functions["fastflow"] = fused_tp
                if baselines:
                    functions["e3nn"] = tp
                if cue_module is not None:
                    functions["cuequivariance"] = lambda a, b, w, cw=cue_weights_leaf: cue_module(a, b, cw)
            if compile_e3nn and baselines:
                compiled, reason = _compiled(functions["e3nn"], tuple(leaves), backward)
                if compiled is not None:
                    functions["e3nn_compiled"] = compiled
                else:
                    skipped["e3nn_compiled"] = reason
            elif not compile_e3nn:
                skipped["e3nn_compiled"] = "--no-compile"

            with torch.no_grad():
                reference = functions["e3nn"](*leaves) if "e3nn" in functions else None
                out = functions["fastflow"](*leaves)
            grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(1))
            error = None
            if reference is not None:
                error = ((out - reference).abs().max() / reference.abs().max().clamp_min(1e-30)).item()
            grads_of = [*leaves, cue_weights_leaf]
            seconds = median_seconds(
                {
                    name: _timed(f, leaves, grads_of, grad if backward else None)
                    for name, f in functions.items()
                },
                repeats,
                warmup=1,
            )
            row = {
                "config": config,
                "irreps_node": irreps_node,
                "irreps_edge": str(tp.irreps_in2),
                "irreps_out": str(tp.irreps_out),
                "paths": len(tp.instructions),
                "weights_per_edge": tp.weight_numel,
                "edges": n_edges,
                "nodes": n_nodes,
                "op": op,
                "pass": pass_,
                "backend": backend,
                "max_rel_error": error,
                **{f"{name}_ms": 1e3 * s for name, s in seconds.items()},
                "skipped": {k: v for k, v in skipped.items() if k not in seconds},
            }
            for name in ("e3nn", "cuequivariance", "e3nn_compiled"):
                if name in seconds:
                    row[f"speedup_vs_{name}"] = seconds[name] / seconds["fastflow"]
            rows.append(row)
            print(format_row(row), flush=True)
    return rows


def _timed(function, leaves, grads_of, grad):
    """One timed call: forward only (grad None, no autograd), or forward and backward with ``grad``."""

    def run():
        if grad is None:
            with torch.no_grad():
                function(*leaves)
            return
        function(*leaves).backward(grad)
        for leaf in grads_of:
            if leaf is not None:
                leaf.grad = None

    return run


def format_row(row: dict) -> str:
    times = "  ".join(
        f"{name} {row[f'{name}_ms']:9.2f} ms" if f"{name}_ms" in row else f"{name} {'—':>9}   "
        for name in VARIANTS
    )
    speedups = "  ".join(
        f"x{row[f'speedup_vs_{name}']:.1f} vs {name}"
        for name in ("e3nn", "cuequivariance")
        if f"speedup_vs_{name}" in row
    )
    error = "" if row["max_rel_error"] is None else f"  err {row['max_rel_error']:.1e}"
    return f"{row['config']:3} E={row['edges']:>7} {row['op']:15} {row['pass']:17} {times}  {speedups}{error}"


def run(
    configs=tuple(CONFIGS),
    edges=EDGES,
    degree: int = 20,
    ops=OPS,
    passes=PASSES,
    backend: str = "auto",
    repeats: int = 5,
    compile_e3nn: bool = True,
    cuequivariance: bool = True,
    memory_limit_gb: float = 12.0,
    out: Path | None = None,
) -> dict:
    from fastflow.ops.tensor_product import _resolve

    resolved = _resolve(backend, torch.device("cuda" if backend == "triton" else "cpu"))
    machine = machine_metadata()
    print(machine_header(machine))
    print(f"fastflow bench tp: backend {backend} -> {resolved}, {torch.get_num_threads()} threads")
    rows = []
    for config in configs:
        for n_edges in edges:
            rows += bench_case(
                config,
                n_edges,
                degree,
                ops,
                passes,
                backend,
                repeats,
                compile_e3nn,
                cuequivariance,
                memory_limit_gb,
            )
    results = {
        "benchmark": "tp",
        "machine": machine,
        "backend": backend,
        "resolved_backend": resolved,
        "repeats": repeats,
        "degree": degree,
        "rows": rows,
    }
    if out is not None:
        out = Path(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(results, indent=1) + "\n")
        print(f"wrote {out}")
    return results


def run_from_args(args) -> dict:
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    return run(
        configs=tuple(args.configs),
        edges=tuple(args.edges),
        degree=args.degree,
        ops=tuple(args.ops),
        passes=tuple(args.passes),
        backend=args.backend,
        repeats=args.repeats,
        compile_e3nn=args.compile,
        cuequivariance=args.cuequivariance,
        memory_limit_gb=args.memory_limit_gb,
        out=args.out,
    )
