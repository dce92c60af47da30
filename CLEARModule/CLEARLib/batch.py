"""Batch API for the Python console (Slicer's or plain Python): many CTs through one case bundle.

    from CLEARLib.batch import run_batch
    batch = run_batch([volume_node, "/data/ct2.nii.gz", "/data/dicom/case3"], "model.zip", scene=slicer.mrmlScene)
    batch.predictions        # DataFrame: one row per case (status, probabilities, top slice)
    batch.attention          # DataFrame: case, slice_index, window, z_mm, attention
    batch.predictions_node   # table nodes in the scene (saved with it), when a scene is given

A case that fails is reported in its row (status "failed", error) and the batch goes on.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import pandas as pd

from .errors import CLEARCancelled
from .inference import CasePredictor
from .inference.runtime import check_cancel
from .io import read_ct
from .io.cohort import case_names, unique_names
from .progress import report


@dataclass
class BatchResult:
    predictions: pd.DataFrame
    attention: pd.DataFrame
    predictions_node: object | None = None
    attention_node: object | None = None


def _is_volume_node(item) -> bool:
    return hasattr(item, "GetImageData") and hasattr(item, "GetIJKToRASMatrix")


def _case_names(inputs) -> list[str]:
    """Node names for volume nodes; for paths, the path relative to the folder they share (CLEARLib.io.cohort):
    P001/ct.nii.gz and P002/ct.nii.gz are "P001/ct" and "P002/ct", never "ct" twice."""
    paths = [item for item in inputs if not _is_volume_node(item)]
    path_names = iter(case_names(paths))
    return unique_names([item.GetName() if _is_volume_node(item) else next(path_names) for item in inputs])


def run_batch(
    inputs,
    bundle,
    device: str = "auto",
    scene=None,
    progress=None,
    cancel=None,
    top_k: int = 5,
) -> BatchResult:
    """Predict every input (volume nodes and/or CT paths); tables in `scene` when one is given."""
    predictor = bundle if isinstance(bundle, CasePredictor) else CasePredictor(bundle, device=device)
    labels = predictor.labels
    rows, attention = [], []
    inputs = list(inputs)
    for i, (item, name) in enumerate(zip(inputs, _case_names(inputs), strict=True)):
        check_cancel(cancel)
        report(progress, i / max(len(inputs), 1), f"case {i + 1}/{len(inputs)}: {name}")
        row = {"case": name, "source": item.GetID() if _is_volume_node(item) else str(item)}
        try:
            if _is_volume_node(item):
                from .mrml import volume_from_node

                volume = volume_from_node(item)
            else:
                volume = read_ct(os.fspath(item))
            result = predictor.predict(volume, cancel=cancel)
        except CLEARCancelled:
            raise
        except Exception as exc:  # one bad case must not stop the batch
            rows.append({**row, "status": "failed", "error": str(exc)})
            continue
        read = volume.input_record()
        top = result.top_slices(top_k)
        rows.append(
            {
                **row,
                "status": "ok",
                "error": "",
                **{key: read.get(key, "") for key in ("patient_id", "series_instance_uid")},
                **{f"p_{label}": result.probabilities[label] for label in labels},
                "top_slices": " ".join(str(int(s)) for s in top.slice_index),
                "top_window": str(top.window.iloc[0]),
                "top_z_mm": float(top.z_mm.iloc[0]),
                "n_instances": int(len(result.attention)),
            }
        )
        attention.append(result.attention.assign(case=name)[["case", "slice_index", "window", "z_mm", "attention"]])
    report(progress, 1.0, "done")
    predictions = pd.DataFrame(rows)
    attention_frame = (
        pd.concat(attention, ignore_index=True)
        if attention
        else pd.DataFrame(columns=["case", "slice_index", "window", "z_mm", "attention"])
    )
    result = BatchResult(predictions, attention_frame)
    if scene is not None:
        from .mrml import table_from_frame

        text = predictions.select_dtypes(exclude="number").columns
        shown = predictions.assign(**{c: predictions[c].fillna("") for c in text})  # failed rows: blank text
        result.predictions_node = table_from_frame(scene, shown, "CLEAR batch predictions")
        result.attention_node = table_from_frame(scene, attention_frame, "CLEAR batch attention")
    return result
