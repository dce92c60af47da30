"""Views for contrastive training, made on batched tensors (on the GPU when present), not per image in PIL.

Input: a batch of HU slices [B, H, W] (int16 from the slice store) with a window per sample.
Geometry (random resized crop, flips, and LeCL's lesion-centred crop) is one sampling grid per sample,
applied by `grid_sample` to the whole batch (from a 2x pooled level when a crop shrinks, against
aliasing); intensity augmentations are per-sample tensors broadcast over the batch. All randomness
comes from an explicit `torch.Generator`, so a step can be replayed exactly on resume.

3D lesion views (FMCIB's SimCLR recipe) crop, flip, smooth (MONAI's Gaussian filter) and shift the
histogram of batches of cached lesion regions the same way.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from monai.networks.layers import gaussian_1d, separable_filtering

from CLEARLib.models import IMAGENET_SPEC
from CLEARLib.preprocess import InputSpec


@dataclass(frozen=True)
class ViewConfig:
    # The encoder's input (size, normalisation) from the encoder registry: the bundle records the same spec.
    spec: InputSpec = IMAGENET_SPEC
    scale: tuple[float, float] = (0.2, 1.0)  # area fraction of the random resized crop (MoCo v3: 0.08-1)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    hflip: float = 0.5
    vflip: float = 0.0  # CT slices have a fixed anatomical orientation; off by default
    window_jitter: float = 0.1  # window centre/width jitter as a fraction of the width
    contrast: float = 0.2
    gamma: float = 0.2
    noise_std: float = 0.02
    blur_p: float = 0.5
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    lesion_context: tuple[float, float] = (1.5, 4.0)  # LeCL crop side = this x the lesion box's longer side
    lesion_crop_px: tuple[float, float] | None = None  # the authors' LeCL crop: side uniform in [low, high) px
    # MoCo v3's colour augmentations, as the authors' code applies them to windowed slices: with
    # probability color_jitter_p, brightness and contrast factors from U(1 - b, 1 + b), in random order
    # (saturation, hue and grayscale do nothing to a grey image); solarisation with solarize_p.
    color_jitter: tuple[float, float] | None = None
    color_jitter_p: float = 0.8
    solarize_p: float = 0.0

    @property
    def size(self) -> int:
        return self.spec.size


def _uniform(n, low, high, generator, device):
    return torch.rand(n, generator=generator, device=device) * (high - low) + low


def random_resized_boxes(n: int, cfg: ViewConfig, generator, device) -> torch.Tensor:
    """Crop boxes [n, 4] as (centre x, centre y, half width, half height) in normalised [-1, 1] units."""
    area = _uniform(n, *cfg.scale, generator, device)
    log_ratio = _uniform(n, math.log(cfg.ratio[0]), math.log(cfg.ratio[1]), generator, device)
    aspect = torch.exp(log_ratio)
    half_w = torch.sqrt(area * aspect).clamp(max=1.0)
    half_h = torch.sqrt(area / aspect).clamp(max=1.0)
    cx = (torch.rand(n, generator=generator, device=device) * 2 - 1) * (1 - half_w)
    cy = (torch.rand(n, generator=generator, device=device) * 2 - 1) * (1 - half_h)
    return torch.stack([cx, cy, half_w, half_h], dim=1)


def lesion_boxes(boxes_px: torch.Tensor, image_hw: tuple[int, int], cfg: ViewConfig, generator, device) -> torch.Tensor:
    """Square crops centred on lesion boxes (x1, y1, x2, y2 pixels), with a random size that keeps the
    lesion inside: side = lesion side x U(lesion_context), never smaller than the lesion itself. With
    `cfg.lesion_crop_px` (the authors' code), side = U(lesion_crop_px) pixels whatever the lesion's size."""
    h, w = image_hw
    x1, y1, x2, y2 = boxes_px.to(device=device, dtype=torch.float32).unbind(1)
    centre_x = (x1 + x2) / 2  # the box centre ((x1 + x2) / 2, (y1 + y2) / 2), not a corner
    centre_y = (y1 + y2) / 2
    if cfg.lesion_crop_px is not None:
        side = _uniform(len(boxes_px), *cfg.lesion_crop_px, generator, device)
    else:
        side = torch.maximum(x2 - x1, y2 - y1).clamp(min=4.0)
        side = side * _uniform(len(boxes_px), *cfg.lesion_context, generator, device)
    # Pixel centres to normalised coordinates (align_corners=False convention).
    cx = (centre_x + 0.5) / w * 2 - 1
    cy = (centre_y + 0.5) / h * 2 - 1
    return torch.stack([cx, cy, side / w, side / h], dim=1)


def _crop_grid(boxes: torch.Tensor, hflip: torch.Tensor, vflip: torch.Tensor, size: int) -> torch.Tensor:
    """Sampling grid [n, size, size, 2] of axis-aligned crops. Equivalent to affine_grid with a
    scale-and-shift matrix, built by broadcasting because x depends on the column only and y on the row."""
    base = (torch.arange(size, device=boxes.device, dtype=torch.float32) * 2 + 1) / size - 1
    sx = boxes[:, 2] * torch.where(hflip, -1.0, 1.0)
    sy = boxes[:, 3] * torch.where(vflip, -1.0, 1.0)
    gx = boxes[:, 0, None] + sx[:, None] * base[None]  # [n, size] over columns
    gy = boxes[:, 1, None] + sy[:, None] * base[None]  # [n, size] over rows
    n = len(boxes)
    return torch.stack([gx[:, None, :].expand(n, size, size), gy[:, :, None].expand(n, size, size)], dim=-1)


# Gaussian-blur strengths are quantised to a few levels so that each level is one shared separable
# kernel over its samples (mkldnn's fast path), instead of a grouped convolution with a kernel per sample.
_BLUR_LEVELS = 6


def _gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Gaussian blur of [n, 1, H, W] with one sigma (pixels): MONAI's separable filter with a kernel to 3 sigma,
    replicate-padded so that the slice border is not darkened (MONAI's GaussianFilter pads with zeros)."""
    kernel = gaussian_1d(sigma, truncated=3.0, approx="sampled", normalize=True).to(x)
    return separable_filtering(x, [kernel, kernel], mode="replicate")


class SlicePyramid:
    """A batch of HU slices prepared once for all its views: full resolution and a 2x average-pooled
    level (the anti-aliasing source for crops that shrink by 1.5x or more), as HU + 1024 so that
    grid_sample's zero padding is air."""

    def __init__(self, hu: torch.Tensor):
        full = hu.float().unsqueeze(1)
        full += 1024.0
        self.levels = [full, F.avg_pool2d(full, 2)]
        self.shape = tuple(hu.shape[-2:])
        self.device = hu.device

    def __len__(self) -> int:
        return self.levels[0].shape[0]

    def sample(self, grid: torch.Tensor, zoom: torch.Tensor, index: torch.Tensor | None = None) -> torch.Tensor:
        """HU + 1024 sampled at `grid` ([n, h, w, 2]) for slices `index` (all when None)."""
        out = grid.new_empty(grid.shape[0], 1, *grid.shape[1:3])
        coarse = zoom >= 1.5
        for level, take in ((0, ~coarse), (1, coarse)):
            if bool(take.any()):
                source = self.levels[level] if index is None else self.levels[level][index]
                out[take] = F.grid_sample(
                    source[take], grid[take], mode="bilinear", padding_mode="zeros", align_corners=False
                )
        return out


def _color_jitter(x: torch.Tensor, cfg: ViewConfig, generator) -> torch.Tensor:
    """torchvision's ColorJitter(brightness, contrast) on [n, 1, h, w] images in [0, 1], applied with
    probability cfg.color_jitter_p, the two adjustments in a random order per image."""
    n, device = x.shape[0], x.device
    brightness, contrast = cfg.color_jitter
    apply = (torch.rand(n, generator=generator, device=device) < cfg.color_jitter_p).view(-1, 1, 1, 1)
    b = _uniform(n, 1 - brightness, 1 + brightness, generator, device).view(-1, 1, 1, 1)
    c = _uniform(n, 1 - contrast, 1 + contrast, generator, device).view(-1, 1, 1, 1)
    brightness_first = (torch.rand(n, generator=generator, device=device) < 0.5).view(-1, 1, 1, 1)

    def adjust_contrast(image):  # blend with the image's mean grey level, as torchvision does
        return (c * image + (1 - c) * image.mean(dim=(1, 2, 3), keepdim=True)).clamp(0, 1)

    one = adjust_contrast((x * b).clamp(0, 1))
    other = (adjust_contrast(x) * b).clamp(0, 1)
    return torch.where(apply, torch.where(brightness_first, one, other), x)


def make_views(
    slices: torch.Tensor | SlicePyramid,
    window_bounds: torch.Tensor,
    cfg: ViewConfig,
    generator: torch.Generator,
    boxes: torch.Tensor | None = None,
    index: torch.Tensor | None = None,
) -> torch.Tensor:
    """One augmented view per slice: [n, 3, size, size], normalised.

    slices: [B, H, W] HU, or a `SlicePyramid` made once for several views of the same batch;
    window_bounds: [n, 2] (low, high) per view; boxes: optional [n, 4] normalised crop boxes (default:
    random resized crops), e.g. from `lesion_boxes`; index: which slices of the batch to use (all).
    Geometry is applied to HU, then the (jittered) window: interpolating before windowing, as a
    scanner's reconstruction would.
    """
    pyramid = slices if isinstance(slices, SlicePyramid) else SlicePyramid(slices)
    device = pyramid.device
    if index is not None and index.dtype == torch.bool:
        index = index.nonzero().flatten()
    n = len(pyramid) if index is None else len(index)
    if boxes is None:
        boxes = random_resized_boxes(n, cfg, generator, device)
    hflip = torch.rand(n, generator=generator, device=device) < cfg.hflip
    vflip = torch.rand(n, generator=generator, device=device) < cfg.vflip
    grid = _crop_grid(boxes, hflip, vflip, cfg.size)
    zoom = boxes[:, 2:].max(dim=1).values * max(pyramid.shape) / cfg.size
    x = pyramid.sample(grid, zoom, index) - 1024.0  # HU
    low, high = window_bounds[:, 0].float(), window_bounds[:, 1].float()
    width = high - low
    shift = _uniform(n, -cfg.window_jitter, cfg.window_jitter, generator, device) * width
    scale = 1 + _uniform(n, -cfg.window_jitter, cfg.window_jitter, generator, device)
    low_j = low + shift - (scale - 1) * width / 2
    width_j = width * scale
    x = ((x - low_j.view(-1, 1, 1, 1)) / width_j.view(-1, 1, 1, 1)).clamp(0, 1)
    contrast = 1 + _uniform(n, -cfg.contrast, cfg.contrast, generator, device)
    x = ((x - 0.5) * contrast.view(-1, 1, 1, 1) + 0.5).clamp(0, 1)
    gamma = torch.exp(_uniform(n, -cfg.gamma, cfg.gamma, generator, device))
    x = x.clamp_min(1e-6) ** gamma.view(-1, 1, 1, 1)
    blur = torch.rand(n, generator=generator, device=device) < cfg.blur_p
    sigma = _uniform(n, *cfg.blur_sigma, generator, device)
    levels = torch.linspace(*cfg.blur_sigma, _BLUR_LEVELS, device=device)
    level = torch.bucketize(sigma, (levels[1:] + levels[:-1]) / 2)
    for j in range(_BLUR_LEVELS):
        take = blur & (level == j)
        if bool(take.any()):
            x[take] = _gaussian_blur(x[take], float(levels[j]))
    if cfg.noise_std:
        noise = torch.randn(x.shape, generator=generator, device=device) * cfg.noise_std
        x = (x + noise).clamp(0, 1)
    if cfg.color_jitter is not None:
        x = _color_jitter(x, cfg, generator)
    if cfg.solarize_p:
        solarize = (torch.rand(n, generator=generator, device=device) < cfg.solarize_p).view(-1, 1, 1, 1)
        x = torch.where(solarize & (x >= 0.5), 1 - x, x)
    mean = torch.tensor(cfg.spec.mean, device=device).view(1, -1, 1, 1)
    std = torch.tensor(cfg.spec.std, device=device).view(1, -1, 1, 1)
    return (x.expand(-1, cfg.spec.channels, -1, -1) - mean) / std


# ------------------------------------------------------------------- 3D lesion views (FMCIB recipe)
PATCH = 50  # voxels (1 mm) of FMCIB's lesion patch


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
