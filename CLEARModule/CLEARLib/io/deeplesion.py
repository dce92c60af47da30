"""DeepLesion's own formats: its coarse lesion types, and studies stored as 16-bit PNG slices.

DeepLesion stores each slice as a 16-bit PNG with HU = value - 32768, one folder per series
(`Images_png/{patient}_{study}_{series}/{slice:03d}.png`); the slice number is the z index and the
spacing comes from `DL_info.csv`. `Coarse_lesion_type` 1..8 are the types below (-1 = unlabelled).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..errors import CLEARInputError
from .volume import CTVolume

HU_OFFSET = 32768
LESION_TYPES = {
    1: "bone",
    2: "abdomen",
    3: "mediastinum",
    4: "liver",
    5: "lung",
    6: "kidney",
    7: "soft tissue",
    8: "pelvis",
}


def lesion_type_code(value) -> int:
    """A lesion type given as DeepLesion's code (1..8, -1 = unlabelled) or by name ("lung", "soft tissue",
    "soft_tissue"; any case); blank means unlabelled. ValueError says what is accepted."""
    if value is None or (isinstance(value, float) and value != value) or str(value).strip() == "":
        return -1
    text = str(value).strip()
    try:
        code = int(float(text))
    except ValueError:
        names = {name.replace(" ", "_"): code for code, name in LESION_TYPES.items()} | {"unlabelled": -1}
        key = text.lower().replace(" ", "_")
        if key not in names:
            raise ValueError(f"{text!r} is not a lesion type; use -1..8 or one of {', '.join(names)}") from None
        return names[key]
    if code != -1 and code not in LESION_TYPES:
        raise ValueError(f"{code} is not a DeepLesion lesion code (1..8, -1 = unlabelled)")
    return code


def read_png_hu(path: Path) -> np.ndarray:
    """One DeepLesion slice in HU (int16)."""
    from PIL import Image

    with Image.open(path) as image:
        values = np.asarray(image)
    if values.dtype != np.uint16 and image.mode not in ("I;16", "I"):
        raise CLEARInputError(f"expected a 16-bit PNG, got mode {image.mode}", path)
    return (values.astype(np.int32) - HU_OFFSET).astype(np.int16)


def read_deeplesion_slices(folder: str | Path) -> tuple[np.ndarray, list[int]]:
    """The HU slices [n, H, W] of a DeepLesion series folder, in slice order, with their slice numbers."""
    files = sorted(Path(folder).glob("*.png"), key=lambda p: int(p.stem))
    if not files:
        raise CLEARInputError("no PNG slices", folder)
    return np.stack([read_png_hu(p) for p in files]), [int(p.stem) for p in files]


def read_deeplesion_study(folder: str | Path, spacing) -> CTVolume:
    """A DeepLesion series folder of PNG slices as a volume; slice number = z index, spacing (x, y, z) mm."""
    hu, _ = read_deeplesion_slices(folder)
    return CTVolume.from_array(hu, spacing, (0.0, 0.0, 0.0), meta={"source": str(folder), "format": "deeplesion"})
