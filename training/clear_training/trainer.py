"""The distributed training loop shared by every pretraining method (MoCo/LeCL slices, SimCLR lesions).

A method subclasses `DistributedTrainer` and supplies the model, the number of items, the batch of a
step and its loss. The base class owns what must be identical everywhere: torch.distributed (DDP,
SyncBatchNorm on GPUs), the optimiser (AdamW, LARS or SGD) with lr = base * batch / 256, warm-up and
cosine decay, AMP, atomic checkpoints every epoch (and every N steps) with exact resume, and logs.

Randomness is derived from (seed, epoch, step, rank): the sample order from (seed, epoch), and every
random draw of a step from all four. A run resumed at a step therefore replays exactly what an
uninterrupted run would have done; with the model, optimiser, grad scaler and step restored from the
checkpoint, it continues identically.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from pathlib import Path

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel

from CLEARLib.errors import CLEARInputError
from CLEARLib.files import atomic_path
from CLEARLib.inference.runtime import autocast
from CLEARLib.progress import report

from .distributed import DistInfo, all_reduce_mean, init_distributed
from .optim import LARS, learning_rate

log = logging.getLogger(__name__)
CHECKPOINT = "last.pt"
CHECKPOINT_FORMAT = "clear-pretrain-v1"  # what clear_training.export reads


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
        self.model = model
        self.ddp = (
            DistributedDataParallel(model, device_ids=[self.device.index] if self.device.type == "cuda" else None)
            if self.dist.enabled
            else model
        )
        optim = config.optim
        self.optimizer = build_optimizer(optim.name, model.parameters(), optim.weight_decay, optim.betas)
        self.amp = config.optim.amp and self.device.type == "cuda"
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp)  # needed when the GPU falls back to fp16
        self.out_dir = Path(config.run.out_dir)
        self.epoch, self.step, self.global_step = 0, 0, 0  # the next step to run
        self._resume()

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
            "epoch": self.epoch,
            "step": self.step,
            "global_step": self.global_step,
            "state_dict": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict(),
            "rng": "derived from (seed, epoch, step, rank); see clear_training.trainer",
        }

    def save_checkpoint(self) -> Path | None:
        if not self.dist.is_main:
            return None
        self.out_dir.mkdir(parents=True, exist_ok=True)
        path = self.out_dir / CHECKPOINT
        with atomic_path(path) as tmp:
            torch.save(self.state(), tmp)
        return path

    def _resume(self) -> None:
        path = self.out_dir / CHECKPOINT
        if not path.exists():
            return
        state = torch.load(path, map_location=self.device, weights_only=True)
        self.model.load_state_dict(state["state_dict"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scaler.load_state_dict(state["scaler"])
        self.epoch, self.step, self.global_step = state["epoch"], state["step"], state["global_step"]
        if self.dist.is_main:
            log.info("resumed from %s at epoch %d step %d", path, self.epoch, self.step)

    # ----------------------------------------------------------------------------------- training
    @property
    def scaled_lr(self) -> float:
        return self.config.optim.lr * self.config.optim.batch_size / 256

    def rows_for(self, epoch: int, step: int) -> np.ndarray:
        order = epoch_order(self.n_items, self.config.run.seed, epoch)
        start = step * self.config.optim.batch_size + self.dist.rank * self.local_batch
        return order[start : start + self.local_batch]

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
        """Train until the last epoch (or run.max_steps); `progress(fraction, message)` on the main rank."""
        cfg = self.config
        history = []
        total = self.total_steps()
        progress = progress if self.dist.is_main else None
        log_file = self.out_dir / "log.jsonl"
        if self.dist.is_main:
            self.out_dir.mkdir(parents=True, exist_ok=True)
        started, views = time.perf_counter(), 0
        while self.epoch < cfg.run.epochs:
            if cfg.run.max_steps is not None and self.global_step >= cfg.run.max_steps:
                break
            record = self.train_step()
            views += self.views_per_item * cfg.optim.batch_size
            record.update(epoch=self.epoch, step=self.step, global_step=self.global_step)
            history.append(record)
            epoch_of_step = self.epoch + 1 if self.step else self.epoch  # 1-based; the step may have ended it
            report(progress, self.global_step / total, f"epoch {epoch_of_step} loss {record['loss']:.4f}")
            end_of_epoch = self.step == 0
            if self.global_step % cfg.run.log_every_steps == 0 or end_of_epoch:
                elapsed = time.perf_counter() - started
                record["views_per_s"] = views / elapsed if elapsed > 0 else 0.0
                if self.dist.is_main:
                    with open(log_file, "a") as f:
                        f.write(json.dumps(record) + "\n")
                    log.info(json.dumps(record))
                started, views = time.perf_counter(), 0
            every = cfg.run.checkpoint_every_steps
            if end_of_epoch or (every and self.global_step % every == 0):
                self.save_checkpoint()
        self.save_checkpoint()
        return history
