"""The training loop: Adam (amsgrad) with linear warm-up, gradient clipping, EMA weights, resumable checkpoints,
a JSONL log of losses and periodic validation samples from the EMA model.

Run directory layout (``out``): ``checkpoint.pt`` (model, EMA, optimiser, step, epoch position, random state;
written atomically every ``checkpoint_minutes``), ``log.jsonl`` (one ``{"kind": "train" | "val", ...}`` record
per line) and ``train_config.json``.

Resuming continues exactly: the epoch's batch plan is a function of (seed, epoch) and the noise generator's state
is checkpointed, so an interrupted run and an uninterrupted one see the same batches and the same noise.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from fastflow.data.dataset import QM9_BUCKET_LIMITS, MolDataset, bucket_batches
from fastflow.models import Semla, SemlaConfig
from fastflow.training.checkpoint import load_checkpoint
from fastflow.training.objective import Objective, flow_loss

CHECKPOINT = "checkpoint.pt"
LOG = "log.jsonl"


@dataclass(frozen=True)
class TrainConfig:
    """Everything that defines a run (saved in the checkpoint; a resumed run keeps the saved values)."""

    preset: str = "small"
    data: str = "qm9"  # training set name ("qm9", "moses3d"): what `fastflow train --resume` reloads
    kekulize: bool = False  # aromatic bonds as Kekulé single/double bonds (the model never sees class 4)
    batch_cost: int = 1024  # padded atoms per batch (upstream: 4096 on a GPU)
    lr: float = 3e-4
    warmup_steps: int = 2000  # linear warm-up from 1% of lr (upstream QM9)
    decay_start: int | None = None  # cosine decay of lr from this step ...
    decay_steps: int = 0  # ... over this many steps, down to final_lr_fraction · lr (then held)
    final_lr_fraction: float = 0.1
    decay_peak_lr: float | None = None  # lr at decay_start (default lr): a resumed run may restart lower
    grad_clip: float = 1.0
    ema_decay: float = 0.999
    seed: int = 0
    objective: Objective = field(default_factory=Objective)
    bucket_limits: tuple[int, ...] = QM9_BUCKET_LIMITS
    log_every: int = 10  # steps between train records in log.jsonl
    checkpoint_minutes: float = 5.0
    val_minutes: float = 20.0  # 0 disables validation sampling
    val_molecules: int = 100
    val_steps: int = 50

    @classmethod
    def from_dict(cls, values: dict) -> TrainConfig:
        values = dict(values)
        values["objective"] = Objective(**values.get("objective", {}))
        values["bucket_limits"] = tuple(values.get("bucket_limits", QM9_BUCKET_LIMITS))
        return cls(**values)


class Trainer:
    """Holds the model, its EMA copy, the optimiser and the position in the data; ``run`` trains."""

    def __init__(
        self,
        config: TrainConfig,
        dataset: MolDataset,
        out: str | os.PathLike,
        model_config: SemlaConfig | None = None,
    ):
        self.config, self.out = config, Path(out)
        self.dataset = dataset.kekulized() if config.kekulize else dataset
        torch.manual_seed(config.seed)
        if model_config is None:  # the preset, in the dataset's coordinate units and large enough for it
            model_config = SemlaConfig.preset(config.preset, coord_std=float(dataset.coord_std))
            largest = int(dataset.sizes.max()) if len(dataset) else 0
            if largest >= model_config.max_atoms:
                model_config = dataclasses.replace(model_config, max_atoms=largest + 1)
        elif not math.isclose(model_config.coord_std, float(dataset.coord_std), rel_tol=1e-6):
            raise ValueError(
                f"the model's coord_std {model_config.coord_std} differs from the dataset's "
                f"{dataset.coord_std}: is this run on another training set (--data)?"
            )
        self.model = Semla(model_config)
        self.ema = copy.deepcopy(self.model).eval().requires_grad_(False)
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=config.lr, amsgrad=True)
        self.size_counts = torch.bincount(dataset.sizes)
        self.step = self.epoch = self.batch_in_epoch = 0
        self.train_seconds = 0.0
        self.generator = torch.Generator().manual_seed(config.seed)

    # -- state ----------------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {
            "model": self.model.state_dict(),
            "ema": self.ema.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "generator": self.generator.get_state(),
            "step": self.step,
            "epoch": self.epoch,
            "batch_in_epoch": self.batch_in_epoch,
            "train_seconds": self.train_seconds,
            "size_counts": self.size_counts,
            "train_config": _to_json(self.config),
            "model_config": self.model.config.to_dict(),
        }

    def save(self) -> Path:
        path = self.out / CHECKPOINT
        tmp = path.with_suffix(".tmp")
        torch.save(self.state_dict(), tmp)
        os.replace(tmp, path)  # atomic: a crash mid-write leaves the previous checkpoint intact
        return path

    @classmethod
    def resume(cls, dataset: MolDataset, out: str | os.PathLike) -> Trainer:
        """A trainer continuing the run saved in ``out/checkpoint.pt`` with its saved configuration."""
        state = load_checkpoint(Path(out) / CHECKPOINT)
        trainer = cls(
            TrainConfig.from_dict(state["train_config"]),
            dataset,
            out,
            SemlaConfig.from_dict(state["model_config"]),
        )
        trainer.model.load_state_dict(state["model"])
        trainer.ema.load_state_dict(state["ema"])
        trainer.optimizer.load_state_dict(state["optimizer"])
        trainer.generator.set_state(state["generator"])
        trainer.step, trainer.epoch = state["step"], state["epoch"]
        trainer.batch_in_epoch, trainer.train_seconds = state["batch_in_epoch"], state["train_seconds"]
        return trainer

    # -- training -------------------------------------------------------------------------------------------
    def epoch_batches(self, epoch: int) -> list[list[int]]:
        plan = torch.Generator().manual_seed(self.config.seed * 1_000_003 + epoch)
        return bucket_batches(self.dataset.sizes, self.config.batch_cost, plan, self.config.bucket_limits)

    def learning_rate(self, step: int) -> float:
        config = self.config
        warm = min(1.0, (step + 1) / config.warmup_steps) if config.warmup_steps else 1.0
        lr = config.lr * (0.01 + 0.99 * warm)
        if config.decay_start is not None and step >= config.decay_start:
            progress = min(1.0, (step - config.decay_start) / max(config.decay_steps, 1))
            cosine = 0.5 * (1.0 + math.cos(math.pi * progress))
            peak = lr if config.decay_peak_lr is None else config.decay_peak_lr
            lr = peak * (config.final_lr_fraction + (1.0 - config.final_lr_fraction) * cosine)
        return lr

    def set_decay(self, start: int, steps: int, peak_lr: float | None = None) -> None:
        """Anneal the learning rate from ``peak_lr`` (default: the run's lr) at step ``start`` over ``steps``
        steps (also for a resumed run: a second anneal from a lower peak is a warm restart)."""
        if start < 0 or steps < 1:
            raise ValueError(f"lr decay needs start >= 0 and steps >= 1, got {start} and {steps}")
        if peak_lr is not None and not (math.isfinite(peak_lr) and peak_lr > 0):
            raise ValueError(f"lr decay peak must be a positive number, got {peak_lr}")
        self.config = dataclasses.replace(
            self.config, decay_start=start, decay_steps=steps, decay_peak_lr=peak_lr
        )

    def set_kekulize(self) -> None:
        """Train on Kekulé structures from the next step (also for a resumed run: a fine-tune)."""
        if not self.config.kekulize:
            self.config = dataclasses.replace(self.config, kekulize=True)
            self.dataset = self.dataset.kekulized()

    def set_objective(self, **changes) -> None:
        """Change the objective's weights (e.g. ``bond_weight``), also for a resumed run."""
        objective = dataclasses.replace(self.config.objective, **changes)
        for name in ("coord_weight", "type_weight", "bond_weight", "charge_weight"):
            value = getattr(objective, name)
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f"{name} must be a finite number >= 0, got {value}")
        self.config = dataclasses.replace(self.config, objective=objective)

    def train_step(self, batch: dict[str, torch.Tensor]) -> dict[str, float]:
        self.model.train()
        for group in self.optimizer.param_groups:
            group["lr"] = self.learning_rate(self.step)
        loss, parts = flow_loss(self.model, batch, self.generator, self.config.objective)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.config.grad_clip)
        if torch.isfinite(grad_norm):  # a rare non-finite batch is skipped rather than poisoning the weights
            self.optimizer.step()
            # EMA decay warms up as (1 + k) / (10 + k) so that short runs are not dominated by the random init.
            decay = min(self.config.ema_decay, (1 + self.step) / (10 + self.step))
            with torch.no_grad():
                torch._foreach_lerp_(list(self.ema.parameters()), list(self.model.parameters()), 1 - decay)
        self.step += 1
        return {"loss": float(loss.detach()), **parts, "grad_norm": float(grad_norm)}

    def run(
        self,
        max_steps: int | None = None,
        minutes: float | None = None,
        progress: bool = True,
        export_dir: str | os.PathLike | None = None,
    ) -> dict:
        """Train until ``max_steps`` (total, counting earlier runs) or ``minutes`` of this call; checkpoints at
        the end. With ``export_dir``, the EMA weights are exported there (``export_pretrained``) after every
        validation and at the end. Returns the last train record."""
        if max_steps is None and minutes is None:
            raise ValueError("give max_steps or minutes (or both)")
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / "train_config.json").write_text(json.dumps(_to_json(self.config), indent=2) + "\n")
        started = last_save = last_val = time.monotonic()
        window, record = [], {}
        bar = tqdm(
            total=max_steps,
            initial=self.step,
            unit="step",
            desc="training",
            disable=not progress,
            mininterval=5.0,
        )
        with bar, open(self.out / LOG, "a") as log:
            batches = self.epoch_batches(self.epoch)
            while (max_steps is None or self.step < max_steps) and (
                minutes is None or time.monotonic() - started < 60 * minutes
            ):
                if self.batch_in_epoch == len(batches):
                    self.epoch, self.batch_in_epoch = self.epoch + 1, 0
                    batches = self.epoch_batches(self.epoch)
                tic = time.monotonic()
                batch = self.dataset.batch(batches[self.batch_in_epoch])
                self.batch_in_epoch += 1
                stats = self.train_step(batch)
                seconds = time.monotonic() - tic
                self.train_seconds += seconds
                window.append({**stats, "molecules": len(batch["mask"]), "seconds": seconds})
                bar.update(1)
                if self.step % self.config.log_every == 0 or self.step == max_steps:
                    record = self._train_record(window)
                    bar.set_postfix(loss=f"{record['loss']:.3f}")
                    _write(log, record)
                    window = []
                now = time.monotonic()
                if self.config.val_minutes and now - last_val > 60 * self.config.val_minutes:
                    _write(log, self.validate())
                    last_val = now
                    if export_dir is not None:
                        self._export(export_dir)
                        last_save = now
                if now - last_save > 60 * self.config.checkpoint_minutes:
                    self.save()
                    last_save = now
            if window:
                record = self._train_record(window)
                _write(log, record)
        self.save()
        if export_dir is not None:
            self._export(export_dir)
        return record

    def _export(self, directory) -> None:
        from fastflow.training.export import export_pretrained  # export reads checkpoints the trainer writes

        export_pretrained(self.save(), directory)

    def _train_record(self, window: list[dict]) -> dict:
        keys = [k for k in window[0] if k not in ("molecules", "seconds")]
        record = {
            "kind": "train",
            "step": self.step,
            "epoch": self.epoch,
            "lr": self.learning_rate(self.step - 1),
            "train_seconds": round(self.train_seconds, 2),
        }
        record.update({k: sum(w[k] for w in window) / len(window) for k in keys})
        seconds = sum(w["seconds"] for w in window)
        record["molecules_per_second"] = sum(w["molecules"] for w in window) / seconds
        record["steps_per_second"] = len(window) / seconds
        return record

    def validate(self) -> dict:
        """Sample ``val_molecules`` from the EMA model and record validity and stability (cheap: no MMFF)."""
        from fastflow.metrics import compute_metrics
        from fastflow.sampling import sample

        tic = time.monotonic()
        result = sample(
            self.ema,
            self.config.val_molecules,
            steps=self.config.val_steps,
            seed=0,
            size_distribution=self.size_counts,
            progress=False,
        )
        metrics = compute_metrics(result.graphs, result.molecules, energy=False)
        return {
            "kind": "val",
            "step": self.step,
            "train_seconds": round(self.train_seconds, 2),
            "steps": self.config.val_steps,
            **metrics,
            "seconds": round(time.monotonic() - tic, 2),
        }


def _to_json(config: TrainConfig) -> dict:
    return json.loads(json.dumps(dataclasses.asdict(config)))


def _write(log, record: dict) -> None:
    log.write(
        json.dumps(
            {k: (round(v, 6) if isinstance(v, float) and math.isfinite(v) else v) for k, v in record.items()}
        )
        + "\n"
    )
    log.flush()
