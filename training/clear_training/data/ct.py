"""Generic CT (DICOM folders, NIfTI, NRRD) into the slice store, through the engine's reader.

Cohort CSV (CLEARLib.io.cohort): `path` (required), `case_id` and `patient_id` (optional; default: the
path relative to the folder all paths share). Optional key-slice table in DeepLesion style, as the Slicer
module exports it: `case_id`, `key_slice_index`, `x1`, `y1`, `x2`, `y2` (pixels of the canonical axial
slice), `lesion_type`.
"""

from __future__ import annotations

import logging
import os
from collections import defaultdict

import pandas as pd

from CLEARLib.errors import CLEARInputError
from CLEARLib.io import read_ct
from CLEARLib.io.cohort import read_cohort
from CLEARLib.io.deeplesion import lesion_type_code

from .store import SliceRecord, SliceStoreWriter

log = logging.getLogger(__name__)


def prepare_ct(
    cohort_csv: str | os.PathLike,
    out: str | os.PathLike,
    key_slices_csv: str | os.PathLike | None = None,
    size: int = 512,
    shard_slices: int = 1024,
) -> dict:
    cohort = read_cohort(cohort_csv)
    lesions = defaultdict(list)
    if key_slices_csv:
        keys = pd.read_csv(key_slices_csv, dtype={"case_id": str})
        for number, row in enumerate(keys.itertuples(), start=1):
            if any(pd.isna(v) for v in (row.x1, row.y1, row.x2, row.y2)):
                continue  # a key slice marked without a lesion box: nothing to centre a crop on
            column = "key_slice_index"
            try:
                index = int(row.key_slice_index)
                column = "lesion_type"
                lesion_type = lesion_type_code(getattr(row, "lesion_type", None))
            except (TypeError, ValueError) as exc:
                value = getattr(row, column, None)
                raise CLEARInputError(f"row {number}, column {column}: {value!r}: {exc}", key_slices_csv) from exc
            lesions[(row.case_id, index)].append(((row.x1, row.y1, row.x2, row.y2), lesion_type))
    writer = SliceStoreWriter(out, size=size, shard_slices=shard_slices, source=f"CT cohort {cohort_csv}")
    failures, used = [], 0
    for case in cohort.itertuples():
        try:
            volume = read_ct(case.path)
        except Exception as exc:  # report and carry on with the other cases
            failures.append({"case_id": case.case_id, "error": str(exc)})
            log.warning("%s: skipped (%s)", case.path, exc)
            continue
        z = volume.slice_positions_mm
        records = []
        for k in range(volume.shape[0]):
            found = lesions.get((case.case_id, k), [])
            records.append(
                SliceRecord(
                    case_id=case.case_id,
                    patient_id=case.patient_id,
                    slice_index=k,
                    z_mm=float(z[k]),
                    spacing=tuple(volume.spacing),
                    boxes=[b for b, _ in found],
                    lesion_types=[t for _, t in found],
                )
            )
        writer.add_case(volume.hu, records)
        used += 1
    writer.close()
    return {"cases": used, "failures": failures, "store": str(out)}
