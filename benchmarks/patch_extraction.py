"""Per-seed time of ROI-only lesion-patch extraction vs FMCIB's whole-volume recipe run through MONAI's own
transforms (`fmcib_reference_patch`), and their voxel agreement.

Prints JSON. Volume: 512 x 512 x 300 voxels of 0.7 x 0.7 x 2.5 mm (a phantom with noise).
Usage: python benchmarks/patch_extraction.py [--seeds 20] [--whole-volume-seeds 3]
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np

from CLEARLib.phantom import make_phantom
from CLEARLib.preprocess import extract_lesion_patch, fmcib_reference_patch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seeds", type=int, default=20)
    parser.add_argument("--whole-volume-seeds", type=int, default=3)
    args = parser.parse_args()

    volume, lesions = make_phantom(shape_zyx=(300, 512, 512), spacing_xyz=(0.7, 0.7, 2.5), seed=0)
    rng = np.random.default_rng(0)
    # Seeds at least 30 mm from every border, so that no patch reaches outside the image.
    margin = np.ceil(30.0 / np.array(volume.spacing[::-1])).astype(int)
    seeds = [volume.index_to_lps(rng.uniform(margin, np.array(volume.shape) - 1 - margin)) for _ in range(args.seeds)]
    seeds[0] = np.asarray(lesions[0].center_lps)

    extract_lesion_patch(volume, seeds[0])  # warm-up
    t0 = time.perf_counter()
    roi_patches = [extract_lesion_patch(volume, s) for s in seeds]
    roi_s = (time.perf_counter() - t0) / len(seeds)

    whole_times, max_diff = [], 0.0
    for seed, roi in zip(seeds[: args.whole_volume_seeds], roi_patches, strict=False):
        t0 = time.perf_counter()
        reference = fmcib_reference_patch(volume, seed, border="centred")
        whole_times.append(time.perf_counter() - t0)
        max_diff = max(max_diff, float(np.abs(reference - roi).max()))
    whole_s = float(np.mean(whole_times))
    print(
        json.dumps(
            {
                "volume_shape_zyx": list(volume.shape),
                "spacing_xyz_mm": list(volume.spacing),
                "patch": [50, 50, 50],
                "roi_seconds_per_seed": round(roi_s, 5),
                "whole_volume_seconds_per_seed": round(whole_s, 3),
                "speedup": round(whole_s / roi_s, 1),
                "seeds_timed_roi": len(seeds),
                "seeds_timed_whole_volume": len(whole_times),
                "reference": "FMCIB recipe through MONAI Spacingd(diagonal=True) + Orientationd('LPS')",
                "max_abs_voxel_difference_normalised": max_diff,
                "max_abs_voxel_difference_hu": max_diff * 3072.0,
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
