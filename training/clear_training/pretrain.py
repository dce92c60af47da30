"""MoCo v3 / LeCL pretraining of slice encoders, on the shared distributed loop of `trainer.py`."""

from __future__ import annotations

import dataclasses
import logging

import numpy as np
import torch

from CLEARLib.errors import CLEARInputError
from CLEARLib.models import encoder_entry
from CLEARLib.preprocess import resolve_windows

from .config import PretrainConfig
from .data.store import SliceStore
from .losses import SliceContrastiveLoss
from .models import MoCo
from .optim import momentum
from .trainer import DistributedTrainer, epoch_order
from .views import SlicePyramid, ViewConfig, lesion_boxes, make_views, random_resized_boxes

log = logging.getLogger(__name__)


class Batcher:
    """Turns store rows into the four view tensors of a step (x1, x2 for the base branch, y1, y2 for
    the momentum branch) plus the key-slice mask, all on the training device."""

    def __init__(self, store: SliceStore, config: PretrainConfig, device: torch.device):
        self.store, self.device = store, device
        self.lecl = config.method.name == "lecl"
        self.windows = resolve_windows(config.data.windows)
        self.bounds = torch.tensor([[w.low, w.high] for w in self.windows], device=device)
        view = ViewConfig(
            spec=encoder_entry(config.model.encoder).spec_at(config.data.image_size),  # what the bundle records
            scale=tuple(config.data.crop_scale),
            blur_p=config.data.blur_p,
            lesion_context=config.data.lesion_context,
            lesion_crop_px=config.data.lesion_crop_px,
        )
        if config.data.augmentations == "moco_v3":
            # MoCo v3's two asymmetric views (the authors' code): no CT-specific jitter.
            plain = dict(window_jitter=0.0, contrast=0.0, gamma=0.0, noise_std=0.0, hflip=0.5, color_jitter=(0.4, 0.4))
            self.views = (
                dataclasses.replace(view, **plain, blur_p=1.0, solarize_p=0.0),
                dataclasses.replace(view, **plain, blur_p=0.1, solarize_p=0.2),
            )
        else:
            self.views = (view, view)
        self.view = view
        # data.lesion_windows: lesion type code -> the window index its key slices are shown in
        self.read_in = config.data.lesion_window_index() if self.lecl else {}

    def __call__(self, rows: np.ndarray, seed: int):
        generator = torch.Generator(device=self.device).manual_seed(seed)
        cpu_generator = torch.Generator().manual_seed(seed)
        hu = SlicePyramid(self.store.slices(rows).to(self.device, non_blocking=True))
        n = len(rows)
        window = self.windows_for(rows, generator, seed)
        bounds = self.bounds[window]  # one window per slice, shared by its views
        is_key = (
            torch.from_numpy(self.store.is_key[rows]).to(self.device)
            if self.lecl
            else torch.zeros(n, dtype=torch.bool, device=self.device)
        )
        views = []
        for view in self.views:
            boxes = random_resized_boxes(n, view, generator, self.device)
            if self.lecl:  # the base encoder sees key slices whole
                boxes[is_key] = torch.tensor([0.0, 0.0, 1.0, 1.0], device=self.device)
            views.append(make_views(hu, bounds, view, generator, boxes))
        x1, x2 = views
        y1, y2 = x1, x2
        if bool(is_key.any()):
            key_rows = np.asarray(rows)[is_key.cpu().numpy()]
            crops = []
            for view in self.views:  # the momentum encoder sees lesion-centred crops of key slices
                lesion = self.store.lesion_box(key_rows, cpu_generator)
                boxes = lesion_boxes(lesion, (self.store.size, self.store.size), view, generator, self.device)
                crops.append(make_views(hu, bounds[is_key], view, generator, boxes, index=is_key))
            y1, y2 = x1.clone(), x2.clone()
            y1[is_key], y2[is_key] = crops
        return x1, x2, y1, y2, is_key

    def windows_for(self, rows: np.ndarray, generator: torch.Generator, seed: int) -> torch.Tensor:
        """The window index each slice of the batch is shown in: drawn at random, except that key slices go to
        the window their lesions are read in (data.lesion_windows); a liver lesion in the lung window is barely
        visible, and a crop centred on it teaches nothing. A slice whose lesions are read in different windows
        gets one of them, drawn from (seed, row)."""
        rows = np.asarray(rows)
        window = torch.randint(len(self.windows), (len(rows),), generator=generator, device=self.device)
        for i in np.flatnonzero(self.store.is_key[rows]) if self.read_in else ():
            choices = sorted({self.read_in[t] for t in self.store.lesion_types(int(rows[i])) if t in self.read_in})
            if choices:
                window[i] = choices[np.random.default_rng([seed, int(rows[i])]).integers(len(choices))]
        return window


class Trainer(DistributedTrainer):
    """MoCo v3 / LeCL on the slice store."""

    views_per_item = 4  # two base views and two momentum views per slice

    def prepare_data(self) -> int:
        self.store = SliceStore(self.config.data.store)
        fraction, batch = self.config.data.key_slice_fraction, self.config.optim.batch_size
        if fraction is None:
            return len(self.store)
        self.key_rows, self.other_rows = np.flatnonzero(self.store.is_key), np.flatnonzero(~self.store.is_key)
        self.keys_per_batch = int(round(fraction * batch))
        if not self.key_rows.size or not 1 <= self.keys_per_batch < batch:
            raise CLEARInputError(
                f"data.key_slice_fraction {fraction} needs key slices in the store ({self.key_rows.size}) and puts "
                f"{self.keys_per_batch} of them in a batch of {batch}; it must be at least 1 and less than the batch",
                self.config.data.store,
            )
        # An epoch is one pass over the other slices; the key slices come round again as often as they must.
        return len(self.other_rows) // (batch - self.keys_per_batch) * batch

    def batch_rows(self, epoch: int, step: int) -> np.ndarray:
        if self.config.data.key_slice_fraction is None:
            return super().batch_rows(epoch, step)
        seed, batch, n_key = self.config.run.seed, self.config.optim.batch_size, self.keys_per_batch
        keys = self.key_rows[epoch_order(len(self.key_rows), seed, epoch)]
        others = self.other_rows[epoch_order(len(self.other_rows), seed + 1, epoch)]
        start = step * (batch - n_key)
        rows = np.concatenate(
            [keys[(step * n_key + np.arange(n_key)) % len(keys)], others[start : start + batch - n_key]]
        )
        return rows[np.random.default_rng([seed, epoch, step]).permutation(batch)]  # every rank gets its share of both

    def build_model(self) -> MoCo:
        model_cfg = self.config.model
        encoder_kwargs = encoder_entry(model_cfg.encoder).build_kwargs(
            model_cfg.encoder_kwargs, self.config.data.image_size
        )
        self.batcher = Batcher(self.store, self.config, self.device)
        return MoCo(
            model_cfg.encoder,
            encoder_kwargs,
            dim=model_cfg.dim,
            mlp_dim=model_cfg.mlp_dim,
            projector_layers=model_cfg.projector_layers,
            predictor_layers=model_cfg.predictor_layers,
            mlp_norm=model_cfg.mlp_norm,
            predictor_last_bn=model_cfg.predictor_last_bn,
        )

    def make_batch(self, rows, seed):
        return self.batcher(rows, seed)

    def compute_loss(self, batch, epoch_f):
        x1, x2, y1, y2, is_key = batch
        method = self.config.method
        m = method.momentum
        if method.momentum_schedule == "cosine":
            m = momentum(epoch_f, method.momentum, self.config.run.epochs)
        with self.autocast():
            q1, q2, k1, k2 = self.ddp(x1, x2, y1, y2, m)
        loss = SliceContrastiveLoss.from_config(self.config.method)(
            q1.float(), q2.float(), k1.float(), k2.float(), is_key
        )
        return loss, {"momentum": m, "key_slices": int(is_key.sum())}
