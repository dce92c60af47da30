"""`clear-ct` from the command line: phantom, info, and clear errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from CLEARLib.cli import main
from CLEARLib.io import read_ct

from ctfactory import layout_of, write_dicom_series


def test_phantom_then_info_json(tmp_path, capsys):
    out = tmp_path / "ph.nrrd"
    assert main(["phantom", str(out), "--shape", "12", "20", "24", "--spacing", "2", "2.5", "4"]) == 0
    assert "lesion in liver" in capsys.readouterr().out
    assert main(["info", str(out), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["shape_zyx"] == [12, 20, 24]
    assert info["spacing_xyz_mm"] == [2.0, 2.5, 4.0]
    assert info["hu"]["min"] <= -999 and info["hu"]["max"] >= 600
    assert abs(info["hu"]["mean"] - read_ct(out).hu.mean()) < 1e-6


def test_info_text_for_a_dicom_folder_reports_the_series(tmp_path, phantom, capsys):
    volume, _ = phantom
    write_dicom_series(layout_of(volume), tmp_path / "dcm", series_uid="1.2.826.0.1.99")
    assert main(["info", str(tmp_path / "dcm")]) == 0
    text = capsys.readouterr().out
    assert "1.2.826.0.1.99" in text and "shape (z,y,x)  [24, 40, 48]" in text


def test_bad_input_exits_2_with_the_file_named(tmp_path, capsys):
    bad = tmp_path / "nothing-here"
    assert main(["info", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "nothing-here" in err and "no such file" in err


def test_one_exit_code_policy_for_both_clis(tmp_path, tiny_case_bundle, capsys):
    from clear_training.cli import main as train_main

    ct = tmp_path / "ct.nrrd"
    assert main(["phantom", str(ct), "--shape", "8", "32", "32"]) == 0
    capsys.readouterr()
    # a run that cannot go on (no GPU here) is not blamed on the input
    assert main(["predict", str(ct), "--model", str(tiny_case_bundle), "--device", "gpu"]) == 1
    assert "clear-ct: failed: a GPU was requested" in capsys.readouterr().err
    # bad training input names the file, exit 2, no traceback
    assert train_main(["stats", "--out-dir", str(tmp_path / "s")]) == 2
    assert "give --survival" in capsys.readouterr().err
    assert train_main(["probe", str(tmp_path / "missing.h5")]) == 2
    assert "missing.h5" in capsys.readouterr().err
    # convert answers a wrong path or a target that is not a bundle before loading anything
    assert main(["convert", "moco", str(tmp_path / "none.pth.tar"), str(tmp_path / "b.zip")]) == 2
    assert "none.pth.tar: no such checkpoint file" in capsys.readouterr().err
    assert main(["convert", "moco", str(ct), str(tmp_path)]) == 2
    assert "a folder that is not a CLEAR bundle is already here" in capsys.readouterr().err
    assert ct.exists()


def test_engine_cli_starts_without_heavy_imports():
    """`clear-ct --help` and `info` must answer at once: numpy, pandas, SimpleITK and torch load on use."""
    code = "import sys, CLEARLib.cli; print(sorted({'torch', 'pandas', 'SimpleITK', 'numpy'} & set(sys.modules)))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


def test_demo_is_a_training_command():
    from clear_training.cli import build_parser

    args = build_parser().parse_args(["-v", "demo", "--out", "x", "--small"])
    assert args.verbose and args.small and args.out == "x"


def test_console_scripts_are_installed():
    bin_dir = Path(sys.executable).parent
    result = subprocess.run([str(bin_dir / "clear-ct"), "--version"], capture_output=True, text=True, check=True)
    assert result.stdout.startswith("clear-ct ")
    result = subprocess.run([str(bin_dir / "clear-train"), "--version"], capture_output=True, text=True, check=True)
    assert result.stdout.startswith("clear-train ")


def test_lesion_writes_features_takes_negative_seeds_and_seed_tables(tmp_path, tiny_lesion_bundle, capsys):
    import numpy as np
    import pandas as pd

    from CLEARLib.bundle import read_manifest
    from CLEARLib.io import read_ct, write_volume
    from CLEARLib.phantom import Lesion, make_phantom

    volume, lesions = make_phantom(
        shape_zyx=(40, 64, 64), spacing_xyz=(1.5, 1.5, 2.5), lesions=[Lesion("liver", (-20.0, 10.0, -15.0), 8.0, 120)]
    )
    ct = write_volume(volume, tmp_path / "ct.nrrd")
    out = tmp_path / "one"
    # A seed whose first value is negative, in the form the README shows.
    assert main(["lesion", str(ct), "--model", str(tiny_lesion_bundle), "--seed", "-20,10,-15", "--stability", "4",
                 "--out", str(out), "--device", "cpu"]) == 0  # fmt: skip
    summary = json.loads(capsys.readouterr().out)
    assert summary["seed_lps"] == [-20.0, 10.0, -15.0] and "feature_cosine_mean" in summary["stability"]
    sha = read_manifest(tiny_lesion_bundle).weights.sha256
    assert summary["bundle_sha256"] == sha
    assert sorted(p.name for p in out.iterdir()) == ["feature_cv.npy", "features.csv", "features.npy", "lesion.json"]
    table = pd.read_csv(out / "features.csv")
    features = np.load(out / "features.npy")
    assert features.shape == (1, 64) and list(table.columns[:6]) == ["image_path", "coordX", "coordY", "coordZ",
                                                                     "bundle", "bundle_sha256"]  # fmt: skip
    assert table.bundle_sha256[0] == sha
    np.testing.assert_allclose(table.filter(regex=r"^f\d+$").to_numpy(), features, rtol=1e-6)
    # A seed table, as FMCIB's users have: every image read once, one row per seed, bad rows reported.
    seeds = pd.DataFrame({"image_path": ["ct.nrrd", "ct.nrrd", "missing.nrrd"], "coordX": [-20.0, 0.0, 1.0],
                          "coordY": [10.0, 0.0, 1.0], "coordZ": [-15.0, -10.0, 1.0], "label": [1, 0, 1]})  # fmt: skip
    seeds.to_csv(tmp_path / "seeds.csv", index=False)
    assert main(["lesion", "--seeds", str(tmp_path / "seeds.csv"), "--model", str(tiny_lesion_bundle),
                 "--out", str(tmp_path / "table"), "--device", "cpu"]) == 0  # fmt: skip
    summary = json.loads(capsys.readouterr().out)
    assert (
        summary["scored"] == 2
        and summary["failed"][0]["row"] == 3
        and "missing.nrrd" in summary["failed"][0]["image_path"]
    )
    table = pd.read_csv(tmp_path / "table" / "features.csv")
    assert list(table.label) == [1, 0] and np.load(tmp_path / "table" / "features.npy").shape == (2, 64)
    np.testing.assert_allclose(np.load(tmp_path / "table" / "features.npy")[0], features[0], rtol=1e-5)
    # Bad tables name the file, row and column.
    seeds.loc[1, "coordY"] = "abc"
    seeds.to_csv(tmp_path / "bad.csv", index=False)
    assert main(["lesion", "--seeds", str(tmp_path / "bad.csv"), "--model", str(tiny_lesion_bundle)]) == 2
    assert "row 2, column coordY" in capsys.readouterr().err
    assert main(["lesion", str(ct), "--model", str(tiny_lesion_bundle)]) == 2
    assert "give one seed" in capsys.readouterr().err
    assert read_ct(ct).shape == volume.shape


def test_a_closed_pipe_is_not_a_traceback(tmp_path):
    """`clear-ct info CT | head -1`: the reader goes away before the output is written."""
    ct = tmp_path / "ct.nrrd"
    assert main(["phantom", str(ct), "--shape", "8", "32", "32"]) == 0
    clear_ct = Path(sys.executable).parent / "clear-ct"
    process = subprocess.Popen([str(clear_ct), "info", str(ct)], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    process.stdout.close()  # the reader is gone before the CT is even read
    stderr = process.stderr.read().decode()
    assert process.wait(timeout=60) == 1 and "Traceback" not in stderr, stderr
