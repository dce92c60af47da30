"""Batch API, model catalog downloads and dependency checks (what the Slicer module builds on)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from CLEARLib.batch import run_batch
from CLEARLib.catalog import Catalog, catalog_entry_for, fetch, load_catalog
from CLEARLib.dependencies import missing_requirements, read_requirements
from CLEARLib.errors import CLEARInputError
from CLEARLib.io import write_volume
from CLEARLib.phantom import make_phantom


def test_batch_over_paths_and_nodes_with_a_failing_case(tmp_path, tiny_case_bundle):
    slicer = pytest.importorskip("slicer", reason="slicer-core is needed for volume nodes and tables")
    from CLEARLib import mrml

    scene = slicer.vtkMRMLScene()
    slicer.mrmlScene = scene
    first, _ = make_phantom((12, 32, 32), (6.0, 6.0, 10.0), seed=1)
    second, _ = make_phantom((9, 28, 30), (6.0, 6.0, 10.0), seed=2)
    path = write_volume(first, tmp_path / "first.nrrd")
    node = mrml.node_from_volume(second, scene, name="second")
    batch = run_batch([path, node, tmp_path / "missing.nii.gz"], tiny_case_bundle, device="cpu", scene=scene)
    frame = batch.predictions
    assert list(frame.case) == ["first", "second", "missing"]
    assert list(frame.status) == ["ok", "ok", "failed"] and "no such file" in frame.error.iloc[2]
    assert {"p_liver", "p_lung", "p_bone"} <= set(frame.columns)
    assert batch.attention.groupby("case").size().to_dict() == {"first": 24, "second": 18}
    np.testing.assert_allclose(batch.attention.groupby("case").attention.sum(), 1.0, atol=1e-5)
    table = slicer.util.dataframeFromTable(batch.predictions_node)
    assert list(table.case) == ["first", "second", "missing"]
    assert batch.attention_node.GetNumberOfRows() == 42
    # Saved with the scene: table nodes write through their storage node and read back.
    storage = slicer.vtkMRMLTableStorageNode()
    scene.AddNode(storage)
    storage.SetFileName(str(tmp_path / "predictions.tsv"))
    assert storage.WriteData(batch.predictions_node)
    reread = scene.AddNewNodeByClass("vtkMRMLTableNode")
    assert storage.ReadData(reread)
    assert reread.GetNumberOfRows() == 3


def test_batch_without_a_scene(tmp_path, tiny_case_bundle):
    volume, _ = make_phantom((10, 32, 32), (6.0, 6.0, 10.0), seed=3)
    paths = [write_volume(volume, tmp_path / patient / "ct.nii.gz") for patient in ("P001", "P002")]
    batch = run_batch(paths, tiny_case_bundle, device="cpu")
    assert batch.predictions_node is None and list(batch.predictions.status) == ["ok", "ok"]
    # cases are named by what tells them apart, never "ct" twice; the attention table keeps them apart
    assert list(batch.predictions.case) == ["P001/ct", "P002/ct"]
    assert batch.attention.groupby("case").size().to_dict() == {"P001/ct": 20, "P002/ct": 20}


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
