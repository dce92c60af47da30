"""The one policy for writing files: build under a temporary name in the same folder, then rename into place.

A reader never sees half a file, a crash leaves the previous version (or nothing) under the final name, and
new files get the permissions open() would give them under the user's umask (mkstemp's are always 0600, which
colleagues on a shared server cannot read).
"""

from __future__ import annotations

import io
import json
import os
import shutil
import tempfile
import zipfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from .errors import CLEARInputError


def default_file_mode() -> int:
    """The mode open() would give a new file under the current umask."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


@contextmanager
def atomic_path(
    path: str | os.PathLike, keep_suffix: str = "", durable: bool = False, previous: str | os.PathLike | None = None
) -> Iterator[Path]:
    """A temporary path beside `path` for writers that want a file name (h5py, torch.save, SimpleITK, which
    picks the format by `keep_suffix`); renamed to `path` with normal permissions when the block ends,
    removed if it raises.

    `durable`: the file's data, then the rename, are flushed to the storage (fsync) before returning, so a
    node that loses power or a job killed at once after it never finds a truncated file (checkpoints).
    `previous`: the file `path` held until now is kept under this name, so one older version survives.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp" + keep_suffix, dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, default_file_mode())
        if durable:
            _fsync(tmp)
        if previous is not None and path.exists():
            os.replace(path, previous)
        os.replace(tmp, path)
        if durable:
            _fsync(path.parent)
    finally:
        Path(tmp).unlink(missing_ok=True)


def _fsync(path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def check_writable(folder: str | os.PathLike) -> Path:
    """Create `folder` if needed and prove a file can be written in it, before any work is spent."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".clear-write-check-", dir=folder)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise CLEARInputError(f"cannot write results here: {exc.strerror or exc}", folder) from exc
    return folder


def check_output_folder(out: str | os.PathLike) -> Path:
    """Before the work: staged_outputs can write beside `out` and, if `out` exists, in it."""
    out = Path(out)
    check_writable(out.parent)
    if out.exists():
        check_writable(out)
    return out


def remove_stale_temporaries(folder: str | os.PathLike, older_than_s: float = 3600.0) -> list[str]:
    """Temporary files and staging folders that runs killed before their rename left in `folder` (this
    module's names only, and only when older than `older_than_s`, so that a run writing now is untouched)."""
    import time

    folder, removed = Path(folder), []
    if not folder.is_dir():
        return removed
    now = time.time()
    for entry in folder.iterdir():
        name = entry.name
        ours = name.startswith(".") and (".tmp" in name or ".partial-" in name)
        try:
            if ours and now - entry.lstat().st_mtime > older_than_s:
                shutil.rmtree(entry) if entry.is_dir() else entry.unlink()
                removed.append(name)
        except OSError:
            continue  # another process removed or is using it
    return removed


def write_atomic(path: str | os.PathLike, data: bytes | str) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data.encode() if isinstance(data, str) else data)
    return Path(path)


def jsonable(value):
    """`value` with numpy scalars as Python numbers and NaN as None (null: JSON has no NaN), recursively."""
    import numpy as np

    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and np.isnan(value):
        return None
    return value


def write_json(path, payload: dict) -> Path:
    return write_atomic(path, json.dumps(payload, indent=2, default=str) + "\n")


def write_csv(path, frame) -> Path:
    return write_atomic(path, frame.to_csv(index=False))


@contextmanager
def hdf5_writer(path: str | os.PathLike) -> Iterator:
    """An h5py.File built in memory and written to `path` (by write_atomic) when the block ends.

    HDF5 writing through its own file driver fails badly when the disk fills up (errors from destructors,
    then a segfault at exit as the library flushes the half-written file); built in memory, a full disk is
    one clean OSError from a plain write, and the previous file stays. Feature files are small (a few MB).
    """
    import h5py

    buffer = io.BytesIO()
    with h5py.File(buffer, "w") as f:
        yield f
    write_atomic(path, buffer.getvalue())


def write_npy(path, array) -> Path:
    import numpy as np

    buffer = io.BytesIO()
    np.save(buffer, array)
    return write_atomic(path, buffer.getvalue())


def _replace(source: Path, target: Path, aside: Path) -> None:
    """Rename `source` to `target`; an existing `target` (even a folder) is moved to `aside` first."""
    if not target.exists():
        os.replace(source, target)
        return
    os.replace(target, aside)
    try:
        os.replace(source, target)
    except BaseException:
        os.replace(aside, target)
        raise


@contextmanager
def staged_outputs(out: str | os.PathLike) -> Iterator[Path]:
    """A temporary folder beside `out` in which a command writes the set of files it makes; they move into
    `out` only when the block succeeds, so a failed run leaves nothing new under the final names (files of
    the same names from an earlier run stay as they were)."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        yield stage
        out.mkdir(exist_ok=True)
        previous = stage / ".previous"
        previous.mkdir()
        for entry in sorted(stage.iterdir()):
            if entry != previous:
                _replace(entry, out / entry.name, previous / entry.name)
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def _is_bundle(path: Path) -> bool:
    if path.is_dir():
        return (path / "manifest.json").is_file()
    try:
        with zipfile.ZipFile(path) as zf:
            return "manifest.json" in zf.namelist()
    except (OSError, zipfile.BadZipFile):
        return False


def check_bundle_target(path: str | os.PathLike) -> Path:
    """`path` if a bundle may be written there: nothing there yet, or a bundle (replaced); else bad input."""
    path = Path(path)
    if path.exists() and not _is_bundle(path):
        what = "a folder" if path.is_dir() else "a file"
        raise CLEARInputError(f"{what} that is not a CLEAR bundle is already here; give a new bundle path", path)
    return path


def publish_bundle(build_into: Callable[[Path], None], path: str | os.PathLike) -> Path:
    """Build a bundle (a folder or a .zip) in a temporary sibling, then move it into place.

    An existing bundle at `path` is replaced only once the new one is complete; anything else at `path`
    (a run folder, a checkpoint) is refused, never deleted.
    """
    path = check_bundle_target(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        built = work / path.name
        build_into(built)
        if built.is_file():
            os.chmod(built, default_file_mode())
        _replace(built, path, work / "previous")  # a folder cannot be renamed over a folder
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return path
