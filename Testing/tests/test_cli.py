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


def test_console_scripts_are_installed():
    bin_dir = Path(sys.executable).parent
    result = subprocess.run([str(bin_dir / "clear-ct"), "--version"], capture_output=True, text=True, check=True)
    assert result.stdout.startswith("clear-ct ")
    result = subprocess.run([str(bin_dir / "clear-train"), "--version"], capture_output=True, text=True, check=True)
    assert result.stdout.startswith("clear-train ")
