"""Cohorts: the one cohort-table schema and reader, and the one rule for naming cases.

A cohort table is a CSV with a `path` column (DICOM folder or image file, relative to the table's folder or
absolute) and optionally `case_id`, `patient_id` and reader hints (`format`, `spacing_x/y/z`). Cases without
a `case_id` are named by `case_names`, patients default to their case.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path, PurePath

from ..errors import CLEARInputError
from . import IMAGE_SUFFIXES

# What a case name drops: the image formats read_ct knows, single DICOM files and RAD-ChestCT's .npz;
# longest first, so that "ct.nii.gz" loses ".nii.gz", not ".gz".
_NAME_SUFFIXES = tuple(sorted({*IMAGE_SUFFIXES, ".dcm", ".npz"}, key=len, reverse=True))


def _without_image_suffix(name: str) -> str:
    lower = name.lower()
    for suffix in _NAME_SUFFIXES:
        if lower.endswith(suffix) and len(name) > len(suffix):
            return name[: -len(suffix)]
    return name


def case_names(sources) -> list[str]:
    """Unique, meaningful names for CT paths: each path relative to the folder all of them share, without
    its image suffix ("LUNG1-001/image" and "CRLM-CT-1004/image", not "image" twice). A name given twice
    gets "#2", "#3"... in order."""
    paths = [PurePath(os.path.abspath(os.fspath(s))) for s in sources]
    if not paths:
        return []
    root = PurePath(os.path.commonpath([str(p) for p in paths])) if len(paths) > 1 else paths[0].parent
    names = []
    for path in paths:
        relative = path.relative_to(root) if path != root else PurePath(path.name)
        parts = list(relative.parts) or [path.name]
        parts[-1] = _without_image_suffix(parts[-1])
        names.append("/".join(parts))
    return unique_names(names)


def unique_names(names) -> list[str]:
    """`names` with repeats made unique by "#2", "#3"... (first occurrence unchanged)."""
    seen: dict[str, int] = {}
    out = []
    for name in names:
        seen[name] = seen.get(name, 0) + 1
        out.append(name if seen[name] == 1 else f"{name}#{seen[name]}")
    return out


def file_stem_for(case_id: str) -> str:
    """A file name for a case ID that never collides: IDs that only differ in characters a file name cannot
    hold ("LUNG1/001" and "LUNG1_001") get their own names through a short hash of the exact ID."""
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in case_id).lstrip(".") or "_"
    if safe == case_id:
        return safe
    return f"{safe}-{hashlib.sha256(case_id.encode()).hexdigest()[:8]}"


def read_cohort(path: str | os.PathLike):
    """The cohort table at `path`, with `path` made absolute and `case_id`, `patient_id` filled in."""
    import pandas as pd

    try:
        cohort = pd.read_csv(path, dtype=str, keep_default_na=False)
    except (OSError, pd.errors.ParserError, pd.errors.EmptyDataError) as exc:
        raise CLEARInputError(f"cannot read the cohort table: {exc}", path) from exc
    if "path" not in cohort:
        raise CLEARInputError(f"a cohort table needs a 'path' column; it has {list(cohort.columns)}", path)
    empty = [i + 2 for i, p in enumerate(cohort.path) if not p.strip()]
    if empty:
        raise CLEARInputError(f"empty path in line(s) {empty}", path)
    base = Path(path).parent
    cohort["path"] = [str(p if Path(p).is_absolute() else base / p) for p in cohort.path]
    given = cohort["case_id"] if "case_id" in cohort else [""] * len(cohort)
    cohort["case_id"] = [c or n for c, n in zip(given, case_names(cohort.path), strict=True)]
    given = cohort["patient_id"] if "patient_id" in cohort else [""] * len(cohort)
    cohort["patient_id"] = [p or c for p, c in zip(given, cohort.case_id, strict=True)]
    if cohort.case_id.duplicated().any():
        duplicated = sorted(set(cohort.case_id[cohort.case_id.duplicated()]))
        raise CLEARInputError(f"case_id values must be unique: {duplicated}", path)
    return cohort
