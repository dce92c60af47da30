"""The FMCIB lesion patch: 50 mm cube around a seed, on a 1 mm grid, intensities (HU + 1024) / 3072.

The published recipe resamples the whole volume to 1 mm (linear interpolation, grid anchored at the
volume origin, size round(n * spacing), -1024 HU outside) and then crops [c - 25, c + 25) around the
seed's truncated grid index c. That costs seconds and gigabytes per seed on a 512x512 CT, so
`extract_lesion_patch` evaluates the same interpolator at the same grid points, but only at the
50^3 points of the patch, reading a small crop of the original volume: the voxels equal those of the
whole-volume recipe (`extract_lesion_patch_whole_volume`, kept as the reference) in milliseconds.

At the image border the patch stays centred on the seed: grid points outside the whole-volume 1 mm
grid (or beyond the image) are -1024 HU, i.e. 0 after normalisation. (FMCIB's public code instead pads
the cropped array symmetrically, which shifts the seed off centre near the border; the paper's
"patch centred on the seed" is what CLEAR does.)
"""

from __future__ import annotations

import numpy as np
import SimpleITK as sitk

from ..errors import CLEARInputError
from ..io.volume import CTVolume

OUTSIDE_HU = -1024.0
HU_OFFSET = 1024.0
HU_SCALE = 3072.0
# Input voxels read on each side of the patch beyond its physical extent, so that every patch point
# sees the same interpolation neighbours as in the whole volume.
_CROP_MARGIN_VOXELS = 2


def seed_to_lps(seed, coord: str = "LPS") -> np.ndarray:
    point = np.asarray(seed, dtype=np.float64).reshape(-1)
    if point.shape != (3,) or not np.all(np.isfinite(point)):
        raise ValueError(f"a seed is 3 finite coordinates in mm, got {seed!r}")
    coord = coord.upper()
    if coord == "RAS":
        return point * np.array([-1.0, -1.0, 1.0])
    if coord != "LPS":
        raise ValueError(f"coord must be 'LPS' or 'RAS', got {coord!r}")
    return point


def normalize_hu(hu: np.ndarray) -> np.ndarray:
    """FMCIB's intensity mapping, without clipping."""
    return ((hu + HU_OFFSET) / HU_SCALE).astype(np.float32)


def _grid(volume: CTVolume, spacing_mm: float) -> tuple[np.ndarray, np.ndarray]:
    """Size (x, y, z) of the whole-volume 1 mm grid, and a matrix from grid index to LPS offset."""
    size = np.rint(np.array(volume.shape[::-1]) * np.asarray(volume.spacing) / spacing_mm).astype(int)
    return size, volume.direction * spacing_mm


def _patch_start(volume: CTVolume, seed_lps: np.ndarray, size: int, spacing_mm: float) -> np.ndarray:
    """Grid index (x, y, z) of the patch's first voxel: truncated seed index minus half the size."""
    _, to_lps = _grid(volume, spacing_mm)
    continuous = np.linalg.solve(to_lps, seed_lps - volume.origin)
    return np.trunc(continuous).astype(int) - size // 2


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
    """LPS centre (mm) of the patch `extract_lesion_patch` takes at this seed. The seed lies in patch
    voxel 25 (of 0..49) at its fractional grid position, so the centre (between voxels 24 and 25) is
    0.5 to 1.5 voxels from the seed along each axis."""
    _, to_lps = _grid(volume, spacing_mm)
    start = _patch_start(volume, seed_to_lps(seed, coord), size, spacing_mm)
    return volume.origin + to_lps @ (start + (size - 1) / 2)


def extract_lesion_patch(
    volume: CTVolume, seed, coord: str = "LPS", size: int = 50, spacing_mm: float = 1.0
) -> np.ndarray:
    """The [z, y, x] float32 patch (size^3, axes in LPS index direction) centred on `seed`.

    `seed` is a physical point in mm, in LPS (files, DICOM) or RAS (Slicer) as `coord` says.
    """
    seed_lps = seed_to_lps(seed, coord)
    _check_seed_inside(volume, seed_lps, volume.meta.get("source"))
    grid_size, to_lps = _grid(volume, spacing_mm)
    start = _patch_start(volume, seed_lps, size, spacing_mm)
    # Physical corners of the patch, back to (fractional) original voxel indices, plus a margin.
    corners = np.array([[i, j, k] for i in (0, size - 1) for j in (0, size - 1) for k in (0, size - 1)]) + start
    corner_idx = volume.lps_to_index(volume.origin + corners @ to_lps.T)  # [8, (z, y, x)]
    lo = np.maximum(np.floor(corner_idx.min(0)).astype(int) - _CROP_MARGIN_VOXELS, 0)
    hi = np.minimum(np.ceil(corner_idx.max(0)).astype(int) + _CROP_MARGIN_VOXELS + 1, np.array(volume.shape))
    crop = sitk.GetImageFromArray(
        np.ascontiguousarray(volume.hu[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]], np.float32)
    )
    volume._set_sitk_geometry(crop, index_offset_zyx=lo)
    patch_origin = volume.origin + to_lps @ start
    patch = sitk.Resample(
        crop,
        [size] * 3,
        sitk.Transform(),
        sitk.sitkLinear,
        tuple(float(v) for v in patch_origin),
        (float(spacing_mm),) * 3,
        tuple(volume.direction.ravel()),
        OUTSIDE_HU,
        sitk.sitkFloat32,
    )
    hu = sitk.GetArrayFromImage(patch)  # [z, y, x]
    # Points beyond the whole-volume grid are padding in the reference recipe.
    axes = [np.arange(size) + start[a] for a in range(3)]  # x, y, z grid indices
    outside = [(ax < 0) | (ax >= grid_size[a]) for a, ax in enumerate(axes)]
    hu[outside[2], :, :] = OUTSIDE_HU
    hu[:, outside[1], :] = OUTSIDE_HU
    hu[:, :, outside[0]] = OUTSIDE_HU
    return normalize_hu(hu)


def extract_lesion_patch_whole_volume(
    volume: CTVolume, seed, coord: str = "LPS", size: int = 50, spacing_mm: float = 1.0
) -> np.ndarray:
    """Reference: the published recipe, resampling the whole volume first (slow; for tests and benchmarks)."""
    seed_lps = seed_to_lps(seed, coord)
    grid_size, _ = _grid(volume, spacing_mm)
    whole = sitk.Resample(
        volume.to_sitk(),
        [int(s) for s in grid_size],
        sitk.Transform(),
        sitk.sitkLinear,
        tuple(float(v) for v in volume.origin),
        (float(spacing_mm),) * 3,
        tuple(volume.direction.ravel()),
        OUTSIDE_HU,
        sitk.sitkFloat32,
    )
    grid = sitk.GetArrayViewFromImage(whole)  # [z, y, x]
    start = _patch_start(volume, seed_lps, size, spacing_mm)[::-1]  # z, y, x
    out = np.full((size,) * 3, OUTSIDE_HU, dtype=np.float32)
    src_lo = np.maximum(start, 0)
    src_hi = np.minimum(start + size, grid.shape)
    if np.all(src_hi > src_lo):
        dst_lo = src_lo - start
        dst_hi = dst_lo + (src_hi - src_lo)
        out[dst_lo[0] : dst_hi[0], dst_lo[1] : dst_hi[1], dst_lo[2] : dst_hi[2]] = grid[
            src_lo[0] : src_hi[0], src_lo[1] : src_hi[1], src_lo[2] : src_hi[2]
        ]
    return normalize_hu(out)
