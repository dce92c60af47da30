"""The FMCIB lesion patch: 50 mm cube around a seed, on FMCIB's 1 mm grid, intensities (HU + 1024) / 3072.

FMCIB's preprocessing (fmcib 1.0.0) resamples the whole volume with MONAI's `Spacingd(pixdim=1,
diagonal=True, align_corners=True)`, reorients it with `Orientationd("LPS")` and crops
[c - 25, c + 25) around c, the truncated continuous index of the seed. That grid is axis-aligned in
LPS and anchored where MONAI puts it (`fmcib_grid`), not at the volume origin: for an ordinary axial
CT its L and P points are counted back from the last column and row. FMCIB's published weights were
trained on that grid, so CLEAR samples exactly its points.

Resampling the whole volume costs seconds and gigabytes per seed on a 512x512 CT, so
`extract_lesion_patch` evaluates linear interpolation only at the 50^3 grid points of the patch,
reading a small crop of the original volume (milliseconds). `fmcib_reference_patch` runs FMCIB's
recipe through MONAI's own transforms on the whole volume, as the reference for tests and benchmarks.

Borders: by default (`border="centred"`) the patch stays centred on the seed, and grid points outside
FMCIB's grid are -1024 HU (0 after normalisation), as the paper's "patch centred on the seed" says.
`border="fmcib"` reproduces FMCIB's code instead: the crop is clamped to the grid and the result padded
symmetrically to 50^3, which moves the seed off centre near the image border. Away from the border
the two are the same.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import SimpleITK as sitk

from ..errors import CLEARInputError
from ..io.volume import LPS_RAS, CTVolume, flip_lps_ras

OUTSIDE_HU = -1024.0
HU_OFFSET = 1024.0
HU_SCALE = 3072.0
# Input voxels read on each side of the patch beyond its physical extent, so that every patch point
# sees the same interpolation neighbours as in the whole volume.
_CROP_MARGIN_VOXELS = 2
_LPS_FROM_RAS = np.diag(LPS_RAS)
Border = Literal["centred", "fmcib"]


def seed_to_lps(seed, coord: str = "LPS") -> np.ndarray:
    point = np.asarray(seed, dtype=np.float64).reshape(-1)
    if point.shape != (3,) or not np.all(np.isfinite(point)):
        raise CLEARInputError(f"a seed is 3 finite coordinates in mm, got {seed!r}")
    coord = coord.upper()
    if coord == "RAS":
        return flip_lps_ras(point)
    if coord != "LPS":
        raise ValueError(f"coord must be 'LPS' or 'RAS', got {coord!r}")
    return point


def normalize_hu(hu: np.ndarray) -> np.ndarray:
    """FMCIB's intensity mapping, without clipping."""
    return ((hu + HU_OFFSET) / HU_SCALE).astype(np.float32)


def _affine_ras(volume: CTVolume) -> np.ndarray:
    """4x4 from (x, y, z) voxel index to RAS mm: the affine MONAI gives a volume read through ITK."""
    affine = np.eye(4)
    affine[:3, :3] = _LPS_FROM_RAS @ volume.direction @ np.diag(volume.spacing)
    affine[:3, 3] = _LPS_FROM_RAS @ volume.origin
    return affine


def fmcib_grid(volume: CTVolume, spacing_mm: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """FMCIB's resampling grid: (LPS position of its first point in mm, size in points (x, y, z)).

    The grid has identity direction in LPS and `spacing_mm` steps. MONAI's own shape-and-offset rule
    (the one `Spacingd(diagonal=True, align_corners=True)` applies) places it in RAS; `Orientationd("LPS")`
    then reverses the R and A axes, so the first point in L and P is the last one in R and A.
    """
    from monai.data.utils import compute_shape_offset  # MONAI decides the grid; CLEAR must not re-derive it

    size, offset_ras = compute_shape_offset(volume.shape[::-1], _affine_ras(volume), np.diag([spacing_mm] * 3 + [1.0]))
    last_ras = np.asarray(offset_ras, dtype=np.float64) + spacing_mm * (size - 1)
    first_lps = np.array([-last_ras[0], -last_ras[1], offset_ras[2]], dtype=np.float64)
    return first_lps, np.asarray(size, dtype=int)


def _patch_start(first_lps: np.ndarray, seed_lps: np.ndarray, size: int, spacing_mm: float) -> np.ndarray:
    """Grid index (x, y, z) of the patch's first point: the seed's index truncated toward zero, minus half."""
    return np.trunc((seed_lps - first_lps) / spacing_mm).astype(int) - size // 2


def _check_seed_inside(volume: CTVolume, seed_lps: np.ndarray, source) -> None:
    zyx = volume.lps_to_index(seed_lps)
    if np.any(zyx < -0.5) or np.any(zyx > np.array(volume.shape) - 0.5):
        first = volume.index_to_lps([0, 0, 0])
        last = volume.index_to_lps(np.array(volume.shape, dtype=float) - 1)
        raise CLEARInputError(
            f"seed LPS {np.round(seed_lps, 2).tolist()} mm lies outside the image "
            f"(voxel centres span {np.round(first, 1).tolist()} to {np.round(last, 1).tolist()} mm)",
            source,
        )


def lesion_patch_centre(volume: CTVolume, seed, coord: str = "LPS", size: int = 50, spacing_mm: float = 1.0):
    """LPS centre (mm) of the patch `extract_lesion_patch` takes at this seed (default border). The seed
    lies in patch voxel 25 (of 0..49) at its fractional grid position, so the centre (between voxels 24
    and 25) is 0.5 to 1.5 voxels from the seed along each axis."""
    first_lps, _ = fmcib_grid(volume, spacing_mm)
    start = _patch_start(first_lps, seed_to_lps(seed, coord), size, spacing_mm)
    return first_lps + spacing_mm * (start + (size - 1) / 2)


def extract_lesion_patch(
    volume: CTVolume,
    seed,
    coord: str = "LPS",
    size: int = 50,
    spacing_mm: float = 1.0,
    border: Border = "centred",
) -> np.ndarray:
    """The [z, y, x] float32 patch (size^3, axes along L, P, S) around `seed`, on FMCIB's grid.

    `seed` is a physical point in mm, in LPS (files, DICOM) or RAS (Slicer) as `coord` says.
    `border`: "centred" (default) keeps the seed in the middle and fills points beyond the grid with
    -1024 HU; "fmcib" clamps the crop to the grid and pads it symmetrically, as FMCIB's code does.
    """
    if border not in ("centred", "fmcib"):
        raise ValueError(f"border must be 'centred' or 'fmcib', got {border!r}")
    seed_lps = seed_to_lps(seed, coord)
    _check_seed_inside(volume, seed_lps, volume.meta.get("source"))
    first_lps, grid_size = fmcib_grid(volume, spacing_mm)
    start = _patch_start(first_lps, seed_lps, size, spacing_mm)
    stop = start + size
    if border == "fmcib":  # only the part of the crop inside the grid is sampled
        start, stop = np.maximum(start, 0), np.minimum(stop, grid_size)
    extent = stop - start  # (x, y, z) points to sample
    hu = _sample_grid(volume, first_lps + spacing_mm * start, extent, spacing_mm)
    if border == "centred":
        # Points beyond FMCIB's grid are padding in FMCIB's whole-volume recipe.
        axes = [np.arange(size) + start[a] for a in range(3)]  # x, y, z grid indices
        outside = [(ax < 0) | (ax >= grid_size[a]) for a, ax in enumerate(axes)]
        hu[outside[2], :, :] = OUTSIDE_HU
        hu[:, outside[1], :] = OUTSIDE_HU
        hu[:, :, outside[0]] = OUTSIDE_HU
        return normalize_hu(hu)
    # MONAI SpatialPad(method="symmetric"): floor(missing / 2) before, the rest after.
    missing = size - extent[::-1]  # z, y, x
    padded = np.full((size,) * 3, OUTSIDE_HU, dtype=np.float32)
    lo = missing // 2
    padded[lo[0] : lo[0] + hu.shape[0], lo[1] : lo[1] + hu.shape[1], lo[2] : lo[2] + hu.shape[2]] = hu
    return normalize_hu(padded)


def _sample_grid(volume: CTVolume, first_lps: np.ndarray, extent_xyz: np.ndarray, spacing_mm: float) -> np.ndarray:
    """Linear interpolation of the volume at an identity-direction LPS grid, reading only the crop it needs."""
    last_lps = first_lps + spacing_mm * (extent_xyz - 1)
    corners = np.array([[x, y, z] for x in (0, 1) for y in (0, 1) for z in (0, 1)], dtype=float)
    corner_idx = volume.lps_to_index(first_lps + corners * (last_lps - first_lps))  # [8, (z, y, x)]
    lo = np.maximum(np.floor(corner_idx.min(0)).astype(int) - _CROP_MARGIN_VOXELS, 0)
    hi = np.minimum(np.ceil(corner_idx.max(0)).astype(int) + _CROP_MARGIN_VOXELS + 1, np.array(volume.shape))
    hi = np.maximum(hi, lo + 1)  # a grid entirely outside still needs a (1-voxel) crop to resample from
    crop = sitk.GetImageFromArray(
        np.ascontiguousarray(volume.hu[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]], np.float32)
    )
    volume._set_sitk_geometry(crop, index_offset_zyx=lo)
    patch = sitk.Resample(
        crop,
        [int(n) for n in extent_xyz],
        sitk.Transform(),
        sitk.sitkLinear,
        tuple(float(v) for v in first_lps),
        (float(spacing_mm),) * 3,
        tuple(np.eye(3).ravel()),
        OUTSIDE_HU,
        sitk.sitkFloat32,
    )
    return sitk.GetArrayFromImage(patch)  # [z, y, x]


def fmcib_reference_patch(
    volume: CTVolume, seed, coord: str = "LPS", size: int = 50, spacing_mm: float = 1.0, border: Border = "fmcib"
) -> np.ndarray:
    """FMCIB's recipe through MONAI's own transforms on the whole volume (slow: for tests and benchmarks).

    ScaleIntensityRange (HU + 1024) / 3072 without clipping, `Spacingd(pixdim, mode="linear",
    padding_mode="zeros", align_corners=True, diagonal=True)`, `Orientationd("LPS")`, then the crop around
    the truncated seed index: clamped and padded symmetrically (border="fmcib", FMCIB's code) or kept
    centred with zeros beyond the grid (border="centred", CLEAR's default). Returns [z, y, x] like
    `extract_lesion_patch`. Needs nibabel (MONAI's orientation codes).
    """
    import torch
    from monai.data import MetaTensor
    from monai.transforms import Orientationd, ScaleIntensityRanged, Spacingd, SpatialPad

    seed_lps = seed_to_lps(seed, coord)
    image = MetaTensor(
        torch.from_numpy(np.ascontiguousarray(volume.hu.transpose(2, 1, 0), dtype=np.float32))[None],
        affine=torch.from_numpy(_affine_ras(volume)),
    )
    data = {"image": image}
    data = ScaleIntensityRanged("image", a_min=-HU_OFFSET, a_max=HU_SCALE - HU_OFFSET, b_min=0.0, b_max=1.0)(data)
    data = Spacingd("image", pixdim=spacing_mm, mode="linear", padding_mode="zeros", align_corners=True, diagonal=True)(
        data
    )
    # The labels MONAI has always used (RAS affines), given explicitly to stay the same across versions.
    labels = (("L", "R"), ("P", "A"), ("I", "S"))
    grid = Orientationd("image", axcodes="LPS", labels=labels)(data)["image"]
    seed_ras = np.append(_LPS_FROM_RAS @ seed_lps, 1.0)
    centre = [int(v) for v in (np.linalg.inv(grid.affine.numpy()) @ seed_ras)[:3]]
    array = grid[0].numpy()  # [x, y, z]
    half = size // 2
    if border == "fmcib":
        lo = [max(c - half, 0) for c in centre]
        hi = [min(c + half, n) for c, n in zip(centre, array.shape, strict=True)]
        crop = torch.from_numpy(array[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]].copy())[None]
        patch = SpatialPad(spatial_size=(size,) * 3, method="symmetric", value=0.0)(crop)[0].numpy()
    else:
        patch = np.zeros((size,) * 3, dtype=np.float32)
        src_lo = [max(c - half, 0) for c in centre]
        src_hi = [min(c - half + size, n) for c, n in zip(centre, array.shape, strict=True)]
        dst_lo = [a - (c - half) for a, c in zip(src_lo, centre, strict=True)]
        if all(h > lo for lo, h in zip(src_lo, src_hi, strict=True)):
            region = tuple(slice(a, b) for a, b in zip(src_lo, src_hi, strict=True))
            target = tuple(slice(d, d + b - a) for d, a, b in zip(dst_lo, src_lo, src_hi, strict=True))
            patch[target] = array[region]
    return np.ascontiguousarray(np.asarray(patch, dtype=np.float32).transpose(2, 1, 0))
