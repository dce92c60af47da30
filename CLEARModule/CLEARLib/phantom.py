"""Deterministic synthetic CT phantoms: body, organs and spherical lesions of known HU at known LPS positions.

Used by the demo, the tests and the benchmarks; anatomy is defined in physical millimetres, so a
phantom means the same thing whatever its grid, and a lesion's LPS centre is ground truth.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .io.volume import CTVolume

AIR_HU = -1000
SOFT_TISSUE_HU = 40
LUNG_HU = -850
LIVER_HU = 60
BONE_HU = 700


@dataclass(frozen=True)
class Lesion:
    organ: str
    center_lps: tuple[float, float, float]
    radius_mm: float
    hu: int


def default_lesions(volume_center_lps, extent_mm) -> list[Lesion]:
    """A liver lesion and a lung nodule placed relative to the phantom's anatomy."""
    cx, cy, cz = volume_center_lps
    ex, ey, ez = extent_mm
    return [
        Lesion("liver", (cx - 0.18 * ex, cy - 0.02 * ey, cz - 0.22 * ez), max(0.035 * ex, 4.0), 120),
        Lesion("lung", (cx + 0.2 * ex, cy - 0.04 * ey, cz + 0.22 * ez), max(0.03 * ex, 3.0), 30),
    ]


def make_phantom(
    shape_zyx=(60, 96, 96),
    spacing_xyz=(3.0, 3.0, 5.0),
    origin_lps=None,
    lesions: list[Lesion] | None = None,
    noise_hu: float = 10.0,
    seed: int = 0,
) -> tuple[CTVolume, list[Lesion]]:
    """A canonical (identity-direction) CT phantom and the lesions it contains.

    Organs (mm, relative to the volume centre): elliptical body of soft tissue in air, two lungs in
    the superior half, a liver on the patient's right in the inferior half, a spine posteriorly,
    plus the given spherical lesions (default: `default_lesions`). Built slice by slice as int16.
    """
    nz, ny, nx = shape_zyx
    spacing = np.asarray(spacing_xyz, dtype=np.float64)
    extent = spacing * np.array([nx, ny, nz])
    if origin_lps is None:
        origin_lps = -extent / 2 + spacing / 2  # volume centred on LPS (0, 0, 0)
    origin = np.asarray(origin_lps, dtype=np.float64)
    center = origin + spacing * (np.array([nx, ny, nz]) - 1) / 2
    lesions = default_lesions(center, extent) if lesions is None else list(lesions)
    rng = np.random.default_rng(seed)
    x = origin[0] + spacing[0] * np.arange(nx) - center[0]
    y = origin[1] + spacing[1] * np.arange(ny) - center[1]
    X, Y = np.meshgrid(x, y, indexing="xy")  # [y, x]
    ax, ay = 0.42 * extent[0], 0.32 * extent[1]
    body = (X / ax) ** 2 + (Y / ay) ** 2 <= 1.0
    spine = ((X / (0.06 * extent[0])) ** 2 + ((Y - 0.2 * extent[1]) / (0.05 * extent[1])) ** 2) <= 1.0
    hu = np.empty((nz, ny, nx), dtype=np.int16)
    for k in range(nz):
        z = origin[2] + spacing[2] * k - center[2]
        s = np.full((ny, nx), AIR_HU, dtype=np.float32)
        s[body] = SOFT_TISSUE_HU
        if z > 0:  # chest: lungs either side of the midline
            for side in (-1, 1):
                lung = (
                    ((X - side * 0.17 * extent[0]) / (0.13 * extent[0])) ** 2
                    + ((Y + 0.02 * extent[1]) / (0.2 * extent[1])) ** 2
                    + ((z - 0.25 * extent[2]) / (0.3 * extent[2])) ** 2
                ) <= 1.0
                s[lung] = LUNG_HU
        else:  # abdomen: liver on the patient's right (negative L)
            liver = (
                ((X + 0.17 * extent[0]) / (0.16 * extent[0])) ** 2
                + ((Y + 0.02 * extent[1]) / (0.18 * extent[1])) ** 2
                + ((z + 0.22 * extent[2]) / (0.22 * extent[2])) ** 2
            ) <= 1.0
            s[liver] = LIVER_HU
        s[spine] = BONE_HU
        for lesion in lesions:
            lx, ly, lz = np.asarray(lesion.center_lps) - center
            r2 = lesion.radius_mm**2 - (z - lz) ** 2
            if r2 > 0:
                s[(X - lx) ** 2 + (Y - ly) ** 2 <= r2] = lesion.hu
        if noise_hu:
            s[body] += rng.normal(0.0, noise_hu, size=int(body.sum())).astype(np.float32)
        hu[k] = np.rint(s).astype(np.int16)
    volume = CTVolume(hu, tuple(float(v) for v in spacing), origin, np.eye(3), {"source": "phantom", "seed": seed})
    return volume, lesions
