"""Published weights CLEAR converts on day one: FMCIB's lesion foundation model and timm's ImageNet MambaOut.

`fetch_published(name)` downloads the file its publisher serves (only when asked: the command line's
`clear-ct fetch NAME`, or the Slicer module after one confirmation naming size and license), resumably and
never past the entry's size limit, into CLEAR's cache (never the working directory); verifies it (against a
published sha256, or else against the sha256 recorded at the first download, which the bundle's manifest
also records and the user is shown); converts it strictly (every key matched, shapes checked, torch files
read with weights_only=True); and caches the bundle by the weights' sha256, so a second call reads nothing
from the network.

What each entry says: where the file comes from (`url`, `source`), its license, which converter turns it
into a bundle, and its size limit. timm's entries come from timm's own pretrained configs (Hugging Face
address and license); the limit is the model's parameter bytes plus 1 MiB, computed from the architecture.
"""

from __future__ import annotations

import http.client
import json
import os
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from .catalog import cache_root, sha256_of
from .errors import CLEARInputError, check_cancel
from .files import write_json
from .progress import report

FMCIB_URL = "https://zenodo.org/records/10528450/files/model_weights.torch?download=1"  # FMCIB's own package's
TIMM_MAMBAOUT = ("mambaout_femto.in1k", "mambaout_kobe.in1k", "mambaout_tiny.in1k", "mambaout_small.in1k",
                 "mambaout_base.in1k")  # fmt: skip
_BLOCK = 1 << 20


@dataclass(frozen=True)
class PublishedWeights:
    name: str  # what the user types: "fmcib", "mambaout_tiny.in1k"
    kind: str  # the bundle it becomes: "lesion" (features) or "case" (an encoder for `clear-train extract`)
    url: str
    source: str
    license: str
    converter: str  # "fmcib" or "mambaout"
    architecture: str
    max_bytes: int  # the download stops beyond this (a wrong or hostile server cannot fill the disk)
    sha256: str | None = None  # a published checksum; None: the first download's is recorded and enforced

    def describe(self) -> str:
        return f"{self.name}: {self.source}; license {self.license}; at most {self.max_bytes / 2**20:.0f} MiB"


def _float32_bytes(make_model) -> int:
    """float32 bytes of the parameters and buffers of `make_model()`, built on the meta device (nothing
    allocated)."""
    import torch

    with torch.device("meta"):
        model = make_model()
    return sum(t.numel() * 4 for t in [*model.parameters(), *model.buffers()])


def _timm_entry(name: str) -> PublishedWeights:
    import timm
    from timm.models import get_pretrained_cfg

    cfg = get_pretrained_cfg(name)
    architecture = name.split(".")[0]
    size = _float32_bytes(lambda: timm.create_model(architecture, pretrained=False))  # with its classifier
    return PublishedWeights(
        name=name,
        kind="case",
        url=f"https://huggingface.co/{cfg.hf_hub_id}/resolve/main/model.safetensors",
        source=f"timm's ImageNet-1k {architecture} weights (Hugging Face {cfg.hf_hub_id}), the CLEAR paper's baseline",
        license=cfg.license or "see the model card",
        converter="mambaout",
        architecture=architecture,
        max_bytes=size + _BLOCK,
    )


def _fmcib_entry() -> PublishedWeights:
    from .models import create_encoder

    return PublishedWeights(
        name="fmcib",
        kind="lesion",
        url=FMCIB_URL,
        source="FMCIB foundation model (Pai et al., Nature Machine Intelligence 2024), Zenodo record 10528450, "
        "the file FMCIB's own package downloads",
        license="as stated on https://zenodo.org/records/10528450 (the FMCIB code is MIT)",
        converter="fmcib",
        architecture="fmcib_resnet50",
        # the checkpoint holds the trunk and may hold heads and training state: three times the trunk
        max_bytes=3 * _float32_bytes(lambda: create_encoder("fmcib_resnet50")) + _BLOCK,
    )


PUBLISHED_NAMES = ("fmcib", *TIMM_MAMBAOUT)


def published_weights() -> dict[str, PublishedWeights]:
    """Every published file CLEAR knows how to convert, by name."""
    return {name: published_entry(name) for name in PUBLISHED_NAMES}


def published_entry(name: str, entries: dict[str, PublishedWeights] | None = None) -> PublishedWeights:
    if entries is not None and name in entries:
        return entries[name]
    if name == "fmcib":
        return _fmcib_entry()
    if name in TIMM_MAMBAOUT:
        return _timm_entry(name)
    raise CLEARInputError(f"no published weights named {name!r}; known: {', '.join(PUBLISHED_NAMES)}")


def published_cache() -> Path:
    return cache_root() / "published"


def _known_file(cache: Path) -> Path:
    return cache / "first-download-sha256.json"


def _known(cache: Path) -> dict:
    path = _known_file(cache)
    if not path.exists():
        return {}
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise CLEARInputError(f"cannot read the record of first downloads: {exc}", path) from exc


def cached_bundle(entry: PublishedWeights, cache: Path | None = None) -> Path | None:
    """The bundle an earlier fetch made for this entry, if any (nothing is downloaded)."""
    cache = Path(cache) if cache is not None else published_cache()
    sha = entry.sha256 or _known(cache).get(entry.name, {}).get("sha256")
    if sha is None:
        return None
    bundle = _bundle_path(cache, entry, sha)
    return bundle if bundle.exists() else None


def _bundle_path(cache: Path, entry: PublishedWeights, sha: str) -> Path:
    """Where the bundle converted from the file with this sha256 is cached."""
    return cache / "bundles" / f"{entry.name}-{sha[:16]}.zip"


def _download(entry: PublishedWeights, part: Path, progress, cancel) -> None:
    """Into `part`, resuming what an interrupted download left there (HTTP Range), never past max_bytes."""
    have = part.stat().st_size if part.exists() else 0
    request = urllib.request.Request(entry.url, headers={"Range": f"bytes={have}-"} if have else {})
    try:
        response = urllib.request.urlopen(request, timeout=60)
    except urllib.error.HTTPError as exc:
        if exc.code == 416 and have:  # the part file is already whole
            return
        raise CLEARInputError(f"cannot download {entry.name}: HTTP {exc.code} {exc.reason}", entry.url) from exc
    except (urllib.error.URLError, OSError) as exc:
        raise CLEARInputError(f"cannot download {entry.name}: {getattr(exc, 'reason', exc)}", entry.url) from exc
    with response:
        resumed = have and getattr(response, "status", 200) == 206
        if not resumed:
            have = 0  # the server sent the whole file: start over
        declared = response.headers.get("Content-Length")
        total = have + int(declared) if declared and declared.isdigit() else None
        if total is not None and total > entry.max_bytes:
            raise CLEARInputError(
                f"{entry.name} is {total} bytes, more than its limit of {entry.max_bytes}; not downloaded", entry.url
            )
        with open(part, "ab" if resumed else "wb") as out:
            received = have
            for block in _blocks(response, entry):
                check_cancel(cancel)
                received += len(block)
                if received > entry.max_bytes:
                    problem = f"download of {entry.name} exceeds its limit of {entry.max_bytes} bytes"
                    raise CLEARInputError(problem, entry.url)
                out.write(block)
                report(progress, received / (total or entry.max_bytes), f"downloading {entry.name}")
    if total is not None and received < total:
        problem = f"the download of {entry.name} broke off at {received} of {total} bytes"
        problem += "; run the same command again to resume"
        raise CLEARInputError(problem, entry.url)


def _blocks(response, entry: PublishedWeights):
    """The response's blocks; a connection that breaks off is a download to resume, said as such."""
    while True:
        try:
            block = response.read(_BLOCK)
        except (http.client.IncompleteRead, ConnectionError, TimeoutError) as exc:
            raise CLEARInputError(
                f"the download of {entry.name} broke off ({type(exc).__name__}); run the same command again to resume",
                entry.url,
            ) from exc
        if not block:
            return
        yield block


def fetch_published(name: str, cache: str | os.PathLike | None = None, progress=None, cancel=None,
                    entries: dict[str, PublishedWeights] | None = None) -> tuple[Path, dict]:  # fmt: skip
    """The bundle of published weights `name`: downloaded, verified, converted and cached on first use.

    Returns (bundle path, record) where the record says the source, license, sha256 and how it was verified
    ("published sha256" or "first download" with its date). Raises CLEARInputError on a size, checksum or
    conversion problem; a cancel (CLEARCancelled) keeps the partial file for the next call to resume."""
    entry = published_entry(name, entries)
    cache = Path(cache) if cache is not None else published_cache()
    (cache / "downloads").mkdir(parents=True, exist_ok=True)
    existing = cached_bundle(entry, cache)
    known = _known(cache).get(entry.name)
    if existing is not None:
        return existing, _record(entry, known["sha256"] if known else entry.sha256, known)
    part = cache / "downloads" / f"{entry.name}.part"
    _download(entry, part, progress, cancel)
    sha = sha256_of(part)
    if entry.sha256 is not None and sha != entry.sha256:
        part.unlink()
        raise CLEARInputError(f"{entry.name}: sha256 {sha} is not the published {entry.sha256}; deleted", entry.url)
    if entry.sha256 is None and known is not None and sha != known["sha256"]:
        part.unlink()
        raise CLEARInputError(
            f"{entry.name}: sha256 {sha} differs from the first download's {known['sha256']} ({known['first_seen']}):"
            " the file at the source changed or was tampered with; deleted",
            entry.url,
        )
    suffix = ".safetensors" if entry.converter == "mambaout" else ".torch"  # the converters read by suffix
    weights = cache / "downloads" / f"{entry.name}-{sha[:16]}{suffix}"
    os.replace(part, weights)
    if entry.sha256 is None and known is None:
        size = weights.stat().st_size
        known = {"sha256": sha, "size": size, "url": entry.url, "first_seen": time.strftime("%Y-%m-%d")}
        write_json(_known_file(cache), {**_known(cache), entry.name: known})
    record = _record(entry, sha, known)
    bundle = _bundle_path(cache, entry, sha)
    report(progress, 1.0, f"converting {entry.name}")
    _convert(entry, weights, bundle, record)
    return bundle, record


def _record(entry: PublishedWeights, sha: str, known: dict | None) -> dict:
    verified = "published sha256" if entry.sha256 else f"first download ({known['first_seen']})" if known else "?"
    return {"source_url": entry.url, "source": entry.source, "license": entry.license, "sha256": sha,
            "verified_by": verified}  # fmt: skip


def _convert(entry: PublishedWeights, weights: Path, bundle: Path, record: dict) -> Path:
    from .bundle.convert import convert_fmcib, convert_mambaout

    provenance = {"source_url": record["source_url"], "source": record["source"], "license": record["license"],
                  "source_sha256": record["sha256"], "sha256_verified_by": record["verified_by"]}  # fmt: skip
    if entry.converter == "fmcib":
        return convert_fmcib(weights, bundle, name=entry.name, provenance=provenance)
    return convert_mambaout(weights, bundle, architecture=entry.architecture, name=entry.name, provenance=provenance)
