"""Result files for batch users: written atomically (temporary file in the same folder, then rename)."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import pandas as pd


def default_file_mode() -> int:
    """The mode open() would give a new file under the current umask (mkstemp's is always 0600)."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def write_atomic(path: str | os.PathLike, data: bytes | str) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
        os.chmod(tmp, default_file_mode())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_json(path, payload: dict) -> Path:
    return write_atomic(path, json.dumps(payload, indent=2) + "\n")


def write_csv(path, frame: pd.DataFrame) -> Path:
    return write_atomic(path, frame.to_csv(index=False))


def attention_plot_png(attention: pd.DataFrame, title: str = "", lesion_z_mm=()) -> bytes:
    """One attention curve per window against slice position (mm), as PNG bytes."""
    import io

    from matplotlib.figure import Figure  # object API: no pyplot, no global backend change (Slicer has its own)

    fig = Figure(figsize=(8, 3.2), dpi=110)
    ax = fig.add_subplot()
    for window, rows in attention.groupby("window", sort=False):
        rows = rows.sort_values("z_mm")
        ax.plot(rows.z_mm, rows.attention, label=f"{window} window", linewidth=1.4)
    for z in lesion_z_mm:
        ax.axvline(z, color="0.4", linestyle=":", linewidth=1)
    ax.set_xlabel("slice position S (mm)")
    ax.set_ylabel("attention")
    ax.set_title(title)
    ax.legend(loc="upper right", fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    return buffer.getvalue()
