"""3D lesion model training (the FMCIB recipe): SimCLR pretraining from a seed table, and supervised
fine-tuning with a classification head, both on the shared distributed loop (`trainer.py`), both
exported as lesion bundles that the engine, `clear-ct lesion` and the Slicer module load.

Seed table CSV: `image_path, coordX, coordY, coordZ` (LPS mm), optional `label`. For every seed the
region around it (and a few background regions elsewhere in the same scan, not overlapping the
lesion's 50 mm patch) is extracted once by the engine's patch extractor, on its 1 mm grid, and cached
as .npy; training crops views from the cache.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn

from CLEARLib.errors import CLEARInputError
from CLEARLib.files import write_npy
from CLEARLib.io import read_seed_table

from .config import LesionData
from .losses import LesionContrastiveLoss
from .models import LesionClassifier, SimCLRModel
from .trainer import DistributedTrainer
from .views import PATCH, finetune_views, simclr_views

log = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------ region cache
def _background_centres(volume, seed_lps, n: int, rng) -> list[np.ndarray]:
    """Centres of patches elsewhere in the scan whose 50 mm cube does not overlap the lesion's."""
    first, last = volume.index_to_lps([0, 0, 0]), volume.index_to_lps(np.array(volume.shape, dtype=float) - 1)
    lo, hi = np.minimum(first, last), np.maximum(first, last)
    centres = []
    if not n:
        return centres
    for _ in range(1000 * n):
        c = rng.uniform(lo, hi)
        if np.max(np.abs(c - seed_lps)) >= PATCH:
            centres.append(c)
            if len(centres) == n:
                return centres
    raise CLEARInputError("the scan is too small for background patches that do not overlap the lesion")


def build_region_cache(
    seeds: pd.DataFrame, data: LesionData, seed: int = 0, negatives: int | None = None
) -> list[Path]:
    """One .npy per seed: [1 + negatives, S, S, S] normalised regions, S = 50 + 2 * margin (cached once): the
    lesion's, then `negatives` background ones (data.negatives_per_seed unless given)."""
    from CLEARLib.io import read_ct
    from CLEARLib.preprocess import extract_lesion_patch

    negatives = data.negatives_per_seed if negatives is None else negatives
    size = PATCH + 2 * data.margin
    cache = Path(data.cache_dir)
    cache.mkdir(parents=True, exist_ok=True)
    paths = []
    for image_path, rows in seeds.groupby("image_path", sort=False):
        volume = None
        for i, row in rows.iterrows():
            key = hashlib.sha256(
                f"{image_path}|{row.coordX:.3f}|{row.coordY:.3f}|{row.coordZ:.3f}|{size}|{negatives}|{seed}".encode()
            ).hexdigest()[:20]
            target = cache / f"{key}.npy"
            paths.append((i, target))
            if target.exists():
                continue
            volume = volume or read_ct(image_path)
            seed_lps = np.array([row.coordX, row.coordY, row.coordZ], dtype=float)
            rng = np.random.default_rng([seed, int(i)])
            centres = [seed_lps, *_background_centres(volume, seed_lps, negatives, rng)]
            regions = np.stack([extract_lesion_patch(volume, c, size=size) for c in centres])
            write_npy(target, regions.astype(np.float32))
    return [p for _, p in sorted(paths)]


# -------------------------------------------------------------------------------------- trainers
class LesionPretrainer(DistributedTrainer):
    cached_negatives: int | None = None  # data.negatives_per_seed: FMCIB's loss contrasts lesions with background

    @property
    def loss(self) -> LesionContrastiveLoss:
        return LesionContrastiveLoss.from_config(self.config.method)

    @property
    def views_per_item(self) -> int:  # two views of the lesion, and for FMCIB's loss two of a background patch
        return self.loss.views_per_item

    def prepare_data(self) -> int:
        self.seeds = read_seed_table(self.config.data.seeds)
        self.cache = build_region_cache(self.seeds, self.config.data, self.config.run.seed, self.cached_negatives)
        return len(self.cache)

    def build_model(self) -> nn.Module:
        m = self.config.model
        return SimCLRModel(m.encoder_kwargs, m.hidden_dim, m.projection_dim)

    def _regions(self, rows) -> np.ndarray:
        return np.stack([np.load(self.cache[r], mmap_mode="r") for r in rows])  # [B, 1 + neg, S, S, S]

    def make_batch(self, rows, seed):
        generator = torch.Generator(device=self.device).manual_seed(seed)
        regions = torch.from_numpy(self._regions(rows)).to(self.device)
        lesion = regions[:, :1]
        pick = torch.randint(1, regions.shape[1], (len(rows),), generator=generator, device=self.device)
        background = regions[torch.arange(len(rows), device=self.device), pick][:, None]
        margin, scale = self.config.data.margin, self.config.method.crop_scale
        views = [simclr_views(lesion, margin, scale, generator) for _ in range(2)]
        views += [simclr_views(background, margin, scale, generator) for _ in range(self.views_per_item - 2)]
        return tuple(views)

    def compute_loss(self, batch, epoch_f):
        with self.autocast():
            z = [v.float() for v in self.ddp(*batch)]
        loss = self.loss(*z)
        return loss, {}


class LesionFinetuner(LesionPretrainer):
    views_per_item = 1
    cached_negatives = 0  # fine-tuning reads the lesion's region only; background regions would cost 4x its cache

    def prepare_data(self) -> int:
        n = super().prepare_data()
        column = self.config.data.label_column
        if column not in self.seeds:
            raise CLEARInputError(f"fine-tuning needs a {column!r} column", self.config.data.seeds)
        self.classes = sorted(self.seeds[column].astype(str).unique())
        if len(self.classes) < 2:
            raise CLEARInputError(f"fine-tuning needs at least two classes in {column!r}", self.config.data.seeds)
        self.targets = self.seeds[column].astype(str).map({c: i for i, c in enumerate(self.classes)}).to_numpy()
        return n

    def build_model(self) -> nn.Module:
        m = self.config.model
        model = LesionClassifier(m.encoder_kwargs, len(self.classes))
        if m.init_bundle:
            from CLEARLib.bundle import load_bundle, load_state_strict

            pretrained = load_bundle(m.init_bundle)
            load_state_strict(model.encoder, pretrained.encoder.state_dict(), "pretrained encoder", m.init_bundle)
        return model

    def make_batch(self, rows, seed):
        generator = torch.Generator().manual_seed(seed)
        regions = torch.from_numpy(self._regions(rows)[:, :1].copy())
        x = finetune_views(regions, self.config.data.margin, generator).to(self.device)
        return x, torch.as_tensor(self.targets[rows], device=self.device)

    def state(self) -> dict:
        return {**super().state(), "classes": self.classes}  # the exported bundle names its labels

    def compute_loss(self, batch, epoch_f):
        x, y = batch
        with self.autocast():
            logits = self.ddp(x)
        loss = F.cross_entropy(logits.float(), y)
        return loss, {"accuracy": float((logits.argmax(1) == y).float().mean())}
