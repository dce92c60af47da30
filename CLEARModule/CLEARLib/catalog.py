"""The model catalog (CLEARModule/Resources/models.json): downloadable bundles with url and sha256, cached.

A download goes to a temporary file, is checked against the catalog's sha256 and size, and only then
renamed into the cache, so a cached bundle is always a verified one.
"""

from __future__ import annotations

import hashlib
import json
import os
import urllib.request
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from .errors import CLEARInputError, check_cancel
from .files import atomic_path
from .resources import module_resource

CATALOG_VERSION = 1


class CatalogEntry(BaseModel):
    model_config = ConfigDict(extra="forbid")
    # Name and version become the cached file's name: plain words only, never a path.
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    version: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._+-]*$")
    kind: str = Field(pattern="^(case|lesion)$")
    url: str
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    size: int = Field(ge=1)
    labels: list[str] = Field(default_factory=list)
    description: str = ""


class Catalog(BaseModel):
    model_config = ConfigDict(extra="forbid")
    catalog_version: int = CATALOG_VERSION
    models: list[CatalogEntry] = Field(default_factory=list)

    def entry(self, name: str) -> CatalogEntry:
        for model in self.models:
            if model.name == name:
                return model
        raise CLEARInputError(f"no model {name!r} in the catalog; it has {[m.name for m in self.models]}")


def default_catalog_path() -> Path:
    return module_resource("models.json")


def cache_root() -> Path:
    """Where CLEAR caches what it makes or downloads: $CLEAR_CACHE, default ~/.cache/clear."""
    return Path(os.environ.get("CLEAR_CACHE", Path.home() / ".cache" / "clear"))


def default_cache_dir() -> Path:
    return cache_root() / "models"


def load_catalog(path: str | os.PathLike | None = None) -> Catalog:
    path = Path(path) if path else default_catalog_path()
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise CLEARInputError(f"cannot read the model catalog: {exc}", path) from exc
    try:
        return Catalog.model_validate(data)
    except ValidationError as exc:
        raise CLEARInputError(
            f"invalid model catalog: {exc.errors()[0]['msg']} at {exc.errors()[0]['loc']}", path
        ) from exc


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def fetch(entry: CatalogEntry, cache_dir: str | os.PathLike | None = None, progress=None, cancel=None) -> Path:
    """The cached, verified bundle of a catalog entry, downloading it first if needed. `cancel` (an Event or a
    callable) stops the download between blocks (CLEARCancelled) and leaves nothing in the cache."""
    cache = Path(cache_dir) if cache_dir else default_cache_dir()
    target = cache / f"{entry.name}-{entry.version}-{entry.sha256[:12]}.zip"
    if target.exists() and sha256_of(target) == entry.sha256:
        return target
    digest, received = hashlib.sha256(), 0
    try:
        with atomic_path(target) as tmp:  # verified before it gets its final name
            with open(tmp, "wb") as out, urllib.request.urlopen(entry.url, timeout=60) as response:
                for block in iter(lambda: response.read(1 << 20), b""):
                    check_cancel(cancel)
                    received += len(block)
                    if received > entry.size:  # never past what the catalog declares (a full disk)
                        raise CLEARInputError(f"download of {entry.name} exceeds its {entry.size} bytes", entry.url)
                    out.write(block)
                    digest.update(block)
                    if progress is not None:
                        progress(min(received / entry.size, 1.0), f"downloading {entry.name}")
            if digest.hexdigest() != entry.sha256 or received != entry.size:
                raise CLEARInputError(
                    f"download of {entry.name} does not match the catalog (sha256 {digest.hexdigest()}, "
                    f"{received} bytes; expected {entry.sha256}, {entry.size} bytes)",
                    entry.url,
                )
    except OSError as exc:
        raise CLEARInputError(f"cannot download {entry.name}: {exc}", entry.url) from exc
    return target


def catalog_entry_for(bundle_zip: str | os.PathLike, url: str) -> CatalogEntry:
    """The catalog entry describing a released bundle .zip that will be served at `url`."""
    from .bundle import read_manifest  # needs the model stack; the catalog itself does not

    path = Path(bundle_zip)
    manifest = read_manifest(path)
    return CatalogEntry(
        name=manifest.name,
        version=manifest.version,
        kind=manifest.kind,
        url=url,
        sha256=sha256_of(path),
        size=path.stat().st_size,
        labels=list(manifest.labels),
        description=manifest.description,
    )
