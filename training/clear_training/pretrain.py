"""MoCo v3 / LeCL pretraining of slice encoders: one GPU to many nodes through torch.distributed.

Randomness is derived from (seed, epoch, step, rank): the sample order from (seed, epoch), and the
augmentations, dropout and drop-path of a step from all four. A run resumed at a step therefore
replays exactly what an uninterrupted run would have done there; with the model, optimiser, grad
scaler and the step counter restored from the checkpoint, the resumed run continues identically.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from pathlib import Path

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel

from CLEARLib.preprocess import resolve_windows

from .augment import SlicePyramid, ViewConfig, lesion_boxes, make_views, random_resized_boxes
from .config import PretrainConfig
from .data.store import SliceStore
from .distributed import DistInfo, all_reduce_mean, init_distributed
from .losses import lecl_loss, lecl_loss_public_variant, moco_v3_loss
from .moco import MoCo
from .optim import build_optimizer, learning_rate, momentum

log = logging.getLogger(__name__)
CHECKPOINT = "last.pt"


def step_seed(seed: int, epoch: int, step: int, rank: int) -> int:
    digest = hashlib.sha256(f"{seed}/{epoch}/{step}/{rank}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & 0x7FFF_FFFF_FFFF_FFFF


def epoch_order(n: int, seed: int, epoch: int) -> np.ndarray:
    return np.random.default_rng([seed, epoch]).permutation(n)


class Batcher:
    """Turns store rows into the four view tensors of a step (x1, x2 for the base branch, y1, y2 for
    the momentum branch) plus the key-slice mask, all on the training device."""

    def __init__(self, store: SliceStore, config: PretrainConfig, device: torch.device):
        self.store, self.device = store, device
        self.lecl = config.method.name == "lecl"
        self.windows = resolve_windows(config.data.windows)
        self.bounds = torch.tensor([[w.low, w.high] for w in self.windows], device=device)
        self.view = ViewConfig(
            size=config.data.image_size, scale=tuple(config.data.crop_scale), lesion_context=config.data.lesion_context
        )

    def __call__(self, rows: np.ndarray, seed: int):
        generator = torch.Generator(device=self.device).manual_seed(seed)
        cpu_generator = torch.Generator().manual_seed(seed)
        hu = SlicePyramid(self.store.slices(rows).to(self.device, non_blocking=True))
        n = len(rows)
        window = torch.randint(len(self.windows), (n,), generator=generator, device=self.device)
        bounds = self.bounds[window]  # one window per slice, shared by its views
        is_key = (
            torch.from_numpy(self.store.is_key[rows]).to(self.device)
            if self.lecl
            else torch.zeros(n, dtype=torch.bool, device=self.device)
        )
        views = []
        for _ in range(2):
            boxes = random_resized_boxes(n, self.view, generator, self.device)
            if self.lecl:  # the base encoder sees key slices whole
                boxes[is_key] = torch.tensor([0.0, 0.0, 1.0, 1.0], device=self.device)
            views.append(make_views(hu, bounds, self.view, generator, boxes))
        x1, x2 = views
        y1, y2 = x1, x2
        if bool(is_key.any()):
            key_rows = np.asarray(rows)[is_key.cpu().numpy()]
            crops = []
            for _ in range(2):  # the momentum encoder sees lesion-centred crops of key slices
                lesion = self.store.lesion_box(key_rows, cpu_generator)
                boxes = lesion_boxes(lesion, (self.store.size, self.store.size), self.view, generator, self.device)
                crops.append(make_views(hu, bounds[is_key], self.view, generator, boxes, index=is_key))
            y1, y2 = x1.clone(), x2.clone()
            y1[is_key], y2[is_key] = crops
        return x1, x2, y1, y2, is_key


def contrastive_loss(q1, q2, k1, k2, is_key, method) -> torch.Tensor:
    """Symmetric use: loss(q1, k2) + loss(q2, k1)."""
    if method.name == "moco":
        pair = lambda q, k: moco_v3_loss(q, k, method.tau)  # noqa: E731
    elif method.loss_variant == "public":
        pair = lambda q, k: lecl_loss_public_variant(q, k, is_key, method.lam, method.tau)  # noqa: E731
    else:
        pair = lambda q, k: lecl_loss(q, k, is_key, method.lam, method.tau)  # noqa: E731
    return pair(q1, k2) + pair(q2, k1)


def _atomic_torch_save(payload: dict, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save(payload, tmp)
    os.replace(tmp, path)


class Trainer:
    def __init__(self, config: PretrainConfig, dist: DistInfo | None = None):
        self.config = config
        self.dist = dist or init_distributed(config.run.device)
        self.device = self.dist.device
        if config.optim.batch_size % self.dist.world_size:
            raise ValueError(
                f"optim.batch_size {config.optim.batch_size} does not split over {self.dist.world_size} processes"
            )
        self.local_batch = config.optim.batch_size // self.dist.world_size
        self.store = SliceStore(config.data.store)
        self.steps_per_epoch = len(self.store) // config.optim.batch_size
        if self.steps_per_epoch < 1:
            raise ValueError(f"{config.data.store}: {len(self.store)} slices, fewer than one batch")
        torch.manual_seed(config.run.seed)  # identical initial weights on every rank
        encoder_kwargs = dict(config.model.encoder_kwargs)
        if config.model.encoder.startswith("vit"):  # fixed position grid: built for the training size
            encoder_kwargs.setdefault("img_size", config.data.image_size)
        model = MoCo(
            config.model.encoder,
            encoder_kwargs,
            dim=config.model.dim,
            mlp_dim=config.model.mlp_dim,
            projector_layers=config.model.projector_layers,
            predictor_layers=config.model.predictor_layers,
            mlp_norm=config.model.mlp_norm,
        ).to(self.device)
        if self.dist.enabled and self.device.type == "cuda":
            model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
        self.model = model
        self.ddp = (
            DistributedDataParallel(model, device_ids=[self.device.index] if self.device.type == "cuda" else None)
            if self.dist.enabled
            else model
        )
        self.optimizer = build_optimizer(config.optim.name, model.parameters(), config.optim.weight_decay)
        self.amp = config.optim.amp and self.device.type == "cuda"
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp)
        self.batcher = Batcher(self.store, config, self.device)
        self.out_dir = Path(config.run.out_dir)
        self.epoch, self.step = 0, 0  # next step to run
        self.global_step = 0
        self._resume()

    # --------------------------------------------------------------------------- checkpoints
    def state(self) -> dict:
        return {
            "format": "clear-pretrain-v1",
            "config": self.config.model_dump(mode="json"),
            "epoch": self.epoch,
            "step": self.step,
            "global_step": self.global_step,
            "state_dict": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict(),
            "rng": "derived from (seed, epoch, step, rank); see clear_training.pretrain",
        }

    def save_checkpoint(self) -> Path | None:
        if not self.dist.is_main:
            return None
        self.out_dir.mkdir(parents=True, exist_ok=True)
        path = self.out_dir / CHECKPOINT
        _atomic_torch_save(self.state(), path)
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

    # ------------------------------------------------------------------------------ training
    def rows_for(self, epoch: int, step: int) -> np.ndarray:
        order = epoch_order(len(self.store), self.config.run.seed, epoch)
        start = step * self.config.optim.batch_size + self.dist.rank * self.local_batch
        return order[start : start + self.local_batch]

    def train_step(self) -> dict:
        cfg = self.config
        epoch_f = self.epoch + self.step / self.steps_per_epoch
        lr = learning_rate(epoch_f, cfg.scaled_lr, cfg.run.warmup_epochs, cfg.run.epochs)
        m = momentum(epoch_f, cfg.method.momentum, cfg.run.epochs)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        seed = step_seed(cfg.run.seed, self.epoch, self.step, self.dist.rank)
        torch.manual_seed(seed)  # dropout / drop-path of this step
        x1, x2, y1, y2, is_key = self.batcher(self.rows_for(self.epoch, self.step), seed)
        self.ddp.train()
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.amp):
            q1, q2, k1, k2 = self.ddp(x1, x2, y1, y2, m)
        loss = contrastive_loss(q1.float(), q2.float(), k1.float(), k2.float(), is_key, cfg.method)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.step += 1
        self.global_step += 1
        if self.step == self.steps_per_epoch:
            self.epoch, self.step = self.epoch + 1, 0
        return {"loss": float(all_reduce_mean(loss.detach())), "lr": lr, "momentum": m, "key_slices": int(is_key.sum())}

    def fit(self) -> list[dict]:
        cfg = self.config
        history = []
        log_file = self.out_dir / "log.jsonl"
        if self.dist.is_main:
            self.out_dir.mkdir(parents=True, exist_ok=True)
        started, views = time.perf_counter(), 0
        while self.epoch < cfg.run.epochs:
            if cfg.run.max_steps is not None and self.global_step >= cfg.run.max_steps:
                break
            record = self.train_step()
            views += 4 * cfg.optim.batch_size  # two base views and two momentum views per slice
            record.update(epoch=self.epoch, step=self.step, global_step=self.global_step)
            history.append(record)
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


def export_encoder(checkpoint: str | os.PathLike, out: str | os.PathLike, name: str | None = None) -> Path:
    """The pretrained base encoder as an engine bundle, through the engine's own MoCo converter."""
    from CLEARLib.bundle.convert import convert_moco

    state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    config = state.get("config")
    if not isinstance(config, dict) or "model" not in config:
        raise ValueError(f"{checkpoint}: not a CLEAR pretraining checkpoint (no config)")
    model_cfg, data_cfg = config["model"], config["data"]
    return convert_moco(
        checkpoint,
        out,
        model_cfg["encoder"],
        name=name or config["run"]["name"],
        windows=data_cfg["windows"],
        input_size=data_cfg["image_size"],
        encoder_kwargs=model_cfg["encoder_kwargs"],
    )
