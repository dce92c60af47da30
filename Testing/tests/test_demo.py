"""The end-to-end demo in its reduced size: report, bundles, and attention on the lesion slices."""

from __future__ import annotations

import json

from clear_training.demo import SMALL, run_demo
from CLEARLib.bundle import load_bundle
from CLEARLib.inference import CasePredictor
from CLEARLib.io import read_ct


def test_demo_end_to_end(tmp_path):
    summary = run_demo(tmp_path / "demo", SMALL, log=lambda *_: None)
    report = tmp_path / "demo" / "report"
    for name in ("index.html", "attention.png", "top_slices.png", "roc.png"):
        assert (report / name).stat().st_size > 0, name
    page = (report / "index.html").read_text()
    assert "Held-out CT: predictions" in page and "Cross-validation" in page and "stability" in page
    case = load_bundle(summary["case_bundle"])
    assert case.manifest.head.type == "abmil_ensemble" and case.labels == ["liver", "lung"]
    assert load_bundle(summary["lesion_bundle"]).kind == "lesion"
    # The held-out CT has lesions, and the most attended slices are lesion slices.
    lesion_slices = {k for slices in summary["heldout_lesion_slices"].values() for k in slices}
    assert lesion_slices
    top = summary["heldout_top_slices"]
    assert top[0] in lesion_slices or any(abs(top[0] - k) <= 1 for k in lesion_slices), (top, lesion_slices)
    # The case bundle the demo made runs on the demo's held-out CT through the same engine.
    result = CasePredictor(case, device="cpu").predict(read_ct(tmp_path / "demo" / "data" / "heldout.nii.gz"))
    assert result.probabilities == summary["heldout_probabilities"]
    assert json.loads((tmp_path / "demo" / "summary.json").read_text())["report"] == summary["report"]
