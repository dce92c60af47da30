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
from typing import Literal

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from CLEARLib.errors import CLEARInputError
from CLEARLib.files import write_npy
from CLEARLib.io import read_seed_table
from CLEARLib.models import LinearHead, create_encoder

from .config import OptimConfig, StrictModel, TrainingRunConfig
from .losses import LesionContrastiveLoss
from .trainer import DistributedTrainer

log = logging.getLogger(__name__)
PATCH = 50


# ------------------------------------------------------------------------------------------ config
class LesionData(StrictModel):
    seeds: Path
    cache_dir: Path
    margin: int = Field(10, ge=0, le=20, description="voxels cached around the 50 mm patch (translations)")
    negatives_per_seed: int = Field(4, ge=1)
    label_column: str = "label"


class LesionModel(StrictModel):
    encoder_kwargs: dict = Field(default_factory=dict, description="fmcib_resnet50 overrides (tests: tiny nets)")
    hidden_dim: int = 2048
    projection_dim: int = 128
    init_bundle: Path | None = Field(None, description="fine-tuning: start from this lesion bundle's encoder")


class LesionMethod(StrictModel):
    loss: Literal["ntxent", "fmcib"] = "ntxent"
    temperature: float = Field(0.1, gt=0)
    crop_scale: tuple[float, float] = (0.5, 1.0)


class LesionPretrainConfig(StrictModel):
    run: TrainingRunConfig
    data: LesionData
    model: LesionModel = LesionModel()
    method: LesionMethod = LesionMethod()
    optim: OptimConfig = OptimConfig(name="lars", lr=0.3, weight_decay=1e-6, batch_size=64)


# ------------------------------------------------------------------------------------ region cache
def _background_centres(volume, seed_lps, n: int, rng) -> list[np.ndarray]:
    """Centres of patches elsewhere in the scan whose 50 mm cube does not overlap the lesion's."""
    first, last = volume.index_to_lps([0, 0, 0]), volume.index_to_lps(np.array(volume.shape, dtype=float) - 1)
    lo, hi = np.minimum(first, last), np.maximum(first, last)
    centres = []
    for _ in range(1000 * n):
        c = rng.uniform(lo, hi)
        if np.max(np.abs(c - seed_lps)) >= PATCH:
            centres.append(c)
            if len(centres) == n:
                return centres
    raise CLEARInputError("the scan is too small for background patches that do not overlap the lesion")


def build_region_cache(seeds: pd.DataFrame, data: LesionData, seed: int = 0) -> list[Path]:
    """One .npy per seed: [1 + negatives, S, S, S] normalised regions, S = 50 + 2 * margin (cached once)."""
    from CLEARLib.io import read_ct
    from CLEARLib.preprocess import extract_lesion_patch

    size = PATCH + 2 * data.margin
    cache = Path(data.cache_dir)
    cache.mkdir(parents=True, exist_ok=True)
    paths = []
    for image_path, rows in seeds.groupby("image_path", sort=False):
        volume = None
        for i, row in rows.iterrows():
            key = hashlib.sha256(
                f"{image_path}|{row.coordX:.3f}|{row.coordY:.3f}|{row.coordZ:.3f}|{size}|{data.negatives_per_seed}|{seed}".encode()
            ).hexdigest()[:20]
            target = cache / f"{key}.npy"
            paths.append((i, target))
            if target.exists():
                continue
            volume = volume or read_ct(image_path)
            seed_lps = np.array([row.coordX, row.coordY, row.coordZ], dtype=float)
            rng = np.random.default_rng([seed, int(i)])
            centres = [seed_lps, *_background_centres(volume, seed_lps, data.negatives_per_seed, rng)]
            regions = np.stack([extract_lesion_patch(volume, c, size=size) for c in centres])
            write_npy(target, regions.astype(np.float32))
    return [p for _, p in sorted(paths)]


# ----------------------------------------------------------------------------------- 3D views
def gaussian_smooth3d(x: torch.Tensor, sigma_xyz) -> torch.Tensor:
    """MONAI's Gaussian filter (what its RandGaussianSmooth applies) with one sigma per axis, in voxels."""
    from monai.networks.layers import GaussianFilter

    # Patches are [B, 1, z, y, x]: MONAI's spatial dims run in array order, so x's sigma goes last.
    sigma = [float(v) for v in reversed(list(sigma_xyz))]
    return GaussianFilter(spatial_dims=3, sigma=sigma).to(x.device)(x)


def histogram_shift(x: torch.Tensor, generator, n_points: int = 6, amount: float = 0.05) -> torch.Tensor:
    """A random monotone piecewise-linear intensity map per sample (MONAI's RandHistogramShift idea)."""
    out = torch.empty_like(x)
    for b in range(x.shape[0]):
        lo, hi = float(x[b].min()), float(x[b].max())
        if hi <= lo:
            out[b] = x[b]
            continue
        xp = torch.linspace(lo, hi, n_points, device=x.device)
        fp = xp.clone()
        jitter = (torch.rand(n_points - 2, generator=generator, device=x.device) * 2 - 1) * amount * (hi - lo)
        fp[1:-1] = torch.sort(fp[1:-1] + jitter).values
        idx = torch.bucketize(x[b].clamp(lo, hi), xp).clamp(1, n_points - 1)
        x0, x1, y0, y1 = xp[idx - 1], xp[idx], fp[idx - 1], fp[idx]
        out[b] = y0 + (x[b] - x0) * (y1 - y0) / (x1 - x0)
    return out


def simclr_views(regions: torch.Tensor, margin: int, scale, generator) -> torch.Tensor:
    """[B, 1, S, S, S] cached regions -> [B, 1, 50, 50, 50] views, FMCIB's SimCLR augmentations:
    random resized crop of the central patch (each axis scaled by one factor drawn from `scale`, MONAI
    RandScaleCrop semantics: 0.5 on 50^3 is 25^3, resized back to 50^3), a flip along one random axis
    with p 0.5, histogram shift with p 0.5, and Gaussian smoothing with p 0.5 and sigma drawn per axis
    from 0.25-1.5 voxels."""
    b, s = regions.shape[0], regions.shape[-1]
    device = regions.device
    factor = torch.rand(b, generator=generator, device=device) * (scale[1] - scale[0]) + scale[0]
    side = PATCH * factor  # voxels of the crop along every axis
    half = side / s  # normalised half-extent of the crop within the region
    room = (PATCH - side) / s  # the crop stays inside the central 50 mm patch
    centre = (torch.rand(b, 3, generator=generator, device=device) * 2 - 1) * room[:, None]
    flip = torch.rand(b, generator=generator, device=device) < 0.5
    flip_axis = torch.randint(0, 3, (b,), generator=generator, device=device)
    signs = torch.ones(b, 3, device=device)
    signs[flip, flip_axis[flip]] = -1.0
    theta = torch.zeros(b, 3, 4, device=device)
    for axis in range(3):
        theta[:, axis, axis] = half * signs[:, axis]
        theta[:, axis, 3] = centre[:, axis]
    grid = F.affine_grid(theta, [b, 1, PATCH, PATCH, PATCH], align_corners=False)
    x = F.grid_sample(regions, grid, mode="bilinear", padding_mode="border", align_corners=False)
    shift = torch.rand(b, generator=generator, device=device) < 0.5
    if shift.any():
        x[shift] = histogram_shift(x[shift], generator)
    smooth = torch.rand(b, generator=generator, device=device) < 0.5
    sigmas = torch.rand(b, 3, generator=generator, device=device) * 1.25 + 0.25
    for i in torch.nonzero(smooth).flatten().tolist():
        x[i : i + 1] = gaussian_smooth3d(x[i : i + 1], sigmas[i].tolist())
    return x


def finetune_views(regions: torch.Tensor, margin: int, generator) -> torch.Tensor:
    """FMCIB's fine-tuning augmentations: translations of up to `margin` voxels, axis flips and
    90-degree rotations."""
    out = []
    for r in regions:
        shift = torch.randint(0, 2 * margin + 1, (3,), generator=generator).tolist()
        x = r[:, shift[0] : shift[0] + PATCH, shift[1] : shift[1] + PATCH, shift[2] : shift[2] + PATCH]
        for axis in range(3):
            if float(torch.rand(1, generator=generator)) < 0.5:
                x = x.flip(1 + axis)
        k = int(torch.randint(0, 4, (1,), generator=generator))
        plane = [(1, 2), (1, 3), (2, 3)][int(torch.randint(0, 3, (1,), generator=generator))]
        out.append(torch.rot90(x, k, plane))
    return torch.stack(out)


# ------------------------------------------------------------------------------------ model, loss
class SimCLRModel(nn.Module):
    def __init__(self, encoder_kwargs: dict, hidden_dim: int, projection_dim: int):
        super().__init__()
        self.encoder = create_encoder("fmcib_resnet50", **encoder_kwargs)
        self.projector = nn.Sequential(
            nn.Linear(self.encoder.num_features, hidden_dim),
            nn.ReLU(inplace=True),
            nn.Linear(hidden_dim, projection_dim),
        )

    def forward(self, *views):
        return [self.projector(self.encoder(v)) for v in views]


# -------------------------------------------------------------------------------------- trainers
class LesionPretrainer(DistributedTrainer):
    @property
    def loss(self) -> LesionContrastiveLoss:
        return LesionContrastiveLoss.from_config(self.config.method)

    @property
    def views_per_item(self) -> int:  # two views of the lesion, and for FMCIB's loss two of a background patch
        return self.loss.views_per_item

    def prepare_data(self) -> int:
        self.seeds = read_seed_table(self.config.data.seeds)
        self.cache = build_region_cache(self.seeds, self.config.data, self.config.run.seed)
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


class LesionClassifier(nn.Module):
    def __init__(self, encoder_kwargs: dict, n_classes: int):
        super().__init__()
        self.encoder = create_encoder("fmcib_resnet50", **encoder_kwargs)
        self.head = LinearHead(self.encoder.num_features, n_classes)

    def forward(self, x):
        return self.head(self.encoder(x))


class LesionFinetuner(LesionPretrainer):
    views_per_item = 1

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
