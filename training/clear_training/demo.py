"""`clear-train demo`: CLEAR end to end on a deterministic synthetic cohort, with an HTML report.

Synthetic CTs with lesions in known organs go through the real pipeline with a small encoder:
a short LeCL pretraining, feature extraction, ABMIL cross-validation, export of a case bundle,
prediction on a held-out CT, and a lesion model with a seed and its stability. The bundles it makes
load in the Slicer module and in `clear-ct predict` / `clear-ct lesion`.
"""

from __future__ import annotations

import html
import importlib.util
import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import yaml

from CLEARLib.files import write_atomic
from CLEARLib.io import write_volume
from CLEARLib.outputs import attention_plot_png, top_slices_png
from CLEARLib.phantom import Lesion, make_phantom
from CLEARLib.preprocess import resolve_windows
from CLEARLib.progress import ProgressBar

LABELS = ["liver", "lung"]


@dataclass(frozen=True)
class DemoSize:
    cases: int = 96
    shape: tuple[int, int, int] = (24, 80, 80)
    spacing: tuple[float, float, float] = (4.0, 4.0, 8.0)
    image_size: int = 64
    pretrain_epochs: int = 10
    mil_epochs: int = 200
    mil_lr: float = 1e-3
    folds: int = 4
    lesion_epochs: int = 6
    stability: int = 20


# The tests run the same cohort, pretraining and MIL as the full demo (the attention check needs the
# encoder that much training), with a shorter lesion-model run.
SMALL = DemoSize(lesion_epochs=1, stability=4)


def _case(i: int, size: DemoSize, rng) -> tuple:
    """One synthetic CT: a liver lesion and/or a lung nodule, each present with probability 1/2."""
    nz, ny, nx = size.shape
    sx, sy, sz = size.spacing
    extent = np.array([nx * sx, ny * sy, nz * sz])
    lesions, labels = [], {}
    liver = rng.random() < 0.5
    lung = rng.random() < 0.5
    if liver:  # inferior half, patient's right, inside the phantom's liver
        lesions.append(Lesion("liver", (-0.17 * extent[0], -0.02 * extent[1], -0.22 * extent[2]), 3.0 * sx, 200))
    if lung:  # superior half, patient's left, inside the lung
        lesions.append(Lesion("lung", (0.17 * extent[0], -0.02 * extent[1], 0.25 * extent[2]), 3.0 * sx, 60))
    labels = {"liver": int(liver), "lung": int(lung)}
    volume, _ = make_phantom(size.shape, size.spacing, lesions=lesions, seed=1000 + i)
    return volume, lesions, labels


def _lesion_slices(volume, lesion) -> list[int]:
    z = volume.slice_positions_mm
    return [int(k) for k in np.flatnonzero(np.abs(z - lesion.center_lps[2]) < lesion.radius_mm)]


def _yaml(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data))
    return path


def _short_run(name: str, out_dir: Path, epochs: int) -> dict:
    """The run section of the demo's short trainings: no warm-up, a log line every 5 steps."""
    return {"name": name, "out_dir": str(out_dir), "epochs": epochs, "warmup_epochs": 0, "log_every_steps": 5}


def run_demo(out: str | Path, size: DemoSize = DemoSize(), log=print, quiet: bool = False) -> dict:
    import torch

    from CLEARLib.inference import CasePredictor, LesionPredictor

    from .config import LesionPretrainConfig, MilConfig, load_config
    from .data import prepare_ct
    from .export import export_encoder, export_lesion_bundle
    from .extract import extract
    from .lesion import LesionFinetuner
    from .mil import run_mil
    from .pretrain import Trainer

    torch.manual_seed(0)
    started = time.perf_counter()
    out = Path(out).resolve()  # the configs written below must not depend on the working directory
    data = out / "data"
    data.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    timings = {}

    # 1. The cohort, its clinical table, key slices (for LeCL) and lesion seeds (for the lesion model).
    log(f"[1/6] synthetic cohort of {size.cases} CTs + 1 held-out CT in {data}")
    cohort, clinical, keys, seeds, truth = [], [], [], [], {}
    for i in range(size.cases + 1):
        volume, lesions, labels = _case(i, size, rng)
        case = f"case{i:03d}" if i < size.cases else "heldout"
        path = write_volume(volume, data / f"{case}.nii.gz")
        truth[case] = (volume, lesions, labels)
        if i == size.cases:
            continue
        cohort.append({"case_id": case, "path": path.name, "patient_id": f"patient{i:03d}"})
        clinical.append({"case_id": case, "patient_id": f"patient{i:03d}", **labels})
        for lesion in lesions:
            k = int(round(volume.lps_to_index(lesion.center_lps)[0]))
            centre = volume.lps_to_index(lesion.center_lps)
            r = lesion.radius_mm / volume.spacing[0]
            keys.append(
                {
                    "case_id": case,
                    "key_slice_index": k,
                    "x1": centre[2] - r,
                    "y1": centre[1] - r,
                    "x2": centre[2] + r,
                    "y2": centre[1] + r,
                    "lesion_type": 4 if lesion.organ == "liver" else 5,
                }
            )
            seeds.append(
                {
                    "image_path": path.name,
                    "coordX": lesion.center_lps[0],
                    "coordY": lesion.center_lps[1],
                    "coordZ": lesion.center_lps[2],
                    "label": "dense" if lesion.hu > 100 else "soft",
                }
            )
    pd.DataFrame(cohort).to_csv(data / "cohort.csv", index=False)
    pd.DataFrame(clinical).to_csv(data / "clinical.csv", index=False)
    pd.DataFrame(keys).to_csv(data / "key_slices.csv", index=False)
    pd.DataFrame(seeds).to_csv(data / "seeds.csv", index=False)
    timings["cohort"] = time.perf_counter() - started

    # 2. A short LeCL pretraining of a small MambaOut on the cohort's slices.
    log("[2/6] LeCL pretraining of a small MambaOut")
    t = time.perf_counter()
    prepare_ct(data / "cohort.csv", data / "store", key_slices_csv=data / "key_slices.csv", size=size.shape[1])
    pretrain_cfg = _yaml(
        out / "pretrain.yaml",
        {
            "run": _short_run("demo-encoder", out / "pretrain", size.pretrain_epochs),
            "data": {"store": str(data / "store"), "image_size": size.image_size},
            "model": {
                "encoder": "mambaout_femto",
                "encoder_kwargs": {"depths": [1, 1, 2, 1], "dims": [16, 24, 48, 64]},
                "dim": 32,
                "mlp_dim": 128,
                # The demo's tiny encoder, trained for minutes, puts its attention on the lesion slices
                # reliably only without the predictor's final BatchNorm (measured: with it, the
                # held-out CT's most attended slice missed the lesion).
                "predictor_last_bn": False,
            },
            "method": {"name": "lecl", "lam": 1.0},
            "optim": {"lr": 0.02, "batch_size": 32, "weight_decay": 0.0},
        },
    )
    trainer = Trainer(load_config(pretrain_cfg))
    with ProgressBar("pretrain", total=trainer.total_steps(), unit="step", quiet=quiet) as bar:
        history = trainer.fit(progress=bar)
    encoder_bundle = export_encoder(out / "pretrain" / "last.pt", out / "bundles" / "demo-encoder.zip")
    timings["pretrain"] = time.perf_counter() - t

    # 3. Features of every case.
    log("[3/6] feature extraction")
    t = time.perf_counter()
    with ProgressBar("extract", quiet=quiet) as bar:
        extract(encoder_bundle, data / "cohort.csv", out / "features", device="cpu", rank=0, world_size=1, progress=bar)
    timings["extract"] = time.perf_counter() - t

    # 4. ABMIL cross-validation and the fold ensemble as a case bundle.
    log("[4/6] ABMIL cross-validation")
    t = time.perf_counter()
    mil_cfg = _yaml(
        out / "mil.yaml",
        {
            "run": {"name": "demo-lesion-location", "out_dir": str(out / "mil"), "device": "cpu"},
            "data": {
                "features": str(out / "features"),
                "table": str(data / "clinical.csv"),
                "task": "multilabel",
                "labels": LABELS,
                "folds": size.folds,
                "test_fraction": 0.25,
            },
            "model": {"hidden_dim": 64, "attention_dim": 32, "dropout": 0.0},
            "train": {
                "lr": size.mil_lr,
                "weight_decay": 0.0,
                "batch_size": 8,
                "epochs": size.mil_epochs,
                "patience": 40,
            },
            "evaluation": {"bootstrap": 200, "attention_plots": 0},
            "export": {"encoder_bundle": str(encoder_bundle), "name": "demo-lesion-location"},
        },
    )
    with ProgressBar("mil", quiet=quiet) as bar:
        metrics = run_mil(load_config(mil_cfg, model=MilConfig), progress=bar)
    case_bundle = Path(metrics["bundle"])
    (out / "bundles").mkdir(exist_ok=True)
    case_bundle = case_bundle.replace(out / "bundles" / case_bundle.name)
    timings["mil"] = time.perf_counter() - t

    # 5. The held-out CT: predictions (with the spread of the fold models) and attention.
    log("[5/6] prediction on the held-out CT")
    volume, lesions, labels = truth["heldout"]
    predictor = CasePredictor(case_bundle, device="cpu")
    result = predictor.predict(volume)
    head = predictor.bundle.head
    embeddings = torch.from_numpy(result.embeddings)
    with torch.no_grad():
        members = np.stack([torch.sigmoid(m(embeddings)[0]).numpy() for m in head.members])
    lesion_slices = {lesion.organ: _lesion_slices(volume, lesion) for lesion in lesions}
    top = result.top_slices(4)

    # 6. A lesion model: a short supervised training on the seeds, then the held-out lesion with stability.
    log("[6/6] lesion model and seed stability")
    t = time.perf_counter()
    lesion_cfg = _yaml(
        out / "lesion.yaml",
        {
            "run": _short_run("demo-lesion", out / "lesion", size.lesion_epochs),
            "data": {
                "seeds": str(data / "seeds.csv"),
                "cache_dir": str(data / "lesion_cache"),
                "negatives_per_seed": 1,
            },
            "model": {
                "encoder_kwargs": {"layers": [1, 1, 1, 1], "block_inplanes": [8, 16, 16, 32], "widen_factor": 1.0}
            },
            "optim": {"name": "adamw", "lr": 0.5, "batch_size": 8, "weight_decay": 0.0},
        },
    )
    finetuner = LesionFinetuner(load_config(lesion_cfg, model=LesionPretrainConfig))
    with ProgressBar("lesion-finetune", total=finetuner.total_steps(), unit="step", quiet=quiet) as bar:
        finetuner.fit(progress=bar)
    lesion_bundle = export_lesion_bundle(out / "lesion" / "last.pt", out / "bundles" / "demo-lesion.zip")
    lesion_result = None
    if lesions:
        lesion_result = LesionPredictor(lesion_bundle, device="cpu").predict(
            volume, lesions[0].center_lps, stability=size.stability
        )
    timings["lesion"] = time.perf_counter() - t

    report = _report(
        out, result, members, labels, lesion_slices, top, volume, metrics, lesion_result, lesions, history, timings
    )
    summary = {
        "report": str(report),
        "case_bundle": str(case_bundle),
        "encoder_bundle": str(encoder_bundle),
        "lesion_bundle": str(lesion_bundle),
        "heldout_truth": labels,
        "heldout_probabilities": result.probabilities,
        "heldout_lesion_slices": lesion_slices,
        "heldout_top_slices": [int(s) for s in top.slice_index],
        "heldout_lesions_lps": [[float(v) for v in lesion.center_lps] for lesion in lesions],
        "seconds": round(time.perf_counter() - started, 1),
    }
    write_atomic(out / "summary.json", json.dumps(summary, indent=2))
    return summary


def _img(name: str) -> str:
    return f'<img src="{html.escape(name)}" style="max-width:100%">'


def _report(
    out, result, members, labels, lesion_slices, top, volume, metrics, lesion_result, lesions, history, timings
) -> Path:
    figures = out / "report"
    z = volume.slice_positions_mm
    marks = [float(z[k]) for slices in lesion_slices.values() for k in slices]
    write_atomic(figures / "attention.png", attention_plot_png(result.attention, "held-out CT: attention", marks))
    windows = resolve_windows(["abdomen", "lung"])
    write_atomic(figures / "top_slices.png", top_slices_png(volume, result.attention, windows, k=len(top)))
    slice_view = ""
    if importlib.util.find_spec("slicer") is not None:  # slicer-core: Slicer's own slice pipeline
        from CLEARLib.render import render_case_view

        seed = lesions[0].center_lps if lesions else None
        render_case_view(volume, result, figures / "slice_view.png", windows[0], seed_lps=seed)
        slice_view = (
            "<p>Slicer's Red slice view at the most attended slice (rendered offscreen by Slicer's slice pipeline "
            "from slicer-core): the CT under the attention heat overlay, with the lesion seed and its 50 mm patch "
            "where they cross the slice.</p>" + _img("slice_view.png")
        )
    for name in ("roc.png", "pr.png"):
        if (out / "mil" / name).exists():
            write_atomic(figures / name, (out / "mil" / name).read_bytes())
    rows = "".join(
        f"<tr><td>{label}</td><td>{labels[label]}</td><td>{result.probabilities[label]:.3f}</td>"
        f"<td>{members[:, j].min():.3f} - {members[:, j].max():.3f}</td></tr>"
        for j, label in enumerate(result.labels)
    )
    test = metrics.get("ensemble_test", {})
    ci = metrics.get("ensemble_test_ci95", {})
    cv_rows = "".join(
        f"<tr><td>{label}</td><td>{_fmt(test.get(label, {}).get('auroc'))}</td>"
        f"<td>{_fmt_ci(ci.get(label, {}).get('auroc'))}</td><td>{_fmt(test.get(label, {}).get('auprc'))}</td>"
        f"<td>{_fmt(metrics.get('across_folds', {}).get(label, {}).get('auroc_mean'))}</td></tr>"
        for label in labels
    )
    lesion_html = "<p>The held-out CT has no lesion.</p>"
    if lesion_result is not None:
        stab = lesion_result.stability
        lesion_html = (
            f"<p>Seed at the {lesions[0].organ} lesion, LPS {np.round(lesion_result.seed_lps, 1).tolist()} mm.</p>"
            "<table><tr><th>class</th><th>probability</th><th>stability mean &plusmn; sd over "
            f"{stab['n']} seeds (sd {stab['sd_mm']:.0f} mm)</th></tr>"
            + "".join(
                f"<tr><td>{k}</td><td>{v:.3f}</td><td>{stab['mean'][k]:.3f} &plusmn; {stab['std'][k]:.3f}</td></tr>"
                for k, v in lesion_result.probabilities.items()
            )
            + "</table>"
        )
    loss = [r["loss"] for r in history]
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>CLEAR demo report</title>
<style>body{{font-family:sans-serif;max-width:980px;margin:2em auto;color:#222}}table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:4px 10px}}h2{{border-bottom:1px solid #ddd}}</style></head><body>
<h1>CLEAR demo</h1>
<p>A synthetic cohort with lesions in known organs, run through the real pipeline with a small encoder:
LeCL pretraining ({len(loss)} steps, loss {loss[0]:.3f} &rarr; {loss[-1]:.3f}), feature extraction, ABMIL
cross-validation, a case bundle, and a prediction on a CT the models never saw.</p>
<h2>Held-out CT: predictions</h2>
<table><tr><th>label</th><th>truth</th><th>probability (ensemble)</th>
<th>range over the fold models</th></tr>{rows}</table>
<h2>Where the model looked</h2>
<p>Attention per window against slice position; dotted lines mark the true lesion slices
({html.escape(json.dumps(lesion_slices))}).</p>{_img("attention.png")}
<p>The most attended slices:</p>{_img("top_slices.png")}
{slice_view}
<h2>Cross-validation</h2>
<table><tr><th>label</th><th>test AUROC (ensemble)</th><th>95% CI (bootstrap)</th><th>test AUPRC</th>
<th>mean AUROC of the folds</th></tr>{cv_rows}</table>
{_img("roc.png")}{_img("pr.png")}
<h2>Lesion model</h2>{lesion_html}
<h2>Time</h2><p>{html.escape(", ".join(f"{k} {v:.0f} s" for k, v in timings.items()))}</p>
<p>Bundles in <code>bundles/</code> load in the Slicer module and in <code>clear-ct predict</code> /
<code>clear-ct lesion</code>.</p></body></html>"""
    return write_atomic(figures / "index.html", page)


def _fmt(value) -> str:
    return "n/a" if value is None or (isinstance(value, float) and np.isnan(value)) else f"{value:.3f}"


def _fmt_ci(value) -> str:
    return "n/a" if not value else f"{value[0]:.3f} - {value[1]:.3f}"


__all__ = ["SMALL", "DemoSize", "run_demo"]
