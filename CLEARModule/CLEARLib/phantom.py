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
# make_ct_like_case's findings: radius ranges (mm), and how many per organ with a finding
LIVER_LESION_RADIUS_MM = (20.0, 35.0)
LUNG_NODULE_RADIUS_MM = (15.0, 25.0)
LESIONS_PER_ORGAN = (1, 2, 3)


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


def _ellipse(X, Y, cx, cy, ax, ay):
    return ((X - cx) / ax) ** 2 + ((Y - cy) / ay) ** 2 <= 1.0


def _paint_sphere(s, X, Y, z, centre, radius, value) -> None:
    """Paint the cross-section of a sphere with the plane at height z (X/Y: the slice's pixel grids, mm)."""
    r2 = radius**2 - (z - centre[2]) ** 2
    if r2 > 0:
        s[(X - centre[0]) ** 2 + (Y - centre[1]) ** 2 <= r2] = value


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
    body = _ellipse(X, Y, 0.0, 0.0, 0.42 * extent[0], 0.32 * extent[1])
    spine = _ellipse(X, Y, 0.0, 0.2 * extent[1], 0.06 * extent[0], 0.05 * extent[1])
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
            _paint_sphere(s, X, Y, z, np.asarray(lesion.center_lps) - center, lesion.radius_mm, lesion.hu)
        if noise_hu:
            s[body] += rng.normal(0.0, noise_hu, size=int(body.sum())).astype(np.float32)
        hu[k] = np.rint(s).astype(np.int16)
    volume = CTVolume(hu, tuple(float(v) for v in spacing), origin, np.eye(3), {"source": "phantom", "seed": seed})
    return volume, lesions


# ----------------------------------------------------------------------------- CT-like cohort cases
FAT_HU = -100
MUSCLE_HU = 45
BLOOD_HU = 40
VERTEBRA_HU = 300
CORTEX_HU = 800


def _profile(z, bottom, top):
    """Relative cross-section (0..1) of an organ spanning bottom..top in z: widest in the middle."""
    t = (2 * z - (top + bottom)) / (top - bottom)
    return np.sqrt(np.clip(1.0 - t * t, 0.0, 1.0))


@dataclass(frozen=True)
class _Tube:
    """A vessel: a straight segment whose radius tapers from start to end."""

    start: np.ndarray
    end: np.ndarray
    r0: float
    r1: float
    hu: float


@dataclass(frozen=True)
class _Organ:
    """An ellipsoid-like organ: an elliptical cross-section of semi-axes (ax, ay) scaled by _profile(z)."""

    cx: float
    cy: float
    ax: float
    ay: float
    bottom: float
    top: float

    def mask(self, X, Y, z, margin: float = 0.0):
        p = _profile(z, self.bottom, self.top)
        if p * min(self.ax, self.ay) <= margin:
            return np.zeros(X.shape, dtype=bool)
        return _ellipse(X, Y, self.cx, self.cy, self.ax * p - margin, self.ay * p - margin)

    def covers(self, point, grow: float = 0.0) -> bool:
        """Whether the organ's cross-section at the point's height, grown by `grow` mm, contains the point."""
        p = _profile(point[2], self.bottom, self.top)
        return bool(p > 0 and _ellipse(point[0], point[1], self.cx, self.cy, self.ax * p + grow, self.ay * p + grow))

    def sample_inside(self, rng, margin: float, z_range=(-np.inf, np.inf)) -> np.ndarray:
        """A uniformly drawn point at least `margin` mm inside the organ and inside z_range (rejection sampling)."""
        bottom, top = max(self.bottom, z_range[0]), min(self.top, z_range[1])
        for _ in range(10000):
            z = rng.uniform(bottom, top)
            x = rng.uniform(self.cx - self.ax, self.cx + self.ax)
            y = rng.uniform(self.cy - self.ay, self.cy + self.ay)
            if self.mask(np.array([[x]]), np.array([[y]]), z, margin)[0, 0]:
                return np.array([x, y, z])
        raise ValueError("organ too small for a lesion of that size")


def _draw_tube(s, X, Y, z, tube: _Tube, x0: float, y0: float, px: float):
    """Paint the cross-section of `tube` with the plane at height z (anatomical mm; X/Y pixel grids)."""
    d = tube.end - tube.start
    lo, hi = sorted((tube.start[2], tube.end[2]))
    rmax = max(tube.r0, tube.r1)
    if not (lo - rmax <= z <= hi + rmax):
        return
    # Only the pixels near the segment's span in this slice: distance to a 3D segment, vectorised.
    t_lo, t_hi = 0.0, 1.0
    if abs(d[2]) > 1e-6:
        t_a, t_b = sorted(((z - rmax - tube.start[2]) / d[2], (z + rmax - tube.start[2]) / d[2]))
        t_lo, t_hi = max(0.0, t_a), min(1.0, t_b)
    a, b = tube.start + t_lo * d, tube.start + t_hi * d
    xs = (min(a[0], b[0]) - rmax, max(a[0], b[0]) + rmax)
    ys = (min(a[1], b[1]) - rmax, max(a[1], b[1]) + rmax)
    i0, i1 = max(int((xs[0] - x0) / px), 0), min(int((xs[1] - x0) / px) + 2, X.shape[1])
    j0, j1 = max(int((ys[0] - y0) / px), 0), min(int((ys[1] - y0) / px) + 2, X.shape[0])
    if i0 >= i1 or j0 >= j1:
        return
    xx, yy = X[j0:j1, i0:i1], Y[j0:j1, i0:i1]
    rel = np.stack([xx - tube.start[0], yy - tube.start[1], np.full(xx.shape, z - tube.start[2])], -1)
    t = np.clip(rel @ d / float(d @ d), 0.0, 1.0)
    dist = np.linalg.norm(rel - t[..., None] * d, axis=-1)
    radius = tube.r0 + (tube.r1 - tube.r0) * t
    patch = s[j0:j1, i0:i1]
    patch[dist <= radius] = tube.hu


def make_ct_like_case(
    seed: int,
    lesion_organs: tuple[str, ...] = (),
    matrix: int = 96,
    slice_thickness_mm: float | None = None,
) -> tuple[CTVolume, list[Lesion]]:
    """A chest-abdomen CT-like phantom with anatomy, acquisition and findings drawn from `seed`.

    Varied per case: body size and fat, organ sizes and positions, contrast phase (non-contrast or
    portal venous), reconstruction field of view, slice thickness (2.5, 3 or 5 mm unless given),
    scan range and table position, noise level; always lung vessels, liver vessels and, in some cases,
    calcified granulomas in liver or lung and aortic wall calcifications (distractors). For each organ
    in `lesion_organs` ("liver", "lung") 1-3 lesions (LESIONS_PER_ORGAN) of drawn size, contrast and position inside
    that organ, centred at least half their radius clear of the organs painted over it. The whole field is
    blurred by the in-plane and slice-thickness point spread (partial volume) and given spatially correlated
    noise. The in-plane matrix is small (default 96, about 4 mm
    pixels) so that a cohort fits a laptop; slice spacing is a real scan's.
    """
    import SimpleITK as sitk

    rng = np.random.default_rng(seed)
    scale = rng.uniform(0.85, 1.15)
    body_ax, body_ay = 165 * scale * rng.uniform(0.92, 1.08), 115 * scale * rng.uniform(0.9, 1.1)
    fat = rng.uniform(8, 28) * scale
    bx, by = rng.uniform(-10, 10), rng.uniform(-8, 8)
    venous = rng.random() < 0.6
    liver_hu = rng.uniform(95, 115) if venous else rng.uniform(50, 65)
    vessel_hu = rng.uniform(150, 190) if venous else BLOOD_HU
    # z = 0 at the dome of the right diaphragm; the scan runs from the upper abdomen to the mid chest.
    lung_top = rng.uniform(160, 210)
    lungs = [
        _Organ(
            side * body_ax * rng.uniform(0.42, 0.5) + bx,
            by - 5,
            body_ax * rng.uniform(0.3, 0.36),
            body_ay * rng.uniform(0.55, 0.65),
            rng.uniform(-25, -5) + (8 if side > 0 else 0),
            lung_top,
        )
        for side in (-1, 1)
    ]
    heart = _Organ(bx + 25 * scale, by - 0.35 * body_ay, 55 * scale, 45 * scale, -10, rng.uniform(90, 120))
    liver = _Organ(
        bx - body_ax * rng.uniform(0.3, 0.4),
        by - 0.05 * body_ay,
        body_ax * rng.uniform(0.48, 0.58),
        body_ay * rng.uniform(0.62, 0.72),
        -rng.uniform(150, 190),
        rng.uniform(10, 25),
    )
    spleen = _Organ(bx + body_ax * 0.55, by + 0.25 * body_ay, 35 * scale, 45 * scale, -110, -15)
    kidneys = [
        _Organ(bx + side * 60 * scale, by + 0.42 * body_ay, 28 * scale, 35 * scale, -190, -90) for side in (-1, 1)
    ]
    spine_y = by + body_ay - fat - 45 * scale
    aorta = (bx + 18 * scale, spine_y - 35 * scale, 12 * scale)

    thickness = slice_thickness_mm or float(rng.choice([2.5, 3.0, 5.0], p=[0.3, 0.3, 0.4]))
    z_lo, z_hi = -rng.uniform(120, 165), rng.uniform(110, 160)
    nz = int(round((z_hi - z_lo) / thickness))
    fov = rng.uniform(340, 420)
    px = fov / matrix
    coords = (np.arange(matrix) + 0.5) * px - fov / 2
    X, Y = np.meshgrid(coords, coords, indexing="xy")
    x0, y0 = coords[0], coords[0]

    tubes = []
    for lung in lungs:  # pulmonary vessels fan out from the hilum
        hilum = np.array([lung.cx - np.sign(lung.cx) * 0.55 * lung.ax, lung.cy, 70.0])
        for _ in range(int(rng.integers(6, 11))):
            end = lung.sample_inside(rng, 4.0)
            tubes.append(_Tube(hilum, end, rng.uniform(1.5, 2.5), rng.uniform(0.5, 0.8), vessel_hu))
    porta = np.array([liver.cx + 0.3 * liver.ax, liver.cy + 0.1 * liver.ay, -60.0])
    for _ in range(int(rng.integers(6, 10))):
        end = liver.sample_inside(rng, 6.0)
        tubes.append(_Tube(porta, end, rng.uniform(4.0, 6.0), rng.uniform(1.5, 2.5), vessel_hu))

    spheres = []  # (centre, radius, hu): calcifications (distractors) and lesions
    if rng.random() < 0.35:
        spheres.append((liver.sample_inside(rng, 4.0), rng.uniform(1.5, 3.0), rng.uniform(400, 900)))
    if rng.random() < 0.35:
        spheres.append(
            (lungs[int(rng.integers(2))].sample_inside(rng, 4.0), rng.uniform(1.5, 3.0), rng.uniform(300, 700))
        )
    for _ in range(int(rng.integers(0, 4))):  # aortic wall calcifications
        angle = rng.uniform(0, 2 * np.pi)
        centre = (aorta[0] + aorta[2] * np.cos(angle), aorta[1] + aorta[2] * np.sin(angle), rng.uniform(z_lo, z_hi))
        spheres.append((np.array(centre), rng.uniform(1.5, 2.5), rng.uniform(500, 900)))
    lesions_anat = []
    # A slice is painted lungs, heart, liver, spleen, kidneys in that order: a lesion whose centre lies under a later
    # organ is painted into that organ instead of its own (a "nodule" inside the heart, where it has the heart's HU).
    painted_over = {"lung": [heart, liver, spleen, *kidneys], "liver": [spleen, *kidneys]}
    for organ in lesion_organs:
        for _ in range(int(rng.choice(LESIONS_PER_ORGAN, p=[0.4, 0.35, 0.25]))):
            if organ == "liver":
                r = rng.uniform(*LIVER_LESION_RADIUS_MM)
                delta = -rng.uniform(60, 100) if rng.random() < 0.8 else rng.uniform(70, 110)
                hu_value, shape, margin = liver_hu + delta, liver, r + 3
            elif organ == "lung":
                r = rng.uniform(*LUNG_NODULE_RADIUS_MM)
                hu_value, shape, margin = rng.uniform(-60, 50), lungs[int(rng.integers(2))], r + 2
            else:
                raise ValueError(f"no lesions in {organ!r}; use 'liver' or 'lung'")
            for _ in range(200):  # lesions do not overlap: each one's truth (centre, size, HU) stays visible
                centre = shape.sample_inside(rng, margin, (z_lo + r, z_hi - r))
                # and at least about 80% of its central cross-section lies in its own organ
                hidden = any(other.covers(centre, r / 2) for other in painted_over[organ])
                if not hidden and all(np.linalg.norm(centre - c) > r + d + 2 for _, c, d, _ in lesions_anat):
                    break
            else:
                continue  # no room left in the organ: one lesion fewer
            lesions_anat.append((organ, centre, r, hu_value))
            spheres.append((centre, r, hu_value))

    hu = np.empty((nz, matrix, matrix), dtype=np.float32)
    for k in range(nz):
        z = z_lo + (k + 0.5) * thickness
        s = np.full((matrix, matrix), AIR_HU, dtype=np.float32)
        s[_ellipse(X, Y, bx, by, body_ax, body_ay)] = FAT_HU
        s[_ellipse(X, Y, bx, by, body_ax - fat, body_ay - fat)] = MUSCLE_HU
        for lung in lungs:
            s[lung.mask(X, Y, z)] = LUNG_HU
        s[heart.mask(X, Y, z)] = vessel_hu if venous and z > 30 else BLOOD_HU
        s[liver.mask(X, Y, z)] = liver_hu
        s[spleen.mask(X, Y, z)] = liver_hu - 5
        for kidney in kidneys:
            s[kidney.mask(X, Y, z)] = 160 if venous else 30
        s[_ellipse(X, Y, bx, spine_y, 20 * scale, 17 * scale)] = CORTEX_HU
        s[_ellipse(X, Y, bx, spine_y, 16 * scale, 13 * scale)] = VERTEBRA_HU
        s[_ellipse(X, Y, aorta[0], aorta[1], aorta[2], aorta[2])] = vessel_hu
        for tube in tubes:
            _draw_tube(s, X, Y, z, tube, x0, y0, px)
        for centre, r, value in spheres:
            _paint_sphere(s, X, Y, z, centre, r, value)
        hu[k] = s

    # Partial volume: the scanner's in-plane point spread and the slice profile; then correlated noise.
    image = sitk.GetImageFromArray(hu)
    image.SetSpacing((px, px, thickness))
    image = sitk.SmoothingRecursiveGaussian(image, [0.6 * px, 0.6 * px, 0.35 * thickness])
    noise = sitk.GetImageFromArray(rng.normal(0.0, 1.0, hu.shape).astype(np.float32))
    noise.SetSpacing((px, px, thickness))
    noise = sitk.GetArrayFromImage(sitk.SmoothingRecursiveGaussian(noise, [0.5 * px, 0.5 * px, 0.1]))
    noise *= rng.uniform(6, 16) / max(float(noise.std()), 1e-6)
    array = sitk.GetArrayFromImage(image) + noise
    # Scanner (table) coordinates: the dome of the diaphragm sits at a drawn height of the couch.
    table_z = rng.uniform(-700, -400)
    origin = np.array([x0, y0, table_z + z_lo + thickness / 2])
    volume = CTVolume(
        np.clip(np.rint(array), -1024, 3071).astype(np.int16),
        (px, px, thickness),
        origin,
        np.eye(3),
        {"source": "ct-like phantom", "seed": seed},
    )
    shift = np.array([0.0, 0.0, table_z])
    lesions = [Lesion(o, tuple(float(v) for v in c + shift), float(r), int(round(h))) for o, c, r, h in lesions_anat]
    return volume, lesions
