"""Prognostic statistics of model scores (Kaplan-Meier with log-rank, Cox regression; lifelines) and
2D embeddings of features coloured by label (t-SNE; UMAP when umap-learn is installed)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd
from lifelines import CoxPHFitter, KaplanMeierFitter
from lifelines.statistics import logrank_test
from matplotlib.figure import Figure

from CLEARLib.files import write_atomic
from CLEARLib.outputs import figure_png


def survival_analysis(
    table: pd.DataFrame,
    score: str,
    time: str,
    event: str,
    out_dir: str | os.PathLike,
    covariates: list[str] | None = None,
    threshold: float | None = None,
) -> dict:
    """Split cases at the score's median (or `threshold`) into high/low risk: Kaplan-Meier curves with numbers
    at risk and a log-rank test; Cox regression of the continuous score (plus covariates)."""
    data = table[[score, time, event, *(covariates or [])]].dropna()
    cut = float(np.median(data[score])) if threshold is None else float(threshold)
    high = data[score] > cut
    test = logrank_test(data[time][high], data[time][~high], data[event][high], data[event][~high])
    groups = (("high risk", high), ("low risk", ~high))
    fig = Figure(figsize=(6, 4.6), dpi=100)
    ax = fig.add_subplot()
    for name, mask in groups:
        KaplanMeierFitter().fit(
            data[time][mask], data[event][mask], label=f"{name} (n={int(mask.sum())})"
        ).plot_survival_function(ax=ax)
    ax.set_title(f"{score} split at {cut:.3g}: log-rank p = {test.p_value:.3g}")
    ax.set_ylabel("survival probability")
    _numbers_at_risk(ax, data[time], groups, time)
    fig.tight_layout()
    out = Path(out_dir)
    write_atomic(out / f"km_{score}.png", figure_png(fig))
    return {
        "n": int(len(data)),
        "events": int(data[event].sum()),
        "threshold": cut,
        "logrank_p": float(test.p_value),
        "logrank_statistic": float(test.test_statistic),
        **cox_regression(data, time, event),
    }


def _numbers_at_risk(ax, durations: pd.Series, groups, time_label: str) -> None:
    """The table of numbers at risk under a KM plot, at the x ticks. Written here because lifelines'
    add_at_risk_counts goes through pyplot's global state, which CLEAR's pictures never touch."""
    from matplotlib.transforms import blended_transform_factory

    ticks = [t for t in ax.get_xticks() if 0 <= t <= durations.max()]
    ax.set_xticks(ticks)
    ax.set_xlabel("")
    below = blended_transform_factory(ax.transData, ax.transAxes)
    ax.text(0.0, -0.1, "at risk", transform=ax.transAxes, ha="right", va="top", fontsize=7, style="italic")
    for row, (name, mask) in enumerate(groups):
        y = -0.17 - 0.07 * row
        ax.text(-0.01, y, name, transform=ax.transAxes, ha="right", va="top", fontsize=7)
        for t in ticks:
            ax.text(t, y, str(int((durations[mask] >= t).sum())), transform=below, ha="center", va="top", fontsize=7)
    ax.text(0.5, -0.17 - 0.07 * len(groups), time_label, transform=ax.transAxes, ha="center", va="top")


def cox_regression(data: pd.DataFrame, time: str, event: str) -> dict:
    """Cox proportional hazards of every other column. A fit that does not converge or whose coefficients
    run off (separation: one group has all the events) is refitted with a small ridge penalty and said so;
    if that fails too, the problem is reported instead of a hazard ratio like 1e33."""
    import warnings

    from lifelines.exceptions import ConvergenceError, ConvergenceWarning

    problems = []
    for penalizer in (0.0, 0.1):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", ConvergenceWarning)
            try:
                cox = CoxPHFitter(penalizer=penalizer).fit(data, duration_col=time, event_col=event)
            except ConvergenceError as exc:
                problems.append(f"penalizer {penalizer}: {str(exc).splitlines()[0]}")
                continue
        summary = cox.summary
        runaway = (summary["coef"].abs() > 10).any() or not np.isfinite(summary["exp(coef) upper 95%"]).all()
        warned = [str(w.message).splitlines()[0] for w in caught if issubclass(w.category, ConvergenceWarning)]
        if runaway or warned:
            problems.append(f"penalizer {penalizer}: " + ("; ".join(warned) or "coefficients without bound"))
            continue
        return {
            "cox": {
                name: {
                    "hazard_ratio": float(summary.loc[name, "exp(coef)"]),
                    "ci95": [
                        float(summary.loc[name, "exp(coef) lower 95%"]),
                        float(summary.loc[name, "exp(coef) upper 95%"]),
                    ],
                    "p": float(summary.loc[name, "p"]),
                }
                for name in summary.index
            },
            "cox_penalizer": penalizer,
            "cox_note": "" if not problems else "unpenalised fit did not converge (" + "; ".join(problems) + ")",
            "concordance": float(cox.concordance_index_),
        }
    return {"cox": None, "cox_note": "Cox regression failed: " + "; ".join(problems), "concordance": None}


def embedding_plot(features: np.ndarray, labels, out_path: str | os.PathLike, method: str = "tsne", seed: int = 0):
    """2D map of features coloured by label, written as PNG; returns the coordinates."""
    if method == "umap":
        import umap  # optional dependency

        coords = umap.UMAP(random_state=seed).fit_transform(features)
    elif method == "tsne":
        from sklearn.manifold import TSNE

        perplexity = max(2.0, min(30.0, (len(features) - 1) / 3))
        coords = TSNE(n_components=2, perplexity=perplexity, random_state=seed, init="pca").fit_transform(features)
    else:
        raise ValueError(f"unknown method {method!r}: tsne or umap")
    labels = np.asarray(labels).astype(str)
    fig = Figure(figsize=(5, 5), dpi=100)
    ax = fig.add_subplot()
    for label in sorted(set(labels)):
        mask = labels == label
        ax.scatter(coords[mask, 0], coords[mask, 1], s=8, label=label)
    ax.legend(fontsize=7, markerscale=2)
    ax.set_title(f"{method.upper()} of features")
    ax.set_xticks([])
    ax.set_yticks([])
    fig.tight_layout()
    write_atomic(out_path, figure_png(fig))
    return coords
