"""Model catalog downloads and dependency checks (what the Slicer module builds on)."""

from __future__ import annotations

import json

import pytest

from CLEARLib.catalog import Catalog, catalog_entry_for, fetch, load_catalog
from CLEARLib.dependencies import missing_requirements, read_requirements
from CLEARLib.errors import CLEARInputError


def test_catalog_download_is_verified_and_cached(tmp_path, tiny_case_bundle):
    entry = catalog_entry_for(tiny_case_bundle, url=tiny_case_bundle.resolve().as_uri())
    assert entry.kind == "case" and entry.labels == ["liver", "lung", "bone"] and entry.size > 0
    catalog_path = tmp_path / "models.json"
    catalog_path.write_text(json.dumps({"catalog_version": 1, "models": [entry.model_dump()]}))
    catalog = load_catalog(catalog_path)
    seen = []
    cached = fetch(catalog.entry(entry.name), cache_dir=tmp_path / "cache", progress=lambda f, m: seen.append(f))
    assert cached.read_bytes() == tiny_case_bundle.read_bytes() and seen[-1] == 1.0
    assert fetch(catalog.entry(entry.name), cache_dir=tmp_path / "cache") == cached  # no second download
    tampered = entry.model_copy(update={"sha256": "0" * 64, "version": "9"})
    with pytest.raises(CLEARInputError, match="does not match the catalog"):
        fetch(tampered, cache_dir=tmp_path / "cache")
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == [cached.name]  # nothing half-written
    with pytest.raises(CLEARInputError, match="no model 'other'"):
        catalog.entry("other")


def test_catalog_entries_stay_in_the_cache_and_downloads_stop_at_their_size(tmp_path, tiny_case_bundle):
    entry = catalog_entry_for(tiny_case_bundle, url=tiny_case_bundle.resolve().as_uri())
    escaping = {**entry.model_dump(), "name": "../../outside"}
    (tmp_path / "bad.json").write_text(json.dumps({"catalog_version": 1, "models": [escaping]}))
    with pytest.raises(CLEARInputError, match="bad.json: invalid model catalog"):
        load_catalog(tmp_path / "bad.json")
    short = entry.model_copy(update={"size": 1000})  # the file is larger than the catalog says
    with pytest.raises(CLEARInputError, match=f"download of {entry.name} exceeds its 1000 bytes"):
        fetch(short, cache_dir=tmp_path / "cache")
    assert list((tmp_path / "cache").iterdir()) == []


def test_shipped_catalog_and_requirements_are_valid():
    assert isinstance(load_catalog(), Catalog)
    requirements = read_requirements()
    assert any(r.startswith("timm") for r in requirements) and not any(r.startswith("torch") for r in requirements)
    assert missing_requirements(requirements) == []  # this environment has them all
    assert missing_requirements(["timm>=999"]) == ["timm>=999"]
    assert missing_requirements(["surely-not-a-package-clear"]) == ["surely-not-a-package-clear"]
