"""Seed tables: image_path, coordX, coordY, coordZ (LPS mm, as FMCIB's users write them) [, more columns]."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd

from ..errors import CLEARInputError

SEED_COLUMNS = ("image_path", "coordX", "coordY", "coordZ")


def read_seed_table(path: str | os.PathLike) -> pd.DataFrame:
    """The table with image paths resolved against its folder and coordinates checked to be finite numbers.

    Errors name the file, and the row (1 = first data row) and column of a bad value.
    """
    path = Path(path)
    try:
        seeds = pd.read_csv(path)
    except (OSError, pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise CLEARInputError(f"cannot read the seed table: {exc}", path) from exc
    missing = [c for c in SEED_COLUMNS if c not in seeds.columns]
    if missing:
        raise CLEARInputError(f"the seed table needs the columns {', '.join(missing)} (LPS mm)", path)
    if seeds.empty:
        raise CLEARInputError("the seed table has no rows", path)
    for column in SEED_COLUMNS[1:]:
        values = pd.to_numeric(seeds[column], errors="coerce")
        bad = np.flatnonzero(~np.isfinite(values.to_numpy(dtype=float)))
        if len(bad):
            row = int(bad[0])
            raise CLEARInputError(
                f"row {row + 1}, column {column}: {seeds[column].iloc[row]!r} is not a finite number of mm", path
            )
        seeds[column] = values.astype(float)
    blank = np.flatnonzero(seeds.image_path.isna().to_numpy() | (seeds.image_path.astype(str).str.strip() == ""))
    if len(blank):
        raise CLEARInputError(f"row {int(blank[0]) + 1}, column image_path: empty", path)
    base = path.parent
    seeds["image_path"] = [str(p if Path(p).is_absolute() else base / p) for p in seeds.image_path.astype(str)]
    return seeds.reset_index(drop=True)
