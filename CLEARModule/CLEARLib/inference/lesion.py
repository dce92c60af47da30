"""Lesion inference: seed -> FMCIB patch -> 3D ResNet50 features -> linear head; optional seed stability."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import numpy as np
import torch

from ..bundle import Bundle, load_bundle
from ..errors import CLEARInputError
from ..io import CTVolume, read_ct
from ..models import probabilities as to_probabilities
from ..preprocess import extract_lesion_patch, seed_to_lps
from ..progress import ProgressCallback, report
from .runtime import StageTimer, autocast, default_batch_size, resolve_device, run_batches

# The paper's inter-reader test: seeds drawn with a variance of 16 voxels (1 mm) per axis, i.e. sd 4 mm.
STABILITY_VARIANCE_VOXELS = 16.0


def feature_stability(reference: np.ndarray, drawn: np.ndarray) -> dict:
    """How much the features move when the seed does: cosine similarity of each perturbed seed's features
    to the clicked seed's (mean and minimum), and the coefficient of variation (sd / mean) of every
    feature over the perturbed seeds (`feature_cv`, NaN where a feature's mean is 0) with its median."""
    norms = np.linalg.norm(drawn, axis=1) * np.linalg.norm(reference)
    cosine = (drawn @ reference) / np.where(norms > 0, norms, 1.0)
    mean = drawn.mean(0)
    with np.errstate(divide="ignore", invalid="ignore"):
        cv = np.where(np.abs(mean) > 0, drawn.std(0) / np.abs(mean), np.nan)
    finite = np.isfinite(cv)
    return {
        "feature_cosine_mean": float(cosine.mean()),
        "feature_cosine_min": float(cosine.min()),
        "feature_cv_median": float(np.median(cv[finite])) if finite.any() else None,
        "feature_cv": cv.astype(np.float32),
    }


@dataclass
class LesionResult:
    seed_lps: np.ndarray
    features: np.ndarray  # [feature_dim]
    probabilities: dict[str, float]  # empty for feature-only bundles
    stability: dict | None = None  # n, sd_mm, mean, std per label, the drawn seeds and their probabilities
    timings: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict:
        out = {
            "seed_lps": [float(v) for v in self.seed_lps],
            "probabilities": self.probabilities,
            "feature_dim": int(self.features.shape[-1]),
            "timings_s": {k: round(v, 4) for k, v in self.timings.items()},
        }
        if self.stability is not None:
            arrays = ("seeds_lps", "feature_cv", "drawn_probabilities")
            out["stability"] = {k: v for k, v in self.stability.items() if k not in arrays}
        return out


class LesionPredictor:
    """Runs a lesion bundle at seed points. `border`: "centred" (default: the patch stays centred on the
    seed near the image border) or "fmcib" (FMCIB's clamp-then-pad crop); see `extract_lesion_patch`."""

    def __init__(
        self,
        bundle: Bundle | str | os.PathLike,
        device="auto",
        batch_size: int | None = None,
        border: str = "centred",
    ):
        self.device = resolve_device(device)
        self.bundle = bundle if isinstance(bundle, Bundle) else load_bundle(bundle)
        if self.bundle.kind != "lesion":
            raise CLEARInputError(f"a {self.bundle.kind} bundle cannot score lesion seeds", self.bundle.path)
        self.bundle.to(self.device)
        self.batch_size = batch_size or default_batch_size(self.device, per_item_mb=600.0, cpu_default=4)
        pre = self.bundle.manifest.preprocessing
        self.patch_size, self.spacing_mm = pre.patch_size, pre.spacing_mm
        if border not in ("centred", "fmcib"):
            raise CLEARInputError(f"border must be 'centred' or 'fmcib', got {border!r}")
        self.border = border

    def _features(self, volume, seeds_lps, timer, progress=None, cancel=None) -> np.ndarray:
        out = np.empty((len(seeds_lps), self.bundle.manifest.encoder.feature_dim), dtype=np.float32)

        def make_batch(start, stop):
            with timer("patch"):
                patches = [
                    extract_lesion_patch(volume, s, "LPS", self.patch_size, self.spacing_mm, self.border)
                    for s in seeds_lps[start:stop]
                ]
                return torch.from_numpy(np.stack(patches)[:, None]).to(self.device)

        def run_model(patches):
            with timer("encode"), torch.inference_mode(), autocast(self.device):
                return self.bundle.encoder(patches).float().cpu().numpy()

        for start, stop, output in run_batches(
            len(seeds_lps), self.batch_size, make_batch, run_model, progress, cancel, "lesion patch", self.device
        ):
            out[start:stop] = output
        return out

    def _probabilities(self, features: np.ndarray, timer) -> np.ndarray | None:
        if self.bundle.head is None:
            return None
        with timer("head"), torch.inference_mode():
            logits = self.bundle.head(torch.from_numpy(features).to(self.device))
            return to_probabilities(logits.float(), self.bundle.manifest.task).cpu().numpy()

    def predict(
        self,
        volume: CTVolume | str | os.PathLike,
        seed,
        coord: str = "LPS",
        stability: int = 0,
        random_state: int = 0,
        progress: ProgressCallback | None = None,
        cancel=None,
    ) -> LesionResult:
        """Features and probabilities at `seed` (mm, LPS or RAS); with stability=N also over N perturbed seeds."""
        timer = StageTimer(self.device)
        if not isinstance(volume, CTVolume):
            with timer("read"):
                volume = read_ct(volume)
        seed_lps = seed_to_lps(seed, coord)
        seeds = [seed_lps]
        if stability:
            seeds += list(self._perturbed_seeds(volume, seed_lps, int(stability), random_state))
        report(progress, 0.0, "extracting lesion patches")
        features = self._features(volume, seeds, timer, progress, cancel)
        probs = self._probabilities(features, timer)
        labels = self.bundle.labels
        result = LesionResult(
            seed_lps=seed_lps,
            features=features[0],
            probabilities={} if probs is None else {lab: float(p) for lab, p in zip(labels, probs[0], strict=True)},
        )
        if stability:
            result.stability = {
                "n": int(stability),
                "sd_mm": float(np.sqrt(STABILITY_VARIANCE_VOXELS) * self.spacing_mm),
                **feature_stability(features[0], features[1:]),
                "seeds_lps": np.asarray(seeds[1:]),
            }
            if probs is not None:
                drawn = probs[1:]
                result.stability["mean"] = {lab: float(v) for lab, v in zip(labels, drawn.mean(0), strict=True)}
                result.stability["std"] = {lab: float(v) for lab, v in zip(labels, drawn.std(0), strict=True)}
                result.stability["drawn_probabilities"] = drawn
        result.timings = timer.seconds
        return result

    def features(self, volume: CTVolume, seeds, coord: str = "LPS", progress=None, cancel=None) -> np.ndarray:
        """Features [n_seeds, feature_dim] at several seeds of one volume, in one batched pass."""
        seeds_lps = [seed_to_lps(s, coord) for s in seeds]
        return self._features(volume, seeds_lps, StageTimer(self.device), progress, cancel)

    def _perturbed_seeds(self, volume: CTVolume, seed_lps, n: int, random_state: int) -> np.ndarray:
        rng = np.random.default_rng(random_state)
        sd_mm = np.sqrt(STABILITY_VARIANCE_VOXELS) * self.spacing_mm
        drawn = seed_lps + rng.normal(0.0, sd_mm, size=(n, 3))
        # Keep drawn seeds inside the image (a seed near the edge would otherwise be refused).
        zyx = np.clip(volume.lps_to_index(drawn), 0, np.array(volume.shape) - 1)
        return volume.index_to_lps(zyx)


def seed_table_features(predictor: LesionPredictor, seeds, read=read_ct, progress=None):
    """FMCIB's get_features for a seed table (CLEARLib.io.read_seed_table): every image read once and its
    seeds encoded in one batched pass. An image that cannot be read, or a seed that cannot be used, is
    listed in `failed` (`row`: the data row of the table, from 1) and the others go on.

    Returns (the scored rows in table order, their features [n, D] aligned with them, failed)."""
    from pathlib import Path

    scored: dict[int, np.ndarray] = {}
    failed = []
    images = seeds.groupby("image_path", sort=False)
    for done, (image, rows) in enumerate(images, start=1):
        report(progress, (done - 1) / images.ngroups, Path(image).name)
        try:
            volume = read(image)
        except CLEARInputError as exc:
            failed += [{"row": int(i) + 1, "image_path": image, "error": str(exc)} for i in rows.index]
            continue
        points = rows[["coordX", "coordY", "coordZ"]].to_numpy(dtype=float)
        try:
            scored.update(zip(rows.index, predictor.features(volume, points, coord="LPS"), strict=True))
        except CLEARInputError:  # a seed the batch could not use: score the seeds one by one to find it
            for i, point in zip(rows.index, points, strict=True):
                try:
                    scored[i] = predictor.features(volume, [point], coord="LPS")[0]
                except CLEARInputError as exc:
                    failed.append({"row": int(i) + 1, "image_path": image, "error": str(exc)})
    report(progress, 1.0, f"{len(scored)} seeds scored")
    order = [i for i in seeds.index if i in scored]
    features = np.stack([scored[i] for i in order]) if order else np.zeros((0, 0), np.float32)
    return seeds.loc[order], features, failed
