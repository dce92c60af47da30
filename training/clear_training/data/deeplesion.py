"""DeepLesion (and DeepLesion-style key-slice tables) into the slice store, with patient-level splits.

DeepLesion facts: `DL_info.csv` has one row per lesion; `File_name` is `{patient}_{study}_{series}_{slice}.png`;
slices are 16-bit PNGs under `Images_png/{patient}_{study}_{series}/{slice:03d}.png` with
HU = value - 32768; `Bounding_boxes` are x1, y1, x2, y2 in pixels of the key slice;
`Spacing_mm_px_` is x, y, z spacing; `Coarse_lesion_type` as CLEARLib.io.deeplesion.LESION_TYPES.
"""

from __future__ import annotations

import logging
import os
from collections import defaultdict
from pathlib import Path

import numpy as np
import pandas as pd

from CLEARLib.errors import CLEARInputError
from CLEARLib.io.deeplesion import read_deeplesion_slices

from .store import SliceRecord, SliceStoreWriter

log = logging.getLogger(__name__)


def _floats(text, n: int, what: str) -> tuple[float, ...]:
    values = tuple(float(v) for v in str(text).split(","))
    if len(values) != n:
        raise ValueError(f"{what} needs {n} numbers, got {text!r}")
    return values


def read_dl_info(root: str | os.PathLike) -> pd.DataFrame:
    """DL_info.csv as a frame with parsed folder, slice, box, spacing and lesion type columns."""
    path = Path(root) / "DL_info.csv"
    if not path.exists():
        raise CLEARInputError("DeepLesion's DL_info.csv not found", path)
    info = pd.read_csv(path)
    missing = {"File_name", "Patient_index", "Bounding_boxes", "Spacing_mm_px_", "Coarse_lesion_type"} - set(info)
    if missing:
        raise CLEARInputError(f"missing columns {sorted(missing)}", path)
    stem = info.File_name.str.rsplit(".", n=1).str[0]
    info["folder"] = stem.str.rsplit("_", n=1).str[0]
    info["slice"] = stem.str.rsplit("_", n=1).str[1].astype(int)
    info["patient_id"] = info.Patient_index.map(lambda v: f"{int(v):06d}")
    info["box"] = [_floats(b, 4, "Bounding_boxes") for b in info.Bounding_boxes]
    info["spacing"] = [_floats(s, 3, "Spacing_mm_px_") for s in info.Spacing_mm_px_]
    return info


def patient_splits(info: pd.DataFrame, patients: list[str], test_fraction: float, seed: int) -> pd.DataFrame:
    """Test patients drawn among patients with labelled lesions (as the paper's 20%); the rest pretrain."""
    labelled = sorted(set(info.loc[info.Coarse_lesion_type > 0, "patient_id"]))
    rng = np.random.default_rng(seed)
    n_test = int(round(test_fraction * len(labelled)))
    test = set(rng.choice(labelled, size=n_test, replace=False).tolist()) if n_test else set()
    return pd.DataFrame({"patient_id": patients, "split": ["test" if p in test else "pretrain" for p in patients]})


def prepare_deeplesion(
    root: str | os.PathLike,
    out: str | os.PathLike,
    size: int = 512,
    test_fraction: float = 0.2,
    seed: int = 0,
    splits_file: str | os.PathLike | None = None,
    shard_slices: int = 1024,
) -> dict:
    """Convert DeepLesion into a slice store of the pretraining patients; write splits.csv beside it.

    Returns a summary with the numbers of slices, key slices, folders, patients, and failures.
    """
    root, out = Path(root), Path(out)
    info = read_dl_info(root)
    images = root / "Images_png"
    folders = sorted(p for p in images.iterdir() if p.is_dir()) if images.is_dir() else []
    if not folders:
        raise CLEARInputError("no image folders", images)
    patients = sorted({f.name.split("_")[0] for f in folders} | set(info.patient_id))
    if splits_file:
        splits = pd.read_csv(splits_file, dtype={"patient_id": str})
    else:
        splits = patient_splits(info, patients, test_fraction, seed)
    out.mkdir(parents=True, exist_ok=True)
    splits.to_csv(out.parent / f"{out.name}-splits.csv", index=False)
    test_patients = set(splits.loc[splits.split == "test", "patient_id"])
    lesions = defaultdict(list)
    spacing_of = {}
    for row in info.itertuples():
        lesions[(row.folder, row.slice)].append((row.box, int(row.Coarse_lesion_type)))
        spacing_of[row.folder] = row.spacing
    writer = SliceStoreWriter(out, size=size, shard_slices=shard_slices, source=f"DeepLesion {root}")
    failures, used = [], 0
    for folder in folders:
        patient = folder.name.split("_")[0]
        if patient in test_patients:
            continue
        try:
            hu, slice_numbers = read_deeplesion_slices(folder)
        except Exception as exc:  # report and carry on with the other folders
            failures.append({"folder": folder.name, "error": str(exc)})
            log.warning("%s: skipped (%s)", folder, exc)
            continue
        spacing = spacing_of.get(folder.name, (float("nan"),) * 3)
        records = []
        for index in slice_numbers:
            found = lesions.get((folder.name, index), [])
            records.append(
                SliceRecord(
                    case_id=folder.name,
                    patient_id=patient,
                    slice_index=index,
                    z_mm=index * spacing[2],
                    spacing=spacing,
                    boxes=[b for b, _ in found],
                    lesion_types=[t for _, t in found],
                )
            )
        writer.add_case(hu, records)
        used += 1
    writer.close()
    summary = {
        "folders": used,
        "test_patients_excluded": len(test_patients),
        "failures": failures,
        "store": str(out),
        "splits": str(out.parent / f"{out.name}-splits.csv"),
    }
    return summary
