"""A synthetic DeepLesion-format folder: 16-bit PNG slices (HU + 32768) and DL_info.csv with key slices."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from CLEARLib.phantom import Lesion, make_phantom


def write_deeplesion(root: Path, n_patients: int = 4, slices: int = 12, size: int = 64, seed: int = 0) -> pd.DataFrame:
    """Each patient: one study with one series of `slices` PNGs and one lesion with a key slice.

    Returns the DL_info frame (also written to root / DL_info.csv).
    """
    rng = np.random.default_rng(seed)
    rows = []
    spacing = (300.0 / size, 300.0 / size, 5.0)
    for p in range(1, n_patients + 1):
        folder = f"{p:06d}_01_01"
        (root / "Images_png" / folder).mkdir(parents=True, exist_ok=True)
        key = int(rng.integers(3, slices - 3))
        origin = np.array([-150 + spacing[0] / 2, -150 + spacing[1] / 2, -(slices - 1) * spacing[2] / 2])
        centre_xy = rng.uniform(-60, 60, size=2)
        centre = (centre_xy[0], centre_xy[1], origin[2] + key * spacing[2])
        lesion = Lesion("liver", tuple(centre), 12.0, 150)
        volume, _ = make_phantom((slices, size, size), spacing, origin, lesions=[lesion], seed=p)
        for k in range(slices):
            png = (volume.hu[k].astype(np.int32) + 32768).astype(np.uint16)
            Image.fromarray(png).save(root / "Images_png" / folder / f"{k:03d}.png")
        cx, cy = (np.array(centre[:2]) - origin[:2]) / spacing[:2]
        r = 12.0 / spacing[0]
        rows.append(
            {
                "File_name": f"{folder}_{key:03d}.png",
                "Patient_index": p,
                "Study_index": 1,
                "Series_ID": 1,
                "Key_slice_index": key,
                "Bounding_boxes": f"{cx - r:.3f}, {cy - r:.3f}, {cx + r:.3f}, {cy + r:.3f}",
                "Coarse_lesion_type": [4, 5, 2, -1][(p - 1) % 4],
                "Slice_range": f"0, {slices - 1}",
                "Spacing_mm_px_": f"{spacing[0]:.4f}, {spacing[1]:.4f}, {spacing[2]:.1f}",
                "Image_size": f"{size}, {size}",
                "Train_Val_Test": 1,
            }
        )
    info = pd.DataFrame(rows)
    info.to_csv(root / "DL_info.csv", index=False)
    return info
