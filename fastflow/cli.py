"""The ``fastflow`` command line: sample, eval, train, data, bench and merge."""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
from pathlib import Path

import torch

from fastflow.models import PRESETS
from fastflow.ops.backends import BACKENDS

DEFAULT_RANDOM_PRESET = "small"
JSON_KEYS = (
    "n",
    "steps",
    "nfe",
    "cache_hit_rate",
    "seconds",
    "molecules_per_second",
    "atom_stability",
    "mol_stability",
    "validity",
    "connected_validity",
    "uniqueness",
    "energy_per_atom",
    "strain_per_atom",
)
CACHE_CHOICES = ("none", "reuse", "taylor", "ab", "adaptive")
ADAPTIVE_DEFAULT_INTERVAL = 6  # the adaptive policy's cap on the gap between evaluations


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fastflow", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)

    sample = commands.add_parser("sample", help="sample molecules, write an SDF and print the metrics table")
    sample.add_argument("--n", type=int, default=100, help="number of molecules (default 100)")
    sample.add_argument("--steps", type=int, default=100, help="ODE solver steps (default 100)")
    sample.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    sample.add_argument(
        "--schedule", choices=("log", "linear"), default="log", help="time schedule (default log)"
    )
    sample.add_argument(
        "--out",
        type=Path,
        default=None,
        help="where to write the molecules (optional): a path ending in .sdf is one SDF file; any "
        "other path is a shard directory (resumable; required under torchrun, whose ranks "
        "share its shards; see --shard-size and `fastflow merge`)",
    )
    sample.add_argument(
        "--shard-size",
        type=int,
        default=None,
        help="molecules per shard of a shard directory (default 1000; part of the request)",
    )
    sample.add_argument(
        "--overwrite",
        action="store_true",
        help="discard the shards of a directory that holds another request and start over",
    )
    model = sample.add_mutually_exclusive_group()
    model.add_argument(
        "--config",
        choices=sorted(PRESETS),
        default=None,
        help="a randomly initialised model of this preset (for speed checks, not chemistry)",
    )
    model.add_argument(
        "--checkpoint",
        type=Path,
        default=None,
        help="an upstream SemlaFlow Lightning .ckpt, or a fastflow model directory "
        "(default: the packaged QM9 model)",
    )
    add_model_argument(model)
    sample.add_argument("--batch-size", type=int, default=128, help="molecules per batch (default 128)")
    sample.add_argument("--device", default=None, help="cpu or cuda (default: the model's device, cpu)")
    sample.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    sample.add_argument("--no-energy", action="store_true", help="skip the MMFF energy and strain metrics")
    sample.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    sample.add_argument(
        "--progress",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="progress bar (default: when stderr is a terminal)",
    )
    add_cache_arguments(sample)
    sample.set_defaults(handler=run_sample)
    add_train_parser(commands)
    add_data_parser(commands)
    add_eval_parser(commands)
    add_bench_parser(commands)
    add_merge_parser(commands)
    return parser


def add_model_argument(parser) -> None:
    from fastflow.pretrained import DEFAULT_MODEL

    parser.add_argument(
        "--model",
        default=None,
        metavar="NAME",
        help=f"a packaged model: {DEFAULT_MODEL} (QM9, the default) or moses3d-small (drug-size)",
    )


def add_cache_arguments(parser: argparse.ArgumentParser) -> None:
    """--kernels, and --cache, --interval, --order, --tolerance, --clock (see :func:`cache_config`)."""
    parser.add_argument(
        "--kernels",
        choices=BACKENDS,
        default="auto",
        help="fused Semla kernels: auto (C++ on CPU, Triton on CUDA), cpp, triton, or reference "
        "(the unfused PyTorch model) (default auto)",
    )
    parser.add_argument(
        "--precision",
        choices=("fp32", "bf16", "tf32", "auto"),
        default="fp32",
        help="matrix products of the fused kernels: fp32, bf16 (bfloat16 operands, fp32 accumulation, "
        "coordinates fp32; needs AMX or AVX512-BF16 on CPU), tf32 (CUDA), or auto (bf16 where the "
        "hardware has it) (default fp32)",
    )
    group = parser.add_argument_group("predictive feature cache")
    group.add_argument(
        "--cache",
        choices=CACHE_CHOICES,
        default="none",
        help="forecast skipped network evaluations: reuse, taylor, ab (Adams-Bashforth) every "
        "--interval steps, or adaptive (taylor, per molecule, --tolerance) (default none)",
    )
    group.add_argument(
        "--interval",
        type=int,
        default=None,
        help=f"D: evaluate every D steps (default 2); adaptive: at most D-1 forecasts in a row "
        f"(default {ADAPTIVE_DEFAULT_INTERVAL})",
    )
    group.add_argument("--order", type=int, default=None, help="forecaster order (default: taylor 2, ab 3)")
    group.add_argument(
        "--tolerance",
        type=float,
        default=None,
        help="adaptive: forecast error above which a molecule is re-evaluated, in units of 0.1 Å of "
        "x̂₁ (coordinates) and of the argmax margins of types and bonds (1 = a flip is possible)",
    )
    group.add_argument(
        "--clock",
        choices=("time", "steps"),
        default=None,
        help="forecast in solver time (exact on polynomials in t) or in step index, as the paper's "
        "code does (TaylorSeer ladder, classical Adams-Bashforth) (default time)",
    )


def patched_run(args, handle) -> dict:
    """The run settings a summary reports (:func:`fastflow.metrics.run_summary`): cache, its hit rate, the
    kernels backend, the precision and the thread count."""
    return {
        "cache": args.cache if handle.cache is None else repr(handle.cache),
        "cache_hit_rate": handle.stats().get("hit_rate", 0.0),
        "kernels": handle.report()["kernels"]["backend"],
        "precision": handle.precision,
        "threads": torch.get_num_threads(),
    }


def print_summary(summary: dict, as_json: bool, note: str = "") -> None:
    """One JSON object (``JSON_KEYS`` first), or the metrics table and the summary line (+ ``note``)."""
    from fastflow.metrics import format_metrics_table, summary_json, summary_line, summary_metrics

    if as_json:
        print(summary_json(summary, JSON_KEYS))
        return
    print(format_metrics_table({"generated": summary_metrics(summary)}))
    print(summary_line(summary) + note)


def merged_note(summary: dict) -> str:
    """What the summary line of a merged shard directory adds."""
    return f"; seconds summed over {summary['shards']} shards; {summary['written']} molecules in {summary['sdf']}"


def patch_from_args(model, args):
    """patch_model with the --kernels, --precision and --cache options; the handle reports the backend, the
    precision and the cache stats."""
    from fastflow.patch import patch_model

    return patch_model(model, kernels=args.kernels, cache=cache_config(args), precision=args.precision)


def cache_config(args):
    """The CacheConfig that --cache/--interval/--order/--tolerance/--clock ask for (None for --cache none)."""
    from fastflow.cache import CacheConfig

    adaptive = args.cache == "adaptive"
    clock = getattr(args, "clock", None)
    if args.cache == "none":
        if (args.interval, args.order, args.tolerance, clock) != (None, None, None, None):
            raise ValueError("--interval/--order/--tolerance/--clock need --cache")
        return None
    if adaptive != (args.tolerance is not None):
        raise ValueError("--tolerance goes with --cache adaptive, and --cache adaptive needs --tolerance")
    interval = args.interval if args.interval is not None else ADAPTIVE_DEFAULT_INTERVAL if adaptive else 2
    config = CacheConfig(
        forecaster="taylor" if adaptive else args.cache,
        order=args.order,
        interval=interval,
        tolerance=args.tolerance,
        clock=clock or "time",
    )
    if args.order is not None:  # a default order just builds up as far as the run allows
        reachable = config.reachable_order(args.steps)
        if reachable is None:
            raise ValueError(
                f"--order {args.order} is never used: with --interval {interval} no step of the {args.steps} "
                "is forecast"
            )
        if args.order > reachable:
            needs = "j" if config.forecaster == "ab" else "m + 1"
            raise ValueError(
                f"--order {args.order} is never reached: {args.steps} steps at --interval {interval} leave "
                f"at most order {reachable} (order m of {config.forecaster} needs {needs} earlier evaluations); "
                f"use --order {reachable} or lower, more --steps or a smaller --interval"
            )
    return config


def load_model(args) -> tuple[torch.nn.Module, str]:
    """The model the user asked for, and a one-line description of it."""
    from fastflow.models import Semla, SemlaConfig
    from fastflow.models.checkpoint import load_pretrained_dir, load_semlaflow_checkpoint
    from fastflow.pretrained import DEFAULT_MODEL, has_pretrained, load_pretrained
    from fastflow.sampling.sampler import check_seed

    if args.checkpoint is not None and getattr(args, "model", None) is not None:
        raise ValueError("give --checkpoint or --model, not both")
    if args.checkpoint is not None:
        if args.checkpoint.is_dir():
            return load_pretrained_dir(args.checkpoint), f"fastflow model {args.checkpoint}"
        if args.checkpoint.name == "model.safetensors":  # the weights file of a model directory
            return load_pretrained_dir(args.checkpoint.parent), f"fastflow model {args.checkpoint.parent}"
        if args.checkpoint.suffix == ".safetensors":
            raise ValueError(
                f"{args.checkpoint}: a fastflow model is a directory holding config.json and "
                "model.safetensors; pass the directory"
            )
        return load_semlaflow_checkpoint(args.checkpoint), f"SemlaFlow checkpoint {args.checkpoint}"
    if args.model is not None:
        return load_pretrained(
            args.model
        ), f"packaged model {args.model} (fastflow.load_pretrained({args.model!r}))"
    if args.config is None and has_pretrained():
        return load_pretrained(), f"packaged model {DEFAULT_MODEL} (fastflow.load_pretrained())"
    preset = args.config or DEFAULT_RANDOM_PRESET
    check_seed(args.seed)
    torch.manual_seed(args.seed)
    model = Semla(SemlaConfig.preset(preset)).eval()
    return model, (
        f"RANDOMLY INITIALISED '{preset}' model: the molecules are noise; use --checkpoint (or no "
        "--config, for the packaged model) for a trained one"
    )


def run_sample(args) -> int:
    from fastflow.chem.sdf import write_sdf
    from fastflow.metrics import compute_metrics, run_summary
    from fastflow.sampling import sample

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    directory = shard_directory(args.out, args.shard_size)
    if directory is not None:  # a shard directory, alone or under torchrun
        return run_sharded_sample(args, directory)
    model, description = load_model(args)
    if args.device is not None:
        model = model.to(args.device)
    print(f"model: {description}", file=sys.stderr)
    handle = patch_from_args(model, args)
    result = sample(
        model,
        args.n,
        steps=args.steps,
        schedule=args.schedule,
        seed=args.seed,
        batch_size=args.batch_size,
        progress=args.progress,
        size_distribution=getattr(model, "size_counts", None),
    )
    summary = run_summary(
        compute_metrics(result.graphs, result.molecules, energy=not args.no_energy),
        steps=args.steps,
        nfe=result.stats["nfe"],
        seconds=result.stats["sampling_seconds"],
        seed=args.seed,
        schedule=args.schedule,
        model=description,
        **patched_run(args, handle),
    )
    if args.out is not None:
        written = write_sdf(args.out, result.molecules)
        summary["sdf"] = str(args.out)
        print(f"wrote {written} of {args.n} molecules to {args.out}", file=sys.stderr)
    print_summary(summary, args.json)
    return 0


def shard_directory(out: Path | None, shard_size: int | None) -> Path | None:
    """The shard directory ``sample`` writes, or None for the single-process, single-SDF path.

    ``--out`` is a shard directory unless it ends in ``.sdf`` (and is not an existing directory); under torchrun
    (``WORLD_SIZE`` set) it must be one.
    """
    distributed = "WORLD_SIZE" in os.environ
    if out is None:
        if distributed or shard_size is not None:
            raise ValueError("sharded sampling (torchrun, --shard-size) writes a directory: give --out DIR")
        return None
    if out.suffix.lower() == ".sdf" and not out.is_dir():
        if distributed:
            raise ValueError(f"under torchrun --out must be a shard directory, not an .sdf file ({out})")
        if shard_size is not None:
            raise ValueError("--shard-size goes with --out DIR (a path that does not end in .sdf)")
        return None
    return out


def run_sharded_sample(args, directory: Path) -> int:
    """``fastflow sample --out DIR`` (alone or under torchrun): the CLI's options, :func:`sample_sharded`'s work."""
    from fastflow.sampling.coordination import Coordinator, OtherRankFailed
    from fastflow.sampling.sharded import sample_sharded
    from fastflow.sampling.shards import DEFAULT_SHARD_SIZE, ShardedRequest, model_fingerprint

    coordinator = Coordinator.from_env(args.device)
    try:
        model, description = load_model(args)
        if coordinator.device is not None:
            model = model.to(coordinator.device)
        if coordinator.rank == 0:
            print(f"model: {description}", file=sys.stderr)
            if coordinator.distributed:
                import torch.distributed as dist

                print(
                    f"sharded sampling: {coordinator.world_size} ranks ({dist.get_backend()}) into "
                    f"{directory}",
                    file=sys.stderr,
                )
        cache = cache_config(args)
        request = ShardedRequest(
            n=args.n,
            steps=args.steps,
            schedule=args.schedule,
            seed=args.seed,
            shard_size=DEFAULT_SHARD_SIZE if args.shard_size is None else args.shard_size,
            model_fingerprint=model_fingerprint(model),
            cache=cache,
            energy=not args.no_energy,
        )
        handle = patch_from_args(model, args)
        try:
            summary = sample_sharded(
                model,
                directory,
                request,
                coordinator,
                handle=handle,
                description=description,
                cache_label=args.cache if cache is None else repr(cache),
                batch_size=args.batch_size,
                size_distribution=getattr(model, "size_counts", None),
                overwrite=args.overwrite,
                progress=args.progress,
            )
        except OtherRankFailed:
            return 2
        if summary is not None:
            print_summary(summary, args.json, merged_note(summary))
        return 0
    finally:
        coordinator.close()


def add_train_parser(commands) -> None:
    from fastflow.training.trainer import TrainConfig

    train = commands.add_parser(
        "train", help="train a Semla generator on QM9 or MOSES3D (resumable), or export its weights"
    )
    train.add_argument(
        "--config", choices=sorted(PRESETS), default="small", help="model preset (default small)"
    )
    train.add_argument(
        "--data",
        choices=("qm9", "moses3d"),
        default=None,
        help="training set: qm9, or moses3d (drug-size, built by `fastflow data moses3d`; GEOM "
        "coordinate scale and size buckets) (default qm9; --resume keeps the run's)",
    )
    train.add_argument(
        "--out",
        type=Path,
        default=None,
        help="run directory (default runs/qm9-small, or runs/moses3d-small with --data moses3d)",
    )
    train.add_argument("--steps", type=int, default=None, help="stop at this total step count")
    train.add_argument(
        "--minutes", type=float, default=None, help="stop after this many minutes of this call"
    )
    train.add_argument(
        "--resume",
        action="store_true",
        help="continue the run in --out from its checkpoint (with the run's saved settings)",
    )
    train.add_argument(
        "--export",
        type=Path,
        default=None,
        metavar="DIR",
        help="write the EMA weights of --out's checkpoint as a model folder to DIR, then exit",
    )
    train.add_argument(
        "--export-to",
        type=Path,
        default=None,
        metavar="DIR",
        help="while training, export the EMA weights to DIR after each validation and at the end",
    )
    train.add_argument(
        "--batch-cost",
        type=int,
        default=TrainConfig.batch_cost,
        help=f"padded atoms per batch (default {TrainConfig.batch_cost})",
    )
    train.add_argument(
        "--lr", type=float, default=TrainConfig.lr, help=f"learning rate (default {TrainConfig.lr})"
    )
    train.add_argument(
        "--warmup-steps",
        type=int,
        default=TrainConfig.warmup_steps,
        help=f"linear warm-up steps (default {TrainConfig.warmup_steps})",
    )
    train.add_argument(
        "--lr-decay",
        type=int,
        nargs=2,
        default=None,
        metavar=("START", "STEPS"),
        help="cosine-anneal the learning rate to 10%% from step START over STEPS steps "
        "(with --resume: changes the resumed run's schedule)",
    )
    train.add_argument(
        "--lr-decay-peak",
        type=float,
        default=None,
        metavar="LR",
        help="learning rate at the start of --lr-decay (default: --lr); with --resume, a warm "
        "restart of the annealing from this lower peak",
    )
    train.add_argument(
        "--bond-weight",
        type=float,
        default=None,
        metavar="W",
        help="weight of the bond-type loss (default: upstream's for the data set, 0.5 for qm9 and 1.0 for "
        "moses3d); with --resume, changes the resumed run's objective from the next step",
    )
    train.add_argument(
        "--kekulize",
        action="store_true",
        help="train on Kekulé structures: aromatic bonds become RDKit's single/double bonds, so sampled "
        "rings need no Kekulé assignment (FlowMol-style); with --resume, switches the resumed run over",
    )
    train.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    train.add_argument(
        "--ot", action="store_true", help="equivariant OT between prior and data (Hungarian + Kabsch)"
    )
    train.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    train.add_argument(
        "--val-minutes",
        type=float,
        default=TrainConfig.val_minutes,
        help="minutes between validation samples of the EMA model (0: none)",
    )
    train.add_argument(
        "--checkpoint-minutes",
        type=float,
        default=TrainConfig.checkpoint_minutes,
        help="minutes between checkpoints",
    )
    train.add_argument(
        "--cache-dir", type=Path, default=None, help="preprocessed data cache (default ~/.cache/fastflow)"
    )
    train.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True, help="progress bar")
    train.set_defaults(handler=run_train)


def run_train(args) -> int:
    from fastflow.data import dataset_spec
    from fastflow.training import Objective, TrainConfig, Trainer
    from fastflow.training.checkpoint import load_checkpoint
    from fastflow.training.export import export_pretrained
    from fastflow.training.trainer import CHECKPOINT

    data_name = args.data or "qm9"
    if args.out is None:
        args.out = Path(f"runs/{data_name}-small")
    if args.export is not None:  # the model folder's config.json carries the run's coord_std
        directory = export_pretrained(args.out / CHECKPOINT, args.export)
        print(f"exported the EMA weights of {args.out / CHECKPOINT} to {directory}", file=sys.stderr)
        return 0
    if args.steps is None and args.minutes is None:
        raise ValueError("give --steps and/or --minutes")
    if args.resume:  # the run's own training set
        saved = load_checkpoint(args.out / CHECKPOINT)["train_config"].get("data", "qm9")
        if args.data is not None and args.data != saved:
            raise ValueError(f"{args.out} was trained on --data {saved}, not {args.data}")
        data_name = saved
    torch.set_num_threads(args.threads)
    spec = dataset_spec(data_name)
    dataset = spec.split(spec.load(args.cache_dir, progress=args.progress), "train")
    if args.resume:
        trainer = Trainer.resume(dataset, args.out)
    elif (args.out / CHECKPOINT).exists():
        raise ValueError(
            f"{args.out / CHECKPOINT} exists: pass --resume to continue it, or choose another --out"
        )
    else:
        config = TrainConfig(
            preset=args.config,
            data=data_name,
            bucket_limits=spec.bucket_limits,
            batch_cost=args.batch_cost,
            lr=args.lr,
            warmup_steps=args.warmup_steps,
            seed=args.seed,
            objective=Objective(
                bond_weight=spec.bond_loss_weight if args.bond_weight is None else args.bond_weight,
                equivariant_ot=args.ot,
            ),
            val_minutes=args.val_minutes,
            checkpoint_minutes=args.checkpoint_minutes,
            kekulize=args.kekulize,
        )
        trainer = Trainer(config, dataset, args.out)
    if args.resume and args.bond_weight is not None:
        print(
            f"bond-loss weight {trainer.config.objective.bond_weight} -> {args.bond_weight}", file=sys.stderr
        )
        trainer.set_objective(bond_weight=args.bond_weight)
    if args.resume and args.kekulize and not trainer.config.kekulize:
        print("switching the run to Kekulé bonds", file=sys.stderr)
        trainer.set_kekulize()
    if args.lr_decay_peak is not None and args.lr_decay is None:
        raise ValueError("--lr-decay-peak needs --lr-decay START STEPS")
    if args.lr_decay is not None:
        trainer.set_decay(*args.lr_decay, peak_lr=args.lr_decay_peak)
    print(f"training from step {trainer.step}; log: {args.out / 'log.jsonl'}", file=sys.stderr)
    print(
        json.dumps(trainer.run(args.steps, args.minutes, progress=args.progress, export_dir=args.export_to))
    )
    return 0


def add_data_parser(commands) -> None:
    from fastflow.data.moses3d import DEFAULT_SIZES

    data = commands.add_parser("data", help="preprocess a training set into the on-disk cache")
    data.add_argument(
        "dataset",
        choices=("qm9", "moses3d"),
        help="qm9: the qm9pack wheel's 130,831 DFT geometries; moses3d: MOSES SMILES (molsets wheel, "
        "`pip install --no-deps molsets==0.3.1`) with RDKit ETKDGv3 + MMFF94 conformers "
        "(resumable: rerun after an interruption)",
    )
    data.add_argument("--cache-dir", type=Path, default=None, help="cache folder (default ~/.cache/fastflow)")
    sizes = data.add_argument_group("moses3d")
    for split in ("train", "val", "test"):
        sizes.add_argument(
            f"--n-{split}",
            type=int,
            default=None,
            help=f"{split} molecules (default {DEFAULT_SIZES[split]:,})",
        )
    sizes.add_argument("--workers", type=int, default=None, help="conformer processes (default 2)")
    data.set_defaults(handler=run_data)


def run_data(args) -> int:
    import time

    from fastflow.data import MissingDataPackage, default_cache_dir, load_moses3d, load_qm9

    cache_dir = args.cache_dir or default_cache_dir()
    options = {"n_train": args.n_train, "n_val": args.n_val, "n_test": args.n_test}
    if args.dataset != "moses3d" and (
        any(v is not None for v in options.values()) or args.workers is not None
    ):
        raise ValueError("--n-train/--n-val/--n-test/--workers are moses3d options")
    started = time.monotonic()
    try:
        if args.dataset == "moses3d":
            data = load_moses3d(args.cache_dir, **options, workers=args.workers or 2, progress=True)
        else:
            data = load_qm9(args.cache_dir)
    except MissingDataPackage as error:
        print(f"fastflow data: error: {error}", file=sys.stderr)
        return 2
    splits = ", ".join(f"{name} {len(indices)}" for name, indices in data["split"].items())
    if args.dataset == "moses3d":
        reasons = ", ".join(f"{reason} {count}" for reason, count in data["failures"].items()) or "none"
        sizes = data["tensors"]["atom_ptr"].diff().float()
        print(
            f"MOSES3D: {data['n_read']} SMILES read, {data['n_failed']} dropped ({reasons}), "
            f"{data['n_read'] - data['n_failed']} kept; split {splits}; atoms with H: mean {sizes.mean():.1f}, "
            f"max {int(sizes.max())}; {data['mmff_unconverged']} MMFF runs hit the iteration limit (kept)"
        )
        print(
            f"conformer generation {data['seconds']:.1f} s (all runs); this call {time.monotonic() - started:.1f} s "
            f"wall; cache in {cache_dir}"
        )
        return 0
    print(
        f"QM9: {data['n_read']} read, {data['n_failed']} dropped (bond perception or sanitisation failed), "
        f"{data['n_read'] - data['n_failed']} kept; split {splits}; cache in {cache_dir}"
    )
    return 0


def add_eval_parser(commands) -> None:
    evaluate = commands.add_parser(
        "eval", help="metrics of generated molecules next to held-out test molecules"
    )
    evaluate.add_argument(
        "--n", type=int, default=1000, help="molecules to generate, and test molecules (default 1000)"
    )
    evaluate.add_argument("--steps", type=int, default=100, help="ODE solver steps (default 100)")
    evaluate.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    evaluate.add_argument(
        "--checkpoint",
        type=Path,
        default=None,
        help="a fastflow model directory, a training run's checkpoint.pt (EMA weights) or an "
        "upstream .ckpt (default: the packaged model)",
    )
    add_model_argument(evaluate)
    evaluate.add_argument(
        "--data",
        choices=("qm9", "moses3d"),
        default=None,
        help="test and training molecules for the data row and novelty (default: the data set "
        "the model was trained on, else qm9)",
    )
    evaluate.add_argument(
        "--posebusters",
        action="store_true",
        help="add the PoseBusters PB-valid fraction and per-check failure rates (`pip install posebusters`)",
    )
    evaluate.add_argument(
        "--data-row",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="the metrics of --n test molecules next to the generated ones (default on; the data row is "
        "the same for every model, and its PoseBusters checks take ~1 s per drug-size molecule); novelty "
        "against the training split stays",
    )
    evaluate.add_argument("--batch-size", type=int, default=128, help="molecules per batch (default 128)")
    evaluate.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    evaluate.add_argument("--no-energy", action="store_true", help="skip the MMFF energy and strain metrics")
    evaluate.add_argument(
        "--cache-dir", type=Path, default=None, help="data cache (default ~/.cache/fastflow)"
    )
    evaluate.add_argument(
        "--json",
        action="store_true",
        help="one JSON object: the keys of `sample --json`, and data_* for the data row",
    )
    evaluate.add_argument(
        "--progress",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="progress bar (default: when stderr is a terminal)",
    )
    add_cache_arguments(evaluate)
    evaluate.set_defaults(handler=run_eval, config=None)


def run_eval(args) -> int:
    from fastflow.data import MissingDataPackage, dataset_spec
    from fastflow.metrics import format_metrics_table, run_summary, summary_line, summary_metrics
    from fastflow.training import load_checkpoint
    from fastflow.training.evaluate import evaluate
    from fastflow.training.export import ema_model

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.posebusters and importlib.util.find_spec("posebusters") is None:  # before sampling, not after
        raise ValueError("--posebusters needs the posebusters package: pip install posebusters")
    if args.checkpoint is not None and args.checkpoint.suffix == ".pt":
        model, description = ema_model(load_checkpoint(args.checkpoint)), f"EMA weights of {args.checkpoint}"
    else:
        model, description = load_model(args)
    print(f"model: {description}", file=sys.stderr)
    dataset = args.data or getattr(model, "training_data", "qm9")
    try:
        data = dataset_spec(dataset).load(args.cache_dir)
    except MissingDataPackage as error:
        print(f"fastflow eval: no data row and no novelty: {error}", file=sys.stderr)
        data = None
    handle = patch_from_args(model, args)
    rows = evaluate(
        model,
        args.n,
        args.steps,
        args.seed,
        data,
        energy=not args.no_energy,
        batch_size=args.batch_size,
        progress=args.progress,
        dataset=dataset,
        posebusters=args.posebusters,
        data_row=args.data_row,
    )
    generated = rows.pop("generated")
    summary = run_summary(
        {key: generated[key] for key in generated if key not in ("nfe", "seconds", "molecules_per_second")},
        steps=args.steps,
        nfe=generated["nfe"],
        seconds=generated["seconds"],
        seed=args.seed,
        schedule="log",
        model=description,
        data=dataset,
        **patched_run(args, handle),
    )
    if args.json:
        print_summary(summary | {f"data_{key}": value for key, value in rows.get("data", {}).items()}, True)
    else:
        print(format_metrics_table({"generated": summary_metrics(summary), **rows}))
        print(
            summary_line(summary)
            + (f"; data row: {args.n} {dataset} test molecules" if "data" in rows else "")
        )
    return 0


def add_bench_parser(commands) -> None:
    bench = commands.add_parser("bench", help="measure fastflow's speed-ups on this machine")
    which = bench.add_subparsers(dest="benchmark", required=True)
    kernels = which.add_parser("kernels", help="fused Semla kernels vs the reference: op, forward, sampling")
    kernels.add_argument(
        "--presets",
        nargs="+",
        choices=sorted(PRESETS),
        default=["semlaflow", "small"],
        help="model configs (default semlaflow small)",
    )
    kernels.add_argument(
        "--backend",
        choices=("auto", "cpp", "triton"),
        default="auto",
        help="fused backend to measure (default auto)",
    )
    kernels.add_argument("--repeats", type=int, default=5, help="timed repeats per variant (default 5)")
    kernels.add_argument(
        "--compile",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also time torch.compile of the reference (default on)",
    )
    kernels.add_argument(
        "--sampling-molecules",
        type=int,
        default=64,
        help="molecules for the end-to-end sampling rows (0: skip) (default 64)",
    )
    kernels.add_argument("--sampling-steps", type=int, default=100, help="solver steps (default 100)")
    kernels.add_argument(
        "--parts",
        nargs="+",
        choices=("op", "forward", "memory", "sampling"),
        default=["op", "forward", "memory", "sampling"],
        help="what to measure (default all; memory: peak activation memory of one forward, "
        "CPU allocator via the profiler, one thread)",
    )
    kernels.add_argument(
        "--precision",
        choices=("fp32", "bf16", "tf32", "auto"),
        default="fp32",
        help="precision of the fused variants (op, forward, sampling; memory stays fp32) (default fp32)",
    )
    kernels.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    kernels.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    kernels.set_defaults(handler=run_bench_kernels)
    caching = which.add_parser("caching", help="speed-quality Pareto front of the predictive feature cache")
    from fastflow.benchmarks import caching as caching_benchmark

    caching_benchmark.add_arguments(caching)
    caching.set_defaults(handler=lambda args: caching_benchmark.run(args) and 0)
    tp = which.add_parser(
        "tp", help="e3nn-compatible tensor products and tp_conv vs e3nn, cuequivariance, compile"
    )
    from fastflow.benchmarks import tp as tp_benchmark

    tp_benchmark.add_arguments(tp)
    tp.set_defaults(handler=run_bench_tp)
    e3nn_models = which.add_parser(
        "e3nn-models", help="MACE and NequIP energy + forces: unpatched vs patched vs torch.compile"
    )
    from fastflow.benchmarks import e3nn_models as e3nn_models_benchmark

    e3nn_models_benchmark.add_arguments(e3nn_models)
    e3nn_models.set_defaults(handler=lambda args: e3nn_models_benchmark.run_from_args(args) and 0)
    gpu_static = which.add_parser(
        "gpu-static",
        help="compile the Triton kernels for NVIDIA GPUs without one: "
        "registers, spills, shared memory, tensor cores",
    )
    from fastflow.benchmarks import gpu_static as gpu_static_benchmark

    gpu_static_benchmark.add_arguments(gpu_static)
    gpu_static.set_defaults(handler=run_bench_gpu_static)
    precision = which.add_parser(
        "precision", help="bf16 matrix engines vs fp32: op, forward, and the sampling quality gate"
    )
    from fastflow.benchmarks import precision as precision_benchmark

    precision_benchmark.add_arguments(precision)
    precision.set_defaults(handler=precision_benchmark.run)
    roofline = which.add_parser(
        "roofline",
        help="predicted (not measured) A100 / H100 time of each GPU kernel from its FLOPs and bytes",
    )
    from fastflow.benchmarks import roofline as roofline_benchmark

    roofline_benchmark.add_arguments(roofline)
    roofline.set_defaults(handler=roofline_benchmark.run)


def run_bench_kernels(args) -> int:
    from fastflow.benchmarks.kernels import run

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    run(
        presets=tuple(args.presets),
        backend=args.backend,
        repeats=args.repeats,
        compile_reference=args.compile,
        sampling_molecules=args.sampling_molecules,
        sampling_steps=args.sampling_steps,
        out=args.out,
        parts=tuple(args.parts),
        precision=args.precision,
    )
    return 0


def run_bench_tp(args) -> int:
    from fastflow.benchmarks.tp import run_from_args

    run_from_args(args)
    return 0


def run_bench_gpu_static(args) -> int:
    from fastflow.benchmarks.gpu_static import run

    run(args)
    return 0


def add_merge_parser(commands) -> None:
    merge = commands.add_parser("merge", help="combine a shard directory into one SDF and one metrics table")
    merge.add_argument(
        "directory", type=Path, help="the --out DIR of `fastflow sample` (alone or under torchrun)"
    )
    merge.add_argument("--out", type=Path, default=None, help="merged SDF file (default DIR/molecules.sdf)")
    merge.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    merge.set_defaults(handler=run_merge)


def run_merge(args) -> int:
    """Exit status 0 when merged, 1 when shards are missing (listed on stderr), 2 for other errors."""
    from fastflow.sampling.coordination import DirectoryLock
    from fastflow.sampling.sharded import merge
    from fastflow.sampling.shards import MissingShards

    lock = DirectoryLock.acquire(args.directory, "merge", create=False)  # not while a job samples into it
    try:
        summary = merge(args.directory, args.out)
    except MissingShards as error:
        print(f"fastflow merge: incomplete: {error}", file=sys.stderr)
        return 1
    finally:
        lock.release()
    print_summary(summary, args.json, merged_note(summary))
    return 0


def check_outputs(args) -> None:
    """Refuse output paths that cannot be written, before any work: files (``--out`` of sample, merge and
    bench) and directories (a shard directory, merge's DIR, train's run and export folders, data's cache)."""
    if args.command == "sample" and args.out is not None:
        if args.out.suffix.lower() == ".sdf" and not args.out.is_dir():  # see shard_directory
            check_output_file(args.out, "--out")
        else:
            check_output_directory(args.out, "--out")
    elif args.command == "merge":
        if args.out is not None:
            check_output_file(args.out, "--out")
        elif args.directory.is_dir():  # a missing DIR is the merge's own error
            check_output_directory(args.directory, "DIR")
    elif args.command == "bench" and getattr(args, "out", None) is not None:
        check_output_file(args.out, "--out", create_parents=True)  # the benchmarks create the folder
    elif args.command == "train":
        for option in ("out", "export", "export_to"):
            if getattr(args, option) is not None:
                check_output_directory(getattr(args, option), "--" + option.replace("_", "-"))
    elif args.command == "data" and args.cache_dir is not None:
        check_output_directory(args.cache_dir, "--cache-dir")


def check_output_file(path: Path, option: str, create_parents: bool = False) -> None:
    """An output file: not a directory, in an existing folder (or one that can be created, with
    ``create_parents``) where we may write."""
    if path.is_dir():
        raise ValueError(f"{option} {path} is a directory; give the path of a file")
    if not create_parents and not path.parent.exists():
        raise ValueError(f"{option} {path}: directory {path.parent} does not exist")
    _check_writable(path.parent, option, path)
    if path.exists() and not os.access(path, os.W_OK):
        raise ValueError(f"{option} {path}: no permission to overwrite it")


def check_output_directory(path: Path, option: str) -> None:
    """An output directory: a directory if it exists, else creatable, and writable."""
    if path.exists() and not path.is_dir():
        raise ValueError(f"{option} {path} exists and is not a directory")
    _check_writable(path, option, path)


def _check_writable(directory: Path, option: str, path: Path) -> None:
    """``directory`` (or, where it is still to be created, its nearest existing parent) must be a directory we
    may write in."""
    existing = directory
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise ValueError(f"{option} {path}: {existing} is a file, not a directory")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ValueError(f"{option} {path}: no permission to write in {existing}")


def check_device(name: str | None) -> None:
    """--device: a device string torch knows, and one this machine has."""
    if name is None:
        return
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"--device {name!r} is not a device (use cpu, cuda or cuda:N)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(
            f"--device {name}: CUDA is not available here (torch {torch.__version__}"
            f"{', a CPU-only build' if torch.version.cuda is None else ''})"
        )
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"--device {name}: fastflow samples on cpu or cuda")


def main(argv: list[str] | None = None) -> int:
    """Exit status 0 on success, 2 for a user error (one line on stderr, no traceback)."""
    from fastflow.data import MissingDataPackage
    from fastflow.ops.backends import BackendUnavailable
    from fastflow.runtime import retain_freed_buffers

    args = build_parser().parse_args(argv)
    retain_freed_buffers()  # the CLI owns its process: reuse freed pair-sized buffers (see fastflow.runtime)
    try:
        check_device(getattr(args, "device", None))
        if getattr(args, "threads", None) is not None and args.threads < 1:
            raise ValueError(f"--threads must be at least 1, got {args.threads}")
        if getattr(args, "precision", "fp32") != "fp32":  # refused before the model loads
            from fastflow.ops.backends import resolve_precision

            resolve_precision(args.precision, getattr(args, "device", None) or "cpu")
        if getattr(args, "cache", None) is not None:
            cache_config(args)
        check_outputs(args)
        return args.handler(args)
    except (ValueError, OSError, BackendUnavailable, MissingDataPackage) as error:
        print(f"fastflow {args.command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
