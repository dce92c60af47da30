"""RAD-ChestCT volumes: `.npz` files of [z, y, x] HU, distributed resampled to 0.8 mm isotropic."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..errors import CLEARInputError
from .volume import CTVolume

RADCHEST_DEFAULT_SPACING = (0.8, 0.8, 0.8)


def read_radchest(path: str | Path, spacing=RADCHEST_DEFAULT_SPACING) -> CTVolume:
    """A RAD-ChestCT `.npz` volume (key `ct`, or the only array in the file)."""
    with np.load(path) as data:
        key = "ct" if "ct" in data.files else (data.files[0] if len(data.files) == 1 else None)
        if key is None:
            raise CLEARInputError(f"expected an array named 'ct', found {data.files}", path)
        hu = data[key]
    return CTVolume.from_array(hu, spacing, (0.0, 0.0, 0.0), meta={"source": str(path), "format": "radchest"})
