"""`CTVolume`: Hounsfield units on a voxel grid with its physical (LPS) geometry.

Canonical orientation (every `CTVolume` that CLEAR makes is in it):
  * `hu` is indexed [z, y, x]: axial slice first;
  * index x grows towards the patient's Left, y towards Posterior, z towards Superior, so the
    direction matrix is the identity up to a residual tilt of at most `AXIAL_TOLERANCE_DEG`
    (kept exactly, never rounded away, so coordinates stay exact);
  * slice 0 is the most inferior slice; a slice shown with x to the right is in the radiological
    convention (patient right on the left of the image).
Other axis-aligned acquisitions (flipped, sagittal, coronal, feet-first) reach it by permuting and
flipping array axes only. Oblique acquisitions are rejected, or resampled when asked.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from os import PathLike

import numpy as np
import SimpleITK as sitk

from ..errors import CLEARInputError

log = logging.getLogger(__name__)

# A volume whose index axes are within this angle of the patient axes counts as axial; its exact
# direction is kept. Beyond it the acquisition is oblique and needs explicit resampling.
AXIAL_TOLERANCE_DEG = 1.0
AIR_HU = -1024.0
# Beyond every scanner's range, extended-scale metal included (about 30,000 HU); padding values such as
# -2048, -3024 or int16's minimum are inside.
PLAUSIBLE_HU = (-32768.0, 40000.0)
LPS_RAS = np.array([-1.0, -1.0, 1.0])  # LPS <-> RAS: x and y change sign, the same map both ways


def flip_lps_ras(points) -> np.ndarray:
    """Points (or one point) from LPS to RAS, or from RAS to LPS: the one coordinate flip of CLEAR."""
    return np.asarray(points, dtype=np.float64) * LPS_RAS


def _as_points(points, name: str) -> tuple[np.ndarray, bool]:
    arr = np.asarray(points, dtype=np.float64)
    single = arr.ndim == 1
    arr = np.atleast_2d(arr)
    if arr.ndim != 2 or arr.shape[1] != 3:
        raise ValueError(f"{name} must be 3 numbers or an array of shape (N, 3), got shape {np.shape(points)}")
    return arr, single


INPUT_KEYS = ("patient_id", "study_instance_uid", "series_instance_uid", "series_description", "series_choice")


@dataclass
class CTVolume:
    """A CT volume in CLEAR's canonical orientation (see the module docstring).

    hu: [z, y, x] array of Hounsfield units (int16 when the values are integers, else float32).
    spacing: (x, y, z) voxel size in mm.
    origin: LPS position in mm of the centre of voxel [0, 0, 0].
    direction: 3x3 matrix whose columns are the LPS directions of the x, y and z index axes.
    meta: where the volume came from (path, series, modality, choices made while reading).
    """

    hu: np.ndarray
    spacing: tuple[float, float, float]
    origin: np.ndarray
    direction: np.ndarray
    meta: dict = field(default_factory=dict)

    # ----------------------------------------------------------------------------- creation
    @classmethod
    def from_array(
        cls,
        hu: np.ndarray,
        spacing,
        origin,
        direction=None,
        meta: dict | None = None,
        resample_oblique: bool = False,
        source: str | PathLike | None = None,
    ) -> CTVolume:
        """Build a canonical volume from a [z, y, x] array and its LPS geometry.

        `direction` columns are the LPS directions of the array's x, y, z axes (ITK convention;
        identity when omitted). Axis-aligned inputs are permuted/flipped into canonical order;
        oblique inputs raise `CLEARInputError` unless `resample_oblique` is set.
        """
        hu = np.asarray(hu)
        if hu.ndim != 3:
            raise CLEARInputError(f"expected a 3D volume, got an array of shape {hu.shape}", source)
        if min(hu.shape) < 1:
            raise CLEARInputError(f"empty volume of shape {hu.shape}", source)
        if np.issubdtype(hu.dtype, np.floating):
            bad = int(hu.size - np.count_nonzero(np.isfinite(hu)))
            if bad:
                raise CLEARInputError(
                    f"{bad} of {hu.size} voxels are NaN or infinite; CLEAR does not guess their HU", source
                )
        if hu.dtype != np.int16:  # int16 cannot leave the range
            low, high = float(hu.min()), float(hu.max())
            if low < PLAUSIBLE_HU[0] or high > PLAUSIBLE_HU[1]:
                outside = int(np.count_nonzero((hu < PLAUSIBLE_HU[0]) | (hu > PLAUSIBLE_HU[1])))
                raise CLEARInputError(
                    f"{outside} voxels lie outside any CT's HU range {PLAUSIBLE_HU} (min {low:.4g}, max {high:.4g}); "
                    "check the RescaleSlope/Intercept or the file's scaling",
                    source,
                )
        spacing = np.asarray(spacing, dtype=np.float64).reshape(3)
        if not np.all(np.isfinite(spacing)) or np.any(spacing <= 0):
            raise CLEARInputError(f"voxel spacing must be positive, got {tuple(spacing)}", source)
        origin = np.asarray(origin, dtype=np.float64).reshape(3)
        direction = np.eye(3) if direction is None else np.asarray(direction, dtype=np.float64).reshape(3, 3)
        if abs(abs(np.linalg.det(direction)) - 1.0) > 1e-3 or not np.allclose(
            direction.T @ direction, np.eye(3), atol=1e-3
        ):
            raise CLEARInputError(f"direction matrix is not orthonormal: {direction.tolist()}", source)
        meta = dict(meta or {})
        if source is not None:
            meta.setdefault("source", str(source))
        return _canonicalize(_hu_dtype(hu), spacing, origin, direction, meta, resample_oblique, source)

    @classmethod
    def from_sitk(cls, image: sitk.Image, meta: dict | None = None, resample_oblique: bool = False, source=None):
        if image.GetDimension() != 3 or image.GetNumberOfComponentsPerPixel() != 1:
            raise CLEARInputError(
                f"expected a 3D scalar image, got {image.GetDimension()}D with "
                f"{image.GetNumberOfComponentsPerPixel()} component(s) per voxel",
                source,
            )
        return cls.from_array(
            sitk.GetArrayFromImage(image),
            image.GetSpacing(),
            image.GetOrigin(),
            np.array(image.GetDirection()).reshape(3, 3),
            meta=meta,
            resample_oblique=resample_oblique,
            source=source,
        )

    def to_sitk(self, dtype=np.float32) -> sitk.Image:
        image = sitk.GetImageFromArray(np.ascontiguousarray(self.hu, dtype=dtype))
        self._set_sitk_geometry(image)
        return image

    def _set_sitk_geometry(self, image: sitk.Image, index_offset_zyx=(0, 0, 0)) -> None:
        image.SetSpacing(tuple(float(s) for s in self.spacing))
        image.SetOrigin(tuple(self.index_to_lps(np.asarray(index_offset_zyx, dtype=float))))
        image.SetDirection(tuple(self.direction.ravel()))

    # ------------------------------------------------------------------------------ geometry
    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.hu.shape)

    @property
    def index_to_lps_matrix(self) -> np.ndarray:
        """4x4 matrix mapping homogeneous (x, y, z, 1) voxel indices to LPS mm."""
        m = np.eye(4)
        m[:3, :3] = self.direction * np.asarray(self.spacing)[None, :]
        m[:3, 3] = self.origin
        return m

    @property
    def ijk_to_ras_matrix(self) -> np.ndarray:
        """4x4 matrix mapping (i=x, j=y, k=z) indices to RAS mm, as Slicer's IJKToRAS."""
        return np.diag([*LPS_RAS, 1.0]) @ self.index_to_lps_matrix

    def index_to_lps(self, zyx) -> np.ndarray:
        """[z, y, x] voxel indices (fractional allowed; one per row) to LPS mm points."""
        idx, single = _as_points(zyx, "zyx")
        lps = self.origin + (idx[:, ::-1] * np.asarray(self.spacing)) @ self.direction.T
        return lps[0] if single else lps

    def lps_to_index(self, points) -> np.ndarray:
        """LPS mm points (one per row) to fractional [z, y, x] voxel indices."""
        pts, single = _as_points(points, "points")
        xyz = np.linalg.solve(self.index_to_lps_matrix[:3, :3], (pts - self.origin).T).T
        zyx = xyz[:, ::-1]
        return zyx[0] if single else zyx

    def index_to_ras(self, zyx) -> np.ndarray:
        return flip_lps_ras(self.index_to_lps(zyx))

    def ras_to_index(self, points) -> np.ndarray:
        pts, single = _as_points(points, "points")
        zyx = self.lps_to_index(flip_lps_ras(pts))
        return zyx[0] if single else zyx

    @property
    def slice_positions_mm(self) -> np.ndarray:
        """Superior (S) coordinate in mm of the centre of each axial slice, slice 0 first."""
        z = np.arange(self.shape[0], dtype=np.float64)
        centre = np.stack([z, np.full_like(z, (self.shape[1] - 1) / 2), np.full_like(z, (self.shape[2] - 1) / 2)], 1)
        return self.index_to_lps(centre)[:, 2]

    def hu_statistics(self) -> dict:
        # Computed slice by slice so that a large volume is never copied as float64.
        n = self.hu.size
        total = 0.0
        total_sq = 0.0
        for s in self.hu:
            s64 = s.astype(np.float64)
            total += float(s64.sum())
            total_sq += float(np.square(s64).sum())
        mean = total / n
        sample = self.hu[:, :: max(1, self.shape[1] // 128), :: max(1, self.shape[2] // 128)]
        p1, p50, p99 = np.percentile(sample, [1, 50, 99])
        return {
            "min": float(self.hu.min()),
            "max": float(self.hu.max()),
            "mean": mean,
            "std": float(np.sqrt(max(total_sq / n - mean * mean, 0.0))),
            "p1": float(p1),
            "median": float(p50),
            "p99": float(p99),
            "air_fraction": float(np.count_nonzero(self.hu < -900) / n),
        }

    def input_record(self) -> dict:
        """What was read, for result files: the source and, for DICOM, patient, study and series and why that
        series was chosen."""
        return {"source": self.meta.get("source"), **{k: self.meta[k] for k in INPUT_KEYS if k in self.meta}}

    def describe(self) -> dict:
        """Geometry and HU summary as plain data (what `clear-ct info` prints)."""
        lps_first = self.index_to_lps([0, 0, 0])
        lps_last = self.index_to_lps(np.array(self.shape, dtype=float) - 1)
        return {
            "source": self.meta.get("source"),
            "shape_zyx": list(self.shape),
            "dtype": str(self.hu.dtype),
            "spacing_xyz_mm": [float(s) for s in self.spacing],
            "origin_lps_mm": [float(v) for v in self.origin],
            "direction_lps": [[float(v) for v in row] for row in self.direction],
            "extent_lps_mm": [[float(a), float(b)] for a, b in zip(lps_first, lps_last, strict=True)],
            "slice_z_mm": [float(self.slice_positions_mm[0]), float(self.slice_positions_mm[-1])],
            "hu": self.hu_statistics(),
            "meta": {k: v for k, v in self.meta.items() if k != "source"},
        }


def _hu_dtype(hu: np.ndarray) -> np.ndarray:
    """int16 when the values are integers that fit, float32 otherwise (no float64 copies)."""
    if hu.dtype == np.int16 or hu.dtype == np.float32:
        return hu
    if np.issubdtype(hu.dtype, np.integer) or np.issubdtype(hu.dtype, np.bool_):
        lo, hi = (int(hu.min()), int(hu.max())) if hu.size else (0, 0)
        if lo >= np.iinfo(np.int16).min and hi <= np.iinfo(np.int16).max:
            return hu.astype(np.int16)
    return hu.astype(np.float32)


def _canonicalize(hu, spacing, origin, direction, meta, resample_oblique, source) -> CTVolume:
    # Array axes are [z, y, x]; direction columns and spacing are in (x, y, z) order.
    dominant = np.argmax(np.abs(direction), axis=0)  # patient axis (L, P, S) of each index axis
    if sorted(dominant.tolist()) != [0, 1, 2]:
        return _oblique(hu, spacing, origin, direction, meta, resample_oblique, source)
    perm_xyz = np.argsort(dominant)  # perm_xyz[a] = index axis that runs along patient axis a
    direction = direction[:, perm_xyz]
    spacing = spacing[perm_xyz]
    # New array axis for patient axis a (in z, y, x order) is old array axis 2 - perm_xyz[a].
    hu = np.transpose(hu, [2 - perm_xyz[2], 2 - perm_xyz[1], 2 - perm_xyz[0]])
    flips = []
    for a in range(3):
        if direction[a, a] < 0:
            n = hu.shape[2 - a]
            origin = origin + direction[:, a] * spacing[a] * (n - 1)
            direction[:, a] = -direction[:, a]
            hu = np.flip(hu, axis=2 - a)
            flips.append("LPS"[a])
    if _obliquity_deg(direction) > AXIAL_TOLERANCE_DEG:
        return _oblique(hu, spacing, origin, direction, meta, resample_oblique, source)
    if perm_xyz.tolist() != [0, 1, 2] or flips:
        meta["reoriented"] = {"index_axes_for_LPS": perm_xyz.tolist(), "flipped": flips}
    return CTVolume(np.ascontiguousarray(hu), tuple(float(s) for s in spacing), origin, direction, meta)


def _obliquity_deg(direction: np.ndarray) -> float:
    """Largest angle between an index axis and the patient axis nearest to it."""
    cosines = np.clip(np.abs(direction).max(axis=0), 0.0, 1.0)
    return float(np.degrees(np.arccos(cosines.min())))


def _oblique(hu, spacing, origin, direction, meta, resample_oblique, source) -> CTVolume:
    angle = _obliquity_deg(direction)
    if not resample_oblique:
        raise CLEARInputError(
            f"oblique acquisition: an image axis is {angle:.1f} degrees off the patient axes "
            f"(more than {AXIAL_TOLERANCE_DEG} degrees); axial slices would be mis-sliced. "
            "Pass resample_oblique=True (CLI: --resample-oblique) to resample it onto an axial grid.",
            source,
        )
    return _resample_axial(hu, spacing, origin, direction, meta, angle, source)


def _resample_axial(hu, spacing, origin, direction, meta, angle, source) -> CTVolume:
    """Linear resampling onto an identity-direction grid covering the whole oblique volume."""
    image = sitk.GetImageFromArray(np.ascontiguousarray(hu, dtype=np.float32))
    image.SetSpacing(tuple(float(s) for s in spacing))
    image.SetOrigin(tuple(float(v) for v in origin))
    image.SetDirection(tuple(direction.ravel()))
    size_xyz = np.array(image.GetSize())
    corners = np.array([[i, j, k] for i in (0, 1) for j in (0, 1) for k in (0, 1)]) * (size_xyz - 1)
    lps = origin + (corners * spacing) @ direction.T
    # Each patient axis gets the spacings of the index axes along it, weighted by alignment.
    out_spacing = np.abs(direction) @ spacing / np.abs(direction).sum(axis=1)
    lo, hi = lps.min(0), lps.max(0)
    size = np.floor((hi - lo) / out_spacing).astype(int) + 1
    resampled = sitk.Resample(
        image,
        [int(s) for s in size],
        sitk.Transform(),
        sitk.sitkLinear,
        tuple(float(v) for v in lo),
        tuple(float(s) for s in out_spacing),
        tuple(np.eye(3).ravel()),
        AIR_HU,
        sitk.sitkFloat32,
    )
    meta["resampled_from_oblique_deg"] = round(angle, 3)
    log.info("%s: oblique volume (%.1f deg) resampled onto an axial grid", source or "volume", angle)
    arr = sitk.GetArrayFromImage(resampled)
    return CTVolume(arr, tuple(float(s) for s in out_spacing), lo.astype(np.float64), np.eye(3), meta)
