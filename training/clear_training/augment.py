"""Contrastive views made on batched tensors (on the GPU when present), not per image in PIL.

Input: a batch of HU slices [B, H, W] (int16 from the slice store) with a window per sample.
Geometry (random resized crop, flips, and LeCL's lesion-centred crop) is one affine grid per sample,
applied by a single `grid_sample` to the whole batch; intensity augmentations are per-sample
tensors broadcast over the batch. All randomness comes from an explicit `torch.Generator`, so a
step can be replayed exactly on resume.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class ViewConfig:
    size: int = 224
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
    mean: tuple[float, ...] = (0.485, 0.456, 0.406)
    std: tuple[float, ...] = (0.229, 0.224, 0.225)


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
    lesion inside: side = lesion side x U(lesion_context), never smaller than the lesion itself."""
    h, w = image_hw
    x1, y1, x2, y2 = boxes_px.to(device=device, dtype=torch.float32).unbind(1)
    centre_x = (x1 + x2) / 2  # the box centre ((x1 + x2) / 2, (y1 + y2) / 2), not a corner
    centre_y = (y1 + y2) / 2
    side = torch.maximum(x2 - x1, y2 - y1).clamp(min=4.0)
    side = side * _uniform(len(boxes_px), *cfg.lesion_context, generator, device)
    # Pixel centres to normalised coordinates (align_corners=False convention).
    cx = (centre_x + 0.5) / w * 2 - 1
    cy = (centre_y + 0.5) / h * 2 - 1
    return torch.stack([cx, cy, side / w, side / h], dim=1)


def _affine(boxes: torch.Tensor, hflip: torch.Tensor, vflip: torch.Tensor) -> torch.Tensor:
    theta = torch.zeros(len(boxes), 2, 3, device=boxes.device)
    theta[:, 0, 0] = boxes[:, 2] * torch.where(hflip, -1.0, 1.0)
    theta[:, 1, 1] = boxes[:, 3] * torch.where(vflip, -1.0, 1.0)
    theta[:, 0, 2] = boxes[:, 0]
    theta[:, 1, 2] = boxes[:, 1]
    return theta


def _gaussian_blur(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Per-sample separable Gaussian blur of [B, 1, H, W] as one grouped convolution per axis."""
    radius = int(math.ceil(3 * float(sigma.max())))
    offsets = torch.arange(-radius, radius + 1, device=x.device, dtype=x.dtype)
    kernels = torch.exp(-(offsets[None] ** 2) / (2 * sigma[:, None] ** 2))
    kernels = kernels / kernels.sum(1, keepdim=True)  # [B, K]
    b = x.shape[0]
    y = x.reshape(1, b, *x.shape[2:])
    y = F.conv2d(F.pad(y, (radius, radius, 0, 0), mode="reflect"), kernels.view(b, 1, 1, -1), groups=b)
    y = F.conv2d(F.pad(y, (0, 0, radius, radius), mode="reflect"), kernels.view(b, 1, -1, 1), groups=b)
    return y.reshape_as(x)


def make_views(
    hu: torch.Tensor,
    window_bounds: torch.Tensor,
    cfg: ViewConfig,
    generator: torch.Generator,
    boxes: torch.Tensor | None = None,
) -> torch.Tensor:
    """One augmented view per slice: [B, 3, size, size], normalised.

    hu: [B, H, W] HU slices; window_bounds: [B, 2] (low, high) per sample; boxes: optional [B, 4]
    normalised crop boxes (defaults to random resized crops), e.g. from `lesion_boxes`.
    """
    device = hu.device
    n = hu.shape[0]
    low, high = window_bounds[:, 0].float(), window_bounds[:, 1].float()
    width = high - low
    shift = _uniform(n, -cfg.window_jitter, cfg.window_jitter, generator, device) * width
    scale = 1 + _uniform(n, -cfg.window_jitter, cfg.window_jitter, generator, device)
    low_j = low + shift - (scale - 1) * width / 2
    width_j = width * scale
    x = ((hu.float() - low_j[:, None, None]) / width_j[:, None, None]).clamp(0, 1).unsqueeze(1)
    if boxes is None:
        boxes = random_resized_boxes(n, cfg, generator, device)
    hflip = torch.rand(n, generator=generator, device=device) < cfg.hflip
    vflip = torch.rand(n, generator=generator, device=device) < cfg.vflip
    grid = F.affine_grid(_affine(boxes, hflip, vflip), [n, 1, cfg.size, cfg.size], align_corners=False)
    # Downsampling crops alias without a low-pass first; a mild blur matched to the zoom avoids it.
    zoom = min(hu.shape[-2:]) * float(boxes[:, 2:].mean()) / cfg.size
    if zoom > 1.5:
        x = _gaussian_blur(x, torch.full((n,), 0.5 * zoom, device=device))
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    contrast = 1 + _uniform(n, -cfg.contrast, cfg.contrast, generator, device)
    x = ((x - 0.5) * contrast[:, None, None, None] + 0.5).clamp(0, 1)
    gamma = torch.exp(_uniform(n, -cfg.gamma, cfg.gamma, generator, device))
    x = x.clamp_min(1e-6) ** gamma[:, None, None, None]
    blur = torch.rand(n, generator=generator, device=device) < cfg.blur_p
    if bool(blur.any()):
        sigma = _uniform(n, *cfg.blur_sigma, generator, device)
        x = torch.where(blur[:, None, None, None], _gaussian_blur(x, sigma), x)
    if cfg.noise_std:
        noise = torch.randn(x.shape, generator=generator, device=device) * cfg.noise_std
        x = (x + noise).clamp(0, 1)
    mean = torch.tensor(cfg.mean, device=device).view(1, -1, 1, 1)
    std = torch.tensor(cfg.std, device=device).view(1, -1, 1, 1)
    return (x.expand(-1, len(cfg.mean), -1, -1) - mean) / std
