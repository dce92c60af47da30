"""Feature extraction at scale: every case of a cohort through a bundle's frozen encoder, one HDF5 per case.

Each file holds `feats` [N, D] float16, `slice_index`, `window`, `z_mm`, and attributes naming the
encoder and its weights (sha256), the windows and the package version. Files are written to a
temporary name and renamed; cases already done (with the same encoder weights) are skipped; a case
that fails is reported and the run goes on. Under torchrun every rank takes every world_size-th case.

Cohort CSV (CLEARLib.io.cohort): `path`, optional `case_id` (default: the path relative to the folder all
paths share), `format` (image | dicom | deeplesion | radchest; default:
from the path) and `spacing_x, spacing_y, spacing_z` (for formats without geometry).
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import sys
from pathlib import Path

import h5py
import numpy as np

from CLEARLib import __version__ as clear_version
from CLEARLib.errors import CLEARInputError, CLEARRunError
from CLEARLib.files import check_writable, hdf5_writer, remove_stale_temporaries, write_json
from CLEARLib.io import CTVolume, read_ct
from CLEARLib.io.cohort import file_stem_for, read_cohort
from CLEARLib.io.deeplesion import read_deeplesion_study
from CLEARLib.io.radchest import RADCHEST_DEFAULT_SPACING, read_radchest
from CLEARLib.progress import report as report_progress
from CLEARLib.progress import scaled

log = logging.getLogger(__name__)


def _format_of(row) -> str:
    given = str(getattr(row, "format", "") or "")
    if given:
        return given
    path = str(row.path).lower()
    if path.endswith(".npz"):
        return "radchest"
    return "image"  # read_ct tells DICOM folders and files from NIfTI/NRRD/MHA itself


def read_case(row) -> CTVolume:
    fmt = _format_of(row)
    spacing = [getattr(row, f"spacing_{a}", None) for a in "xyz"]
    spacing = None if any(s is None or str(s).strip() == "" for s in spacing) else tuple(float(s) for s in spacing)
    if fmt in ("image", "dicom", "nifti", "nrrd"):
        return read_ct(row.path)
    if fmt == "deeplesion":
        if spacing is None:
            raise CLEARInputError("DeepLesion studies need spacing_x, spacing_y, spacing_z columns", row.path)
        return read_deeplesion_study(Path(row.path), spacing)
    if fmt == "radchest":
        return read_radchest(Path(row.path), spacing or RADCHEST_DEFAULT_SPACING)
    raise CLEARInputError(f"unknown cohort format {fmt!r}", row.path)


def feature_file(out_dir: Path, case_id: str) -> Path:
    return Path(out_dir) / f"{file_stem_for(case_id)}.h5"


def features_key(manifest) -> str:
    """What the features of a case depend on: the encoder's weights, the windows, the input spec and the
    CLEAR version. A feature file made with another key is extracted again, never reused."""
    key = {
        "weights": manifest.encoder.weights_sha256,
        "windows": [w.model_dump() for w in manifest.preprocessing.windows],
        "input": manifest.encoder.input.model_dump() if manifest.encoder.input else None,
        "clear_version": clear_version,
    }
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()


def is_done(path: Path, key: str, case_id: str) -> bool:
    """True when `path` holds this exact case's features made with this key."""
    if not path.exists():
        return False
    try:
        with h5py.File(path, "r") as f:
            return f.attrs.get("features_key") == key and f.attrs.get("case_id") == case_id and "feats" in f
    except OSError:
        return False


def write_features(path: Path, embeddings: np.ndarray, table: dict, attrs: dict) -> Path:
    with hdf5_writer(path) as f:
        f.create_dataset("feats", data=embeddings.astype(np.float16), compression="lzf")
        f.create_dataset("slice_index", data=np.asarray(table["slice_index"], dtype=np.int32))
        f.create_dataset("window", data=np.asarray(table["window"]).astype("S"))
        f.create_dataset("z_mm", data=np.asarray(table["z_mm"], dtype=np.float32))
        for key, value in attrs.items():
            f.attrs[key] = value
    return Path(path)


def read_features(path: str | os.PathLike, windows=None) -> dict:
    """feats (float16), slice_index, window, z_mm and attrs of one case, optionally some windows only."""
    with h5py.File(path, "r") as f:
        window = f["window"][:].astype(str)
        keep = np.ones(len(window), bool) if windows is None else np.isin(window, list(windows))
        return {
            "feats": f["feats"][:][keep],
            "slice_index": f["slice_index"][:][keep],
            "window": window[keep],
            "z_mm": f["z_mm"][:][keep],
            "attrs": dict(f.attrs),
        }


def extract(
    bundle,
    cohort_csv: str | os.PathLike,
    out_dir: str | os.PathLike,
    device: str = "auto",
    batch_size: int | None = None,
    rank: int | None = None,
    world_size: int | None = None,
    backend: str = "auto",
    precision: str = "fp32",
    progress=None,
) -> dict:
    """Extract every case of the cohort this rank owns; returns (and writes) this rank's report.
    `progress(fraction, message)` follows the cases and the instances within each."""
    from CLEARLib.inference import CasePredictor

    from .distributed import init_distributed

    if rank is None or world_size is None:
        info = init_distributed(device)
        rank, world_size, device = info.rank, info.world_size, info.device
    out_dir = check_writable(out_dir)  # before any case is encoded
    stale = remove_stale_temporaries(out_dir)
    if stale:
        log.info("removed %d temporary files of earlier, interrupted runs from %s", len(stale), out_dir)
    cohort = read_cohort(cohort_csv)
    predictor = CasePredictor(bundle, device=device, batch_size=batch_size, backend=backend, precision=precision)
    manifest = predictor.bundle.manifest
    sha = manifest.encoder.weights_sha256
    key = features_key(manifest)
    attrs = {
        "encoder": manifest.encoder.architecture,
        "encoder_weights_sha256": sha,
        "features_key": key,
        "bundle": manifest.name,
        "windows": json.dumps([w.model_dump() for w in manifest.preprocessing.windows]),
        "clear_version": clear_version,
    }
    report = {"rank": rank, "world_size": world_size, "done": [], "skipped": [], "failed": []}
    mine = cohort.iloc[rank::world_size]
    for i, row in enumerate(mine.itertuples()):
        target = feature_file(out_dir, row.case_id)
        case_progress = scaled(
            progress, i / len(mine), (i + 1) / len(mine), f"case {i + 1}/{len(mine)} {row.case_id}: "
        )
        if is_done(target, key, row.case_id):
            report["skipped"].append(row.case_id)
            report_progress(case_progress, 1.0, "done before")
            continue
        try:
            volume = read_case(row)
            embeddings, table = predictor.encode(volume, progress=case_progress)
            runtime = {"encoder_backend": predictor.runner.backend, "encoder_precision": precision}
            read = {k: v for k, v in volume.input_record().items() if k != "source"}  # DICOM: patient, series
            case = {"case_id": row.case_id, "source": str(row.path), **read}
            write_features(target, embeddings, table, {**attrs, **runtime, **case})
            report["done"].append(row.case_id)
        except OSError as exc:
            if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
                _case_failed(report, row, exc)
                continue
            report["failed"].append({"case_id": row.case_id, "path": str(row.path), "error": "no space left"})
            report["not_started"] = [str(c) for c in mine.case_id.iloc[i + 1 :]]
            _write_report(out_dir, rank, report)
            raise CLEARRunError(
                f"no space left on the device of {out_dir} while writing {row.case_id}: {len(report['done'])} "
                f"cases written this run and kept, {len(report['not_started'])} not started. Free space and run "
                "the same command again: finished cases are skipped"
            ) from exc
        except Exception as exc:  # report and carry on
            _case_failed(report, row, exc)
    _write_report(out_dir, rank, report)
    return report


def _case_failed(report: dict, row, exc: Exception) -> None:
    log.warning("%s: failed (%s)", row.case_id, exc)
    report["failed"].append({"case_id": row.case_id, "path": str(row.path), "error": str(exc)})


def _write_report(out_dir: Path, rank: int, report: dict) -> None:
    """The rank's report beside its features; where it cannot be written (a full disk), on stderr."""
    path = out_dir / f"extract-report-rank{rank}.json"
    try:
        write_json(path, report)
    except OSError as exc:
        print(f"cannot write {path} ({exc.strerror}); the report:\n{json.dumps(report, indent=2)}", file=sys.stderr)
