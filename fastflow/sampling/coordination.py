"""Who writes a shard directory, and when: one job per directory (:class:`DirectoryLock`), and within a job the
ranks of torchrun (:class:`Coordinator`), rank 0's progress bar over all of them, and the test hook that kills
a rank.

torch.distributed is used only to coordinate (molecules never cross it): gloo on CPU, nccl on CUDA. The shard
directory must be on a file system every rank sees (multi-node: a shared file system).

Test hook: ``FASTFLOW_TEST_STOP_AFTER_SHARDS="R:K"`` makes rank R leave a half-written temporary file and exit
at once (``os._exit(3)``, no clean-up) after finishing K shards of this run, reproducibly simulating a
killed rank.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import sys
import threading
from datetime import timedelta
from pathlib import Path

import torch

from fastflow.sampling.shards import Shard, timestamp

LOCK = ".lock"
STOP_HOOK = "FASTFLOW_TEST_STOP_AFTER_SHARDS"
# Ranks wait at barriers for the slowest rank's last shard: far longer than torch's 30-minute default.
BARRIER_TIMEOUT = timedelta(hours=24)


class OtherRankFailed(RuntimeError):
    """Raised on ranks other than 0 when rank 0 refused the request (rank 0 raises the ValueError)."""


class DirectoryLock:
    """One job per shard directory: an exclusive ``flock`` on ``DIR/.lock``, held from :meth:`acquire` until
    :meth:`release` (or the process's end, however it ends: the kernel drops the lock, so a killed job leaves
    no stale lock; the file stays, naming the last holder). On NFS, Linux maps flock to POSIX locks, so jobs on
    different nodes exclude each other too."""

    def __init__(self, directory: Path, fd: int):
        self.directory, self._fd = directory, fd

    @classmethod
    def acquire(cls, directory: Path, purpose: str = "sampling", create: bool = True) -> DirectoryLock:
        directory = Path(directory)
        if directory.exists() and not directory.is_dir():
            raise ValueError(f"{directory} exists and is not a directory")
        if not create and not directory.is_dir():
            raise FileNotFoundError(f"shard directory {directory} not found")
        directory.mkdir(parents=True, exist_ok=True)
        fd = os.open(directory / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as error:
            holder = os.pread(fd, 4096, 0).decode(errors="replace").strip() or "holder unknown"
            os.close(fd)
            if isinstance(error, BlockingIOError):
                raise ValueError(
                    f"{directory} is in use by another fastflow job ({holder}); one job per shard "
                    f"directory: wait for it to finish, or choose another directory"
                ) from None
            raise ValueError(f"cannot lock {directory / LOCK}: {error}") from None
        os.ftruncate(fd, 0)
        holder = {"purpose": purpose, "pid": os.getpid(), "host": socket.gethostname(), "since": timestamp()}
        os.pwrite(fd, json.dumps(holder).encode(), 0)
        return cls(directory, fd)

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # drops the flock
            self._fd = None


class Coordinator:
    """Rank, world size and the few collectives sharded sampling needs (a no-op world of one without
    torchrun). ``from_env`` joins torchrun's process group: gloo on CPU, nccl when ``device`` is CUDA (each
    rank then takes ``cuda:LOCAL_RANK``)."""

    def __init__(
        self,
        rank: int = 0,
        world_size: int = 1,
        device: torch.device | None = None,
        distributed: bool = False,
    ):
        self.rank, self.world_size, self.device, self.distributed = rank, world_size, device, distributed

    @classmethod
    def from_env(cls, device: str | None = None) -> Coordinator:
        device = torch.device(device) if device is not None else None
        if "WORLD_SIZE" not in os.environ:
            return cls(0, 1, device)
        import torch.distributed as dist

        cuda = device is not None and device.type == "cuda"
        if cuda:
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if cuda else "gloo", timeout=BARRIER_TIMEOUT)
        return cls(dist.get_rank(), dist.get_world_size(), device, True)

    def broadcast(self, obj):
        """Rank 0's ``obj`` on every rank."""
        if not self.distributed:
            return obj
        import torch.distributed as dist

        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def barrier(self) -> None:
        if self.distributed:
            import torch.distributed as dist

            if dist.get_backend() == "nccl":
                dist.barrier(device_ids=[self.device.index])
            else:
                dist.barrier()

    def close(self) -> None:
        if self.distributed:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()


class Progress:
    """Rank 0's bar over every rank's molecules: polls which shard JSONs exist (no collective, no sync)."""

    def __init__(self, directory: Path, shards: list[Shard], missing: list[Shard], world: int, show: bool):
        from tqdm.auto import tqdm

        self.directory, self.pending = directory, list(missing)
        done = sum(s.n for s in shards) - sum(s.n for s in missing)
        self.bar = tqdm(
            total=sum(s.n for s in shards),
            initial=done,
            unit="mol",
            disable=not show,
            desc=f"sampling ({world} rank{'s' if world > 1 else ''})",
        )
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True) if show else None
        if self.thread is not None:
            self.thread.start()

    def _poll(self) -> None:
        finished = [s for s in self.pending if (self.directory / s.json).exists()]
        if finished:
            self.pending = [s for s in self.pending if s not in finished]
            self.bar.update(sum(s.n for s in finished))

    def _run(self) -> None:
        while not self.stopped.wait(1.0):
            self._poll()

    def close(self) -> None:
        self.stopped.set()
        if self.thread is not None:
            self.thread.join()
            self._poll()
        self.bar.close()


def stop_after_shards(rank: int) -> int | None:
    """The test hook's K for this rank (None: run to the end)."""
    value = os.environ.get(STOP_HOOK)
    if not value:
        return None
    which, count = value.split(":")
    return int(count) if int(which) == rank else None


def die_mid_shard(directory: Path, shard: Shard) -> None:
    """The test hook's kill: a half-written temporary file of ``shard``, then exit without clean-up."""
    (directory / f"{shard.sdf}.{os.getpid()}.tmp").write_text("half-written\n")
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(3)
