"""The distributed training loop shared by every pretraining method (MoCo/LeCL slices, SimCLR lesions).

A method subclasses `DistributedTrainer` and supplies the model, the number of items, the batch of a
step and its loss. The base class owns what must be identical everywhere: torch.distributed (DDP,
SyncBatchNorm on GPUs), the optimiser (AdamW, LARS or SGD) with lr = base * batch / 256, warm-up and
cosine decay, AMP, atomic checkpoints every epoch (and every N steps) with exact resume, and logs.

On a cluster: a run is its resolved config, so resuming from a checkpoint of another config is refused; all
ranks check at start that they see one output folder and one checkpoint (shared storage); SIGTERM
(preemption) and SIGUSR1 (SLURM's warning before the time limit) make every rank stop at the next step
boundary after rank 0 saved, so a preempted run loses at most the step it was in.

Randomness is derived from (seed, epoch, step, rank): the sample order from (seed, epoch), and every
random draw of a step from all four. A run resumed at a step therefore replays exactly what an
uninterrupted run would have done; with the model, optimiser, grad scaler and step restored from the
checkpoint, it continues identically.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import signal
import socket
import sys
import threading
import time
import uuid
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel

from CLEARLib.errors import CLEARInputError, CLEARPreempted, CLEARRunError
from CLEARLib.files import atomic_path, write_atomic, write_json
from CLEARLib.inference.runtime import autocast
from CLEARLib.progress import report

from .distributed import DistInfo, all_gather_objects, all_reduce_mean, any_rank, barrier, init_distributed
from .optim import LARS, learning_rate

log = logging.getLogger(__name__)
CHECKPOINT = "last.pt"
PREVIOUS_CHECKPOINT = "previous.pt"  # the checkpoint before last.pt, for when last.pt is unreadable
CHECKPOINT_FORMAT = "clear-pretrain-v1"  # what clear_training.export reads
SHARED_CHECK = ".clear-shared-storage-check"
LOCK = "run.lock"
# Config fields a resumed run may change: how long and how often, where it runs, where the data lives (a
# staged copy). Every other field defines the run: a checkpoint with another value is another run.
RESUMABLE_CHANGES = frozenset(
    {
        "run.max_steps",
        "run.log_every_steps",
        "run.checkpoint_every_steps",
        "run.device",
        "run.resume_with_other_world_size",
        "data.store",
        "data.seeds",
        "data.cache_dir",
    }
)
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


def _process_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


def _flatten(config: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in config.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def config_differences(saved: dict, current: dict) -> list[str]:
    """The fields (other than RESUMABLE_CHANGES) in which two resolved configs differ, one line each."""
    old, new = _flatten(saved), _flatten(current)
    return [
        f"{key}: {old.get(key, '(not set)')!r} in the checkpoint, {new.get(key, '(not set)')!r} now"
        for key in sorted(set(old) | set(new))
        if key not in RESUMABLE_CHANGES and old.get(key) != new.get(key)
    ]


class StopSignals:
    """SIGTERM and SIGUSR1 set `received` instead of killing the process; the training loop reads it between
    steps. Only the main thread can install handlers; elsewhere (a test's thread) this does nothing."""

    def __init__(self):
        self.received = 0
        self._previous = {}

    def _handler(self, signum, frame) -> None:
        self.received = signum

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            self._previous = {s: signal.signal(s, self._handler) for s in STOP_SIGNALS}
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)


def step_seed(seed: int, epoch: int, step: int, rank: int) -> int:
    digest = hashlib.sha256(f"{seed}/{epoch}/{step}/{rank}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & 0x7FFF_FFFF_FFFF_FFFF


def epoch_order(n: int, seed: int, epoch: int) -> np.ndarray:
    return np.random.default_rng([seed, epoch]).permutation(n)


def build_optimizer(name: str, params, weight_decay: float, betas=(0.9, 0.95)):
    params = [p for p in params if p.requires_grad]
    if name == "adamw":
        return torch.optim.AdamW(params, lr=0.0, weight_decay=weight_decay, betas=tuple(betas))
    if name == "lars":
        return LARS(params, lr=0.0, weight_decay=weight_decay, momentum=0.9)
    if name == "sgd":
        return torch.optim.SGD(params, lr=0.0, weight_decay=weight_decay, momentum=0.9)
    raise ValueError(f"unknown optimiser {name!r}")


class DistributedTrainer:
    """Subclasses set `self.n_items` and implement build_model, make_batch, compute_loss."""

    views_per_item = 2

    def __init__(self, config, dist: DistInfo | None = None):
        self.config = config
        self.dist = dist or init_distributed(config.run.device)
        self.device = self.dist.device
        if config.optim.batch_size % self.dist.world_size:
            raise CLEARInputError(
                f"optim.batch_size {config.optim.batch_size} does not split over {self.dist.world_size} processes"
            )
        self.local_batch = config.optim.batch_size // self.dist.world_size
        self.n_items = self.prepare_data()
        self.steps_per_epoch = self.n_items // config.optim.batch_size
        if self.steps_per_epoch < 1:
            raise CLEARInputError(f"{self.n_items} training items, fewer than one batch of {config.optim.batch_size}")
        torch.manual_seed(config.run.seed)  # identical initial weights on every rank
        model = self.build_model().to(self.device)
        if self.dist.enabled and self.device.type == "cuda":
            model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
        elif self.dist.enabled and any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules()):
            raise CLEARInputError(
                "batch norm over several CPU processes would normalise each rank's part of the batch alone (gloo has "
                "no SyncBatchNorm), which is not the model a single process trains; use GPUs, one process, or a "
                "model without batch norm (slice encoders: model.mlp_norm: none)"
            )
        self.model = model
        self.ddp = model  # the module train steps run: fit() puts DistributedDataParallel around it for its length
        optim = config.optim
        self.optimizer = build_optimizer(optim.name, model.parameters(), optim.weight_decay, optim.betas)
        self.amp = config.optim.amp and self.device.type == "cuda"
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp)  # needed when the GPU falls back to fp16
        self.out_dir = Path(config.run.out_dir)
        self.epoch, self.step, self.global_step = 0, 0, 0  # the next step to run
        self._saved_step = -1
        # A rank that cannot start says why to all the others, which would otherwise wait for it in the first
        # collective until its timeout.
        problem, checkpoint_digest = None, ""
        try:
            checkpoint_digest = self._resume()
            if self.dist.is_main:
                self._take_lock()
        except (CLEARInputError, CLEARRunError) as exc:
            problem = exc
        try:
            self._check_ranks_agree(checkpoint_digest, problem)
        except BaseException:
            self.release_lock()  # a run that does not start holds no folder
            raise

    # ------------------------------------------------------------------- to be provided by methods
    def prepare_data(self) -> int:
        raise NotImplementedError

    def build_model(self) -> torch.nn.Module:
        raise NotImplementedError

    def make_batch(self, rows: np.ndarray, seed: int):
        raise NotImplementedError

    def compute_loss(self, batch, epoch_f: float) -> tuple[torch.Tensor, dict]:
        raise NotImplementedError

    # -------------------------------------------------------------------------------- checkpoints
    def state(self) -> dict:
        return {
            "format": CHECKPOINT_FORMAT,
            "config": self.config.model_dump(mode="json"),
            "world_size": self.dist.world_size,
            "epoch": self.epoch,
            "step": self.step,
            "global_step": self.global_step,
            "state_dict": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict(),
            "rng": "derived from (seed, epoch, step, rank); see clear_training.trainer",
        }

    def save_checkpoint(self) -> Path | None:
        """Rank 0 writes last.pt (fsynced; the one before becomes previous.pt)."""
        if not self.dist.is_main:
            return None
        self.out_dir.mkdir(parents=True, exist_ok=True)
        path = self.out_dir / CHECKPOINT
        if self._saved_step == self.global_step and path.exists():
            return path  # this state is saved already (the end of an epoch is also the end of the run)
        with atomic_path(path, durable=True, previous=self.out_dir / PREVIOUS_CHECKPOINT) as tmp:
            torch.save(self.state(), tmp)
        self._saved_step = self.global_step
        return path

    def _load_checkpoint(self) -> tuple[Path | None, dict | None, str]:
        """(path, state, sha256 of its bytes) of last.pt, or of previous.pt when last.pt cannot be read (a
        write cut off by a node failure); (None, None, "") for a new run."""
        unreadable = []
        for name in (CHECKPOINT, PREVIOUS_CHECKPOINT):
            path = self.out_dir / name
            if not path.exists():
                continue
            try:
                data = path.read_bytes()
                state = torch.load(io.BytesIO(data), map_location=self.device, weights_only=True)
            except Exception as exc:  # torch reports a truncated zip in several ways
                unreadable.append(f"{path}: {str(exc).strip().splitlines()[0] if str(exc).strip() else exc!r}")
                continue
            if unreadable and self.dist.is_main:
                print(f"clear-train: {unreadable[0]} is unreadable; resuming from {path}", file=sys.stderr)
            return path, state, hashlib.sha256(data).hexdigest()
        if unreadable:
            raise CLEARRunError("no readable checkpoint: " + "; ".join(unreadable))
        return None, None, ""

    def _resume(self) -> str:
        """Restore the run from its checkpoint if there is one; returns the checkpoint's sha256 ("" if none)."""
        path, state, digest = self._load_checkpoint()
        if state is None:
            return ""
        differences = config_differences(state["config"], self.config.model_dump(mode="json"))
        if differences:
            raise CLEARInputError(
                "this output folder holds another run (one run per output folder): its checkpoint's config differs "
                "in " + "; ".join(differences) + ". Give this run its own run.out_dir (and run.name), or remove "
                f"{path.name} to start over",
                path,
            )
        saved_world = int(state.get("world_size", self.dist.world_size))
        if saved_world != self.dist.world_size:
            if not self.config.run.resume_with_other_world_size:
                raise CLEARInputError(
                    f"the checkpoint was written by {saved_world} processes, this run has {self.dist.world_size}: "
                    "the global batch would stay but each rank's random draws would change, so the run would not "
                    "continue exactly; run with the same number of processes, or set "
                    "run.resume_with_other_world_size=true to continue anyway",
                    path,
                )
            if self.dist.is_main:
                print(
                    f"clear-train: resuming a {saved_world}-process run with {self.dist.world_size} processes: "
                    "it continues, but not exactly as the original run would have",
                    file=sys.stderr,
                )
        self.model.load_state_dict(state["state_dict"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scaler.load_state_dict(state["scaler"])
        self.epoch, self.step, self.global_step = state["epoch"], state["step"], state["global_step"]
        self._saved_step = self.global_step if path.name == CHECKPOINT else -1
        if self.dist.is_main:
            self._forget_replayed_log_records()
            print(
                f"clear-train: resumed {path} at epoch {self.epoch + 1} step {self.step} "
                f"(global step {self.global_step})",
                file=sys.stderr,
            )
        return digest

    def _forget_replayed_log_records(self) -> None:
        """Log records of steps after the checkpoint are run again: drop them, so that each step is logged once."""
        log_file = self.out_dir / "log.jsonl"
        if not log_file.exists():
            return
        lines = log_file.read_text().splitlines()
        kept = [line for line in lines if line.strip() and json.loads(line).get("global_step", 0) <= self.global_step]
        if len(kept) != len(lines):
            write_atomic(log_file, "".join(line + "\n" for line in kept))

    def _take_lock(self) -> None:
        """One run per output folder at a time: run.lock names the job that trains here. A requeued job (same
        SLURM job ID) or a lock whose process is gone on this host takes it over; any other is refused."""
        self.out_dir.mkdir(parents=True, exist_ok=True)
        lock = self.out_dir / LOCK
        mine = {"job": os.environ.get("SLURM_JOB_ID", ""), "host": socket.gethostname(), "pid": os.getpid()}
        if lock.exists():
            try:
                holder = json.loads(lock.read_text())
            except (OSError, ValueError):
                holder = {}
            same_job = bool(mine["job"]) and holder.get("job") == mine["job"]
            same_host = holder.get("host") == mine["host"]
            pid = int(holder.get("pid", 0))
            gone_or_mine = same_host and (pid == mine["pid"] or not _process_alive(pid))
            if holder and not (same_job or gone_or_mine):
                raise CLEARRunError(
                    f"another run uses {self.out_dir}: job {holder.get('job') or '(none)'} on {holder.get('host')}, "
                    f"pid {holder.get('pid')}, since {holder.get('started')}. Two runs in one folder overwrite each "
                    f"other's checkpoints: give this run its own run.out_dir, or delete {lock} if that run has ended"
                )
        write_json(lock, {**mine, "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
        self._lock = lock

    def release_lock(self) -> None:
        lock = getattr(self, "_lock", None)
        if lock is not None:
            lock.unlink(missing_ok=True)
            self._lock = None

    def _check_ranks_agree(self, checkpoint_digest: str, problem: Exception | None) -> None:
        """Every rank must see one output folder (a file rank 0 writes there) and the same checkpoint and step:
        with node-local folders, ranks would resume from different steps and their weights would part. A rank
        that could not start (`problem`) stops every rank."""
        if not self.dist.enabled:
            if problem is not None:
                raise problem
            return
        token = uuid.uuid4().hex
        check = self.out_dir / SHARED_CHECK
        if self.dist.is_main and problem is None:
            write_atomic(check, token)
        barrier()
        seen = check.read_text() if check.exists() else ""
        views = all_gather_objects(
            {"token": seen, "step": self.global_step, "checkpoint": checkpoint_digest, "problem": str(problem or "")}
        )
        barrier()
        if self.dist.is_main:
            check.unlink(missing_ok=True)
        if problem is not None:
            raise problem
        stopped = [(rank, view["problem"]) for rank, view in enumerate(views) if view["problem"]]
        if stopped:
            raise CLEARRunError("; ".join(f"rank {rank} could not start: {text}" for rank, text in stopped))
        for view in views:
            del view["problem"]
        reference = views[0]
        differ = [
            f"rank {rank}: " + ("cannot see rank 0's files" if view["token"] != reference["token"]
                                else f"step {view['step']}, checkpoint {view['checkpoint'][:12] or 'none'}")
            for rank, view in enumerate(views)
            if view != reference
        ]  # fmt: skip
        if differ:
            raise CLEARRunError(
                f"the ranks do not share one output folder {self.out_dir}: rank 0 is at step {reference['step']} "
                f"(checkpoint {reference['checkpoint'][:12] or 'none'}); " + "; ".join(differ) + ". Put run.out_dir "
                "on storage every node mounts at the same path (not node-local scratch)"
            )

    # ----------------------------------------------------------------------------------- training
    @property
    def scaled_lr(self) -> float:
        return self.config.optim.lr * self.config.optim.batch_size / 256

    def batch_rows(self, epoch: int, step: int) -> np.ndarray:
        """The items of a step's global batch, every rank's share in rank order (subclasses may sample otherwise)."""
        batch = self.config.optim.batch_size
        return epoch_order(self.n_items, self.config.run.seed, epoch)[step * batch : (step + 1) * batch]

    def rows_for(self, epoch: int, step: int) -> np.ndarray:
        """This rank's share of the step's global batch."""
        start = self.dist.rank * self.local_batch
        return self.batch_rows(epoch, step)[start : start + self.local_batch]

    def autocast(self):
        """The engine's mixed-precision policy (CLEARLib.inference.runtime.autocast), on GPUs with optim.amp."""
        return autocast(self.device, enabled=self.amp)

    def train_step(self) -> dict:
        cfg = self.config
        epoch_f = self.epoch + self.step / self.steps_per_epoch
        lr = learning_rate(epoch_f, self.scaled_lr, cfg.run.warmup_epochs, cfg.run.epochs)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        seed = step_seed(cfg.run.seed, self.epoch, self.step, self.dist.rank)
        torch.manual_seed(seed)  # dropout / drop-path of this step
        batch = self.make_batch(self.rows_for(self.epoch, self.step), seed)
        self.ddp.train()
        loss, extra = self.compute_loss(batch, epoch_f)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.step += 1
        self.global_step += 1
        if self.step == self.steps_per_epoch:
            self.epoch, self.step = self.epoch + 1, 0
        return {"loss": float(all_reduce_mean(loss.detach())), "lr": lr, **extra}

    def total_steps(self) -> int:
        """Steps this run trains to: all epochs, or run.max_steps when that comes first."""
        total = self.config.run.epochs * self.steps_per_epoch
        return total if self.config.run.max_steps is None else min(total, self.config.run.max_steps)

    def fit(self, progress=None) -> list[dict]:
        """Train until the last epoch (or run.max_steps); `progress(fraction, message)` on the main rank.

        A SIGTERM or SIGUSR1 on any rank stops every rank before its next step, after rank 0 saved the
        checkpoint, by raising CLEARPreempted (the command exits 128 + the signal's number)."""
        cfg = self.config
        history = []
        self._total = self.total_steps()
        self._progress = progress if self.dist.is_main else None
        if self.dist.is_main:
            self.out_dir.mkdir(parents=True, exist_ok=True)
        self._since_log = (time.perf_counter(), 0)  # when the last log record was written, views since then
        try:
            with self._gradients_synchronised(), StopSignals() as signals:
                while self.epoch < cfg.run.epochs:
                    if cfg.run.max_steps is not None and self.global_step >= cfg.run.max_steps:
                        break
                    received = any_rank(signals.received, self.device)  # every rank stops at the same step
                    if received:
                        self._stop_for_signal(received)
                    history.append(self._logged_step())
            self.save_checkpoint()
        finally:
            self.release_lock()
        return history

    @contextmanager
    def _gradients_synchronised(self):
        """DistributedDataParallel around the model while fit() runs, not longer: a DDP that outlives the run (as
        a trainer does when a stray traceback holds the frame it lives in) keeps the gloo process group and its
        worker threads alive past leave_process_group, and a worker freeing a finished collective during
        interpreter shutdown aborts the process."""
        if not self.dist.enabled:
            yield
            return
        device_ids = [self.device.index] if self.device.type == "cuda" else None
        self.ddp = DistributedDataParallel(self.model, device_ids=device_ids)
        try:
            yield
        finally:
            self.ddp = self.model

    def _logged_step(self) -> dict:
        """One training step with its progress report, log record and scheduled checkpoint."""
        cfg = self.config
        record = self.train_step()
        started, views = self._since_log
        views += self.views_per_item * cfg.optim.batch_size
        record.update(epoch=self.epoch, step=self.step, global_step=self.global_step)
        epoch_of_step = self.epoch + 1 if self.step else self.epoch  # 1-based; the step may have ended it
        report(self._progress, self.global_step / self._total, f"epoch {epoch_of_step} loss {record['loss']:.4f}")
        end_of_epoch = self.step == 0
        if self.global_step % cfg.run.log_every_steps == 0 or end_of_epoch:
            elapsed = time.perf_counter() - started
            record["views_per_s"] = views / elapsed if elapsed > 0 else 0.0
            if self.dist.is_main:
                with open(self.out_dir / "log.jsonl", "a") as f:
                    f.write(json.dumps(record) + "\n")
                log.info(json.dumps(record))
            started, views = time.perf_counter(), 0
        self._since_log = (started, views)
        every = cfg.run.checkpoint_every_steps
        if end_of_epoch or (every and self.global_step % every == 0):
            self.save_checkpoint()
        return record

    def _stop_for_signal(self, signum: int) -> None:
        path = self.save_checkpoint()
        barrier()  # no rank exits before the checkpoint is written
        name = signal.Signals(signum).name
        where = f"saved {path}" if path is not None else f"rank 0 saved {self.out_dir / CHECKPOINT}"
        raise CLEARPreempted(
            f"{name} received: {where} at global step {self.global_step}; run the same command again to resume "
            "(a requeued SLURM job does)",
            signum,
        )
