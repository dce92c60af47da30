"""The one file-writing policy (CLEARLib.files): atomic, normal permissions, and never a lost folder."""

from __future__ import annotations

import os
import stat

import h5py
import numpy as np
import pytest
import torch
from conftest import TINY_MAMBAOUT

from CLEARLib.bundle import load_bundle, save_bundle
from CLEARLib.bundle.convert import convert_moco
from CLEARLib.errors import CLEARInputError
from CLEARLib.files import atomic_path, publish_bundle, write_atomic, write_json, write_npy
from CLEARLib.models import create_encoder


@pytest.fixture
def umask_027():
    previous = os.umask(0o027)
    yield
    os.umask(previous)


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_every_writer_gives_the_umask_mode(tmp_path, umask_027):
    write_json(tmp_path / "a.json", {"a": 1})
    write_npy(tmp_path / "b.npy", np.arange(3))
    with atomic_path(tmp_path / "c.h5") as tmp, h5py.File(tmp, "w") as f:
        f["x"] = np.arange(4)
    bundle = _encoder_bundle(tmp_path / "d.zip")
    for name in ("a.json", "b.npy", "c.h5", bundle.name):
        assert _mode(tmp_path / name) == 0o640, name
    np.testing.assert_array_equal(np.load(tmp_path / "b.npy"), np.arange(3))
    with h5py.File(tmp_path / "c.h5") as f:
        np.testing.assert_array_equal(f["x"][:], np.arange(4))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json", "b.npy", "c.h5", "d.zip"]  # no temporaries


def test_a_failed_write_keeps_the_previous_file_and_leaves_no_temporary(tmp_path):
    write_atomic(tmp_path / "result.json", "old")
    with pytest.raises(RuntimeError), atomic_path(tmp_path / "result.json") as tmp:
        tmp.write_text("half")
        raise RuntimeError("disk full")
    assert (tmp_path / "result.json").read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["result.json"]


def _encoder_bundle(path, name="enc"):
    encoder = create_encoder("mambaout_femto", **TINY_MAMBAOUT)
    return save_bundle(path, name=name, kind="case", encoder=encoder, windows=["lung"])


def test_a_bundle_never_replaces_a_folder_that_is_not_a_bundle(tmp_path):
    """`clear-ct convert moco run/ckpt.pth.tar run` once deleted the run folder with the checkpoint in it."""
    run = tmp_path / "run"
    run.mkdir()
    source = create_encoder("mambaout_femto", **TINY_MAMBAOUT)
    state = {f"module.base_encoder.{k}": v for k, v in source.model.state_dict().items()}
    torch.save({"state_dict": state}, run / "ckpt.pth.tar")
    (run / "notes.txt").write_text("keep me")
    with pytest.raises(CLEARInputError, match="not a CLEAR bundle"):
        convert_moco(run / "ckpt.pth.tar", run, "mambaout_femto", encoder_kwargs=TINY_MAMBAOUT)
    assert sorted(p.name for p in run.iterdir()) == ["ckpt.pth.tar", "notes.txt"]
    assert convert_moco(run / "ckpt.pth.tar", tmp_path / "bundle", "mambaout_femto", encoder_kwargs=TINY_MAMBAOUT)


def test_a_bundle_replaces_an_older_bundle_only_when_complete(tmp_path):
    first = _encoder_bundle(tmp_path / "enc", name="first")
    assert load_bundle(_encoder_bundle(first, name="second")).manifest.name == "second"

    def build_half(target):
        target.mkdir()
        (target / "manifest.json").write_text("{}")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        publish_bundle(build_half, first)
    assert load_bundle(first).manifest.name == "second"
    assert [p.name for p in tmp_path.iterdir()] == ["enc"]


def test_an_unwritable_output_folder_is_refused_before_any_work(tmp_path, tiny_case_bundle, capsys):
    from CLEARLib.cli import main

    ct = tmp_path / "ct.nrrd"
    assert main(["phantom", str(ct), "--shape", "8", "32", "32"]) == 0
    (tmp_path / "taken").write_text("a file where the output's folder should be")
    capsys.readouterr()
    out = tmp_path / "taken" / "o"
    assert main(["-q", "predict", str(ct), "--model", str(tiny_case_bundle), "--out", str(out)]) == 2
    printed = capsys.readouterr()
    assert "cannot write results here" in printed.err and printed.out == ""  # refused before predicting


def test_the_writability_check_and_stale_temporaries(tmp_path):
    import time

    from CLEARLib.files import check_output_folder, check_writable, remove_stale_temporaries

    (tmp_path / "a-file").write_text("x")
    with pytest.raises(CLEARInputError, match="cannot write results here"):
        check_writable(tmp_path / "a-file" / "sub")  # a file stands where the folder should be
    assert check_output_folder(tmp_path / "new") == tmp_path / "new" and not (tmp_path / "new").exists()
    old, fresh, stage = tmp_path / ".x.json.abc.tmp", tmp_path / ".y.json.def.tmp", tmp_path / ".out.partial-1"
    for path in (old, fresh):
        path.write_text("half")
    stage.mkdir()
    (tmp_path / ".hidden-config").write_text("not ours")
    long_ago = time.time() - 7200
    for path in (old, stage):
        os.utime(path, (long_ago, long_ago))
    assert sorted(remove_stale_temporaries(tmp_path)) == [".out.partial-1", ".x.json.abc.tmp"]
    assert fresh.exists() and (tmp_path / ".hidden-config").exists() and not old.exists()
