"""The ``fastflow`` command line: ``fastflow sample …`` (more subcommands arrive with their issues)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from fastflow.models import PRESETS

DEFAULT_RANDOM_PRESET = "small"
JSON_KEYS = ("n", "steps", "nfe", "seconds", "molecules_per_second", "atom_stability", "mol_stability",
             "validity", "connected_validity", "uniqueness", "energy_per_atom", "strain_per_atom")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fastflow", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)

    sample = commands.add_parser("sample", help="sample molecules, write an SDF and print the metrics table")
    sample.add_argument("--n", type=int, default=100, help="number of molecules (default 100)")
    sample.add_argument("--steps", type=int, default=100, help="ODE solver steps (default 100)")
    sample.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    sample.add_argument("--schedule", choices=("log", "linear"), default="log", help="time schedule (default log)")
    sample.add_argument("--out", type=Path, default=None, help="SDF file to write (optional)")
    model = sample.add_mutually_exclusive_group()
    model.add_argument("--config", choices=sorted(PRESETS), default=None,
                       help="a randomly initialised model of this preset (for speed checks, not chemistry)")
    model.add_argument("--checkpoint", type=Path, default=None,
                       help="an upstream SemlaFlow Lightning .ckpt, or a fastflow model directory")
    sample.add_argument("--batch-size", type=int, default=128, help="molecules per batch (default 128)")
    sample.add_argument("--device", default=None, help="cpu or cuda (default: the model's device, cpu)")
    sample.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    sample.add_argument("--no-energy", action="store_true", help="skip the MMFF energy and strain metrics")
    sample.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    sample.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                        help="progress bar (default: when stderr is a terminal)")
    sample.set_defaults(handler=run_sample)
    return parser


def load_model(args) -> tuple[torch.nn.Module, str]:
    """The model the user asked for, and a one-line description of it."""
    from fastflow.models import Semla, SemlaConfig
    from fastflow.models.checkpoint import load_pretrained_dir, load_semlaflow_checkpoint

    if args.checkpoint is not None:
        if args.checkpoint.is_dir():
            return load_pretrained_dir(args.checkpoint), f"fastflow model {args.checkpoint}"
        return load_semlaflow_checkpoint(args.checkpoint), f"SemlaFlow checkpoint {args.checkpoint}"
    preset = args.config or DEFAULT_RANDOM_PRESET
    torch.manual_seed(args.seed)
    model = Semla(SemlaConfig.preset(preset)).eval()
    return model, (f"RANDOMLY INITIALISED '{preset}' model (no trained default model ships with this version "
                   "yet): the molecules are noise; use --checkpoint for a trained one")


def run_sample(args) -> int:
    from fastflow.chem.sdf import write_sdf
    from fastflow.metrics import compute_metrics, format_metrics_table
    from fastflow.sampling import sample

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    model, description = load_model(args)
    if args.device is not None:
        model = model.to(args.device)
    print(f"model: {description}", file=sys.stderr)
    result = sample(model, args.n, steps=args.steps, schedule=args.schedule, seed=args.seed,
                    batch_size=args.batch_size, progress=args.progress)
    metrics = compute_metrics(result.graphs, result.molecules, energy=not args.no_energy)
    summary = {
        **metrics,
        "steps": args.steps,
        "nfe": result.stats["nfe"],
        "seconds": result.stats["sampling_seconds"],
        "molecules_per_second": result.stats["molecules_per_second"],
        "seed": args.seed,
        "schedule": args.schedule,
        "model": description,
        "threads": torch.get_num_threads(),
    }
    if args.out is not None:
        written = write_sdf(args.out, result.molecules)
        summary["sdf"] = str(args.out)
        print(f"wrote {written} of {args.n} molecules to {args.out}", file=sys.stderr)
    if args.json:
        print(json.dumps({key: summary.get(key) for key in JSON_KEYS} | summary, default=float))
    else:
        print(format_metrics_table({"generated": metrics}))
        print(f"{args.n} molecules, {args.steps} steps, {result.stats['nfe']} network evaluations, "
              f"{summary['seconds']:.2f} s ({summary['molecules_per_second']:.1f} molecules/s, "
              f"{summary['threads']} threads)")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.handler(args)
    except (ValueError, FileNotFoundError) as error:
        print(f"fastflow {args.command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
