"""The slice store: every pretraining slice once, as int16 HU in memory-mappable shards, plus an index.

Built once (from DeepLesion or CT files), read by the training loop with plain array indexing: no PNG
or DICOM decoding per step. Layout of a store folder:

    store.json            {"version": 1, "size": S, "n_slices": N, "shards": [...], ...}
    index.csv             one row per slice: case_id, patient_id, slice_index, z_mm, spacing, is_key,
                          boxes ("x1 y1 x2 y2|..." in store pixels), lesion_types, shard, shard_row
    shard-00000.npy ...   int16 [n, S, S]

Slices of another size are resized to S x S (antialiased) and their lesion boxes scaled with them.
Shards, the index and store.json are each written atomically; store.json last, so a store whose
conversion died is recognisably incomplete.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from CLEARLib.errors import CLEARInputError
from CLEARLib.files import write_csv, write_json, write_npy

log = logging.getLogger(__name__)

STORE_VERSION = 1


def resize_slices(hu: np.ndarray, size: int) -> np.ndarray:
    """[n, H, W] HU to [n, size, size] int16, antialiased (boxes scale by size / W and size / H)."""
    if hu.shape[1:] == (size, size):
        return hu.astype(np.int16, copy=False)
    t = torch.from_numpy(hu.astype(np.float32))[:, None]
    out = F.interpolate(t, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return out[:, 0].round().clamp(-32768, 32767).to(torch.int16).numpy()


@dataclass
class SliceRecord:
    case_id: str
    patient_id: str
    slice_index: int
    z_mm: float
    spacing: tuple[float, float, float]
    boxes: list[tuple[float, float, float, float]] = field(default_factory=list)
    lesion_types: list[int] = field(default_factory=list)


class SliceStoreWriter:
    def __init__(self, path: str | os.PathLike, size: int = 512, shard_slices: int = 1024, source: str = ""):
        self.path = Path(path)
        self.path.mkdir(parents=True, exist_ok=True)
        (self.path / "store.json").unlink(missing_ok=True)  # incomplete until closed
        self.size, self.shard_slices, self.source = size, shard_slices, source
        self._buffer: list[np.ndarray] = []
        self._rows: list[dict] = []
        self._shards: list[str] = []
        self._buffered = 0

    def add_case(self, hu: np.ndarray, records: list[SliceRecord]) -> None:
        """Slices [n, H, W] of one case (HU) with their records; boxes are in the input's pixels."""
        if hu.ndim != 3 or len(records) != hu.shape[0]:
            raise ValueError("one record per slice of a [n, H, W] array is needed")
        sy, sx = self.size / hu.shape[1], self.size / hu.shape[2]
        resized = resize_slices(hu, self.size)
        for k, rec in enumerate(records):
            boxes = [(x1 * sx, y1 * sy, x2 * sx, y2 * sy) for x1, y1, x2, y2 in rec.boxes]
            self._rows.append(
                {
                    "case_id": rec.case_id,
                    "patient_id": rec.patient_id,
                    "slice_index": rec.slice_index,
                    "z_mm": rec.z_mm,
                    "spacing_x": rec.spacing[0] / sx,
                    "spacing_y": rec.spacing[1] / sy,
                    "spacing_z": rec.spacing[2],
                    "is_key": bool(boxes),
                    "boxes": "|".join(" ".join(f"{v:.2f}" for v in b) for b in boxes),
                    "lesion_types": "|".join(str(t) for t in rec.lesion_types),
                    "shard": len(self._shards),
                    "shard_row": self._buffered,
                }
            )
            self._buffer.append(resized[k])
            self._buffered += 1
            if self._buffered == self.shard_slices:
                self._flush()

    def _flush(self) -> None:
        if not self._buffer:
            return
        name = f"shard-{len(self._shards):05d}.npy"
        write_npy(self.path / name, np.stack(self._buffer))
        self._shards.append(name)
        self._buffer, self._buffered = [], 0

    def close(self) -> Path:
        self._flush()
        index = pd.DataFrame(self._rows)
        if index.empty:
            raise CLEARInputError("no slices were added to the store", self.path)
        write_csv(self.path / "index.csv", index)
        meta = {
            "version": STORE_VERSION,
            "size": self.size,
            "n_slices": len(index),
            "n_key_slices": int(index.is_key.sum()),
            "n_cases": int(index.case_id.nunique()),
            "n_patients": int(index.patient_id.nunique()),
            "shards": self._shards,
            "source": self.source,
        }
        write_json(self.path / "store.json", meta)
        log.info(
            "%s: %d slices (%d key slices) in %d shards", self.path, len(index), meta["n_key_slices"], len(self._shards)
        )
        return self.path


class SliceStore:
    """Read side: memory-mapped shards, the index, and lesion boxes of key slices."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        meta_path = self.path / "store.json"
        if not meta_path.exists():
            raise CLEARInputError("not a complete slice store (no store.json); run the prepare step", self.path)
        self.meta = json.loads(meta_path.read_text())
        if self.meta.get("version") != STORE_VERSION:
            raise CLEARInputError(
                f"slice store version {self.meta.get('version')}, expected {STORE_VERSION}", self.path
            )
        self.size = int(self.meta["size"])
        self.index = pd.read_csv(
            self.path / "index.csv", keep_default_na=False, dtype={"case_id": str, "patient_id": str}
        )
        self._shards = [np.load(self.path / name, mmap_mode="r") for name in self.meta["shards"]]
        self._shard = self.index.shard.to_numpy()
        self._row = self.index.shard_row.to_numpy()
        self.is_key = self.index.is_key.to_numpy(dtype=bool)
        self._boxes = [
            np.array([[float(v) for v in b.split()] for b in text.split("|")], dtype=np.float32) if text else None
            for text in self.index.boxes
        ]

    def __len__(self) -> int:
        return len(self.index)

    def slices(self, rows: np.ndarray) -> torch.Tensor:
        """int16 [len(rows), S, S] for global row numbers (any order)."""
        rows = np.asarray(rows)
        out = np.empty((len(rows), self.size, self.size), dtype=np.int16)
        shards = self._shard[rows]
        for shard in np.unique(shards):
            where = np.flatnonzero(shards == shard)
            local = self._row[rows[where]]
            order = np.argsort(local)  # sorted reads from the memory map
            out[where[order]] = self._shards[shard][local[order]]
        return torch.from_numpy(out)

    def lesion_types(self, row: int) -> tuple[int, ...]:
        """DeepLesion type codes of a slice's lesions, one per box (-1: unlabelled); () for other slices. Read on
        demand: only key slices ask, and only with data.lesion_windows, so a store does not parse every row."""
        text = str(self.index.lesion_types.iat[row])
        return tuple(int(code) for code in text.split("|")) if text else ()

    def lesion_box(self, rows: np.ndarray, generator: torch.Generator) -> torch.Tensor:
        """One lesion box (x1, y1, x2, y2, store pixels) per row, drawn at random among a key slice's
        boxes; NaN for slices without one."""
        out = torch.full((len(rows), 4), float("nan"))
        for i, row in enumerate(rows):
            boxes = self._boxes[row]
            if boxes is not None:
                pick = int(torch.randint(len(boxes), (1,), generator=generator))
                out[i] = torch.from_numpy(boxes[pick])
        return out
