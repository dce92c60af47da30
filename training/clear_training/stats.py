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
    """Split cases at the score's median (or `threshold`) into high/low risk: Kaplan-Meier curves and a
    log-rank test; Cox regression of the continuous score (plus covariates)."""
    data = table[[score, time, event, *(covariates or [])]].dropna()
    cut = float(np.median(data[score])) if threshold is None else float(threshold)
    high = data[score] > cut
    test = logrank_test(data[time][high], data[time][~high], data[event][high], data[event][~high])
    fig = Figure(figsize=(6, 4), dpi=100)
    ax = fig.add_subplot()
    for name, mask in (("high risk", high), ("low risk", ~high)):
        KaplanMeierFitter().fit(
            data[time][mask], data[event][mask], label=f"{name} (n={int(mask.sum())})"
        ).plot_survival_function(ax=ax)
    ax.set_title(f"{score} split at {cut:.3g}: log-rank p = {test.p_value:.3g}")
    ax.set_xlabel(time)
    ax.set_ylabel("survival probability")
    fig.tight_layout()
    out = Path(out_dir)
    write_atomic(out / f"km_{score}.png", figure_png(fig))
    cox = CoxPHFitter().fit(data, duration_col=time, event_col=event)
    summary = cox.summary
    return {
        "threshold": cut,
        "logrank_p": float(test.p_value),
        "logrank_statistic": float(test.test_statistic),
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
        "concordance": float(cox.concordance_index_),
    }


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
