"""Pictures of results: attention curves and top-slice thumbnails, as PNG bytes (written with CLEARLib.files)."""

from __future__ import annotations

import io

import pandas as pd


def figure_png(fig) -> bytes:
    """A matplotlib Figure as PNG bytes. Pictures are drawn with the object API (matplotlib.figure.Figure):
    no pyplot state and no global backend change (Slicer has its own)."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    return buffer.getvalue()


def relative_attention(attention: pd.DataFrame) -> pd.Series:
    """Attention as a multiple of uniform: 1 means the weight every instance would get if all were equal
    (ABMIL's softmax runs over all instances of the case, both windows together)."""
    return attention["attention"] * len(attention)


def top_attention(attention: pd.DataFrame, k: int) -> pd.DataFrame:
    """The k most attended instances, highest first, with their attention as a multiple of uniform."""
    table = attention.assign(relative=relative_attention(attention))
    return table.sort_values("relative", ascending=False, kind="stable").head(k)


def attention_plot_png(attention: pd.DataFrame, title: str = "", lesion_z_mm=(), top_k: int = 5) -> bytes:
    """One attention curve per window against slice position (mm; slice index on the top axis), as PNG bytes.

    Attention is shown as a multiple of uniform on an axis from 0 (dashed line: uniform); the `top_k` most
    attended instances are marked with their slice index; `lesion_z_mm` draws dotted lines (true lesions).
    """
    import numpy as np
    from matplotlib.figure import Figure

    table = attention.assign(relative=relative_attention(attention))
    fig = Figure(figsize=(8, 3.6), dpi=110)
    ax = fig.add_subplot()
    for window, rows in table.groupby("window", sort=False):
        rows = rows.sort_values("z_mm")
        ax.plot(rows.z_mm, rows.relative, label=f"{window} window", linewidth=1.4)
    top = top_attention(attention, top_k)
    ax.scatter(top.z_mm, top.relative, s=30, facecolors="none", edgecolors="black", linewidths=1.0, zorder=3,
               label=f"top {len(top)} instances")  # fmt: skip
    for row in top.itertuples():
        ax.annotate(f"{int(row.slice_index)}", (row.z_mm, row.relative), textcoords="offset points", xytext=(0, 5),
                    ha="center", fontsize=7)  # fmt: skip
    for z in lesion_z_mm:
        ax.axvline(z, color="0.4", linestyle=":", linewidth=1)
    ax.axhline(1.0, color="0.5", linestyle="--", linewidth=0.8, label="uniform")
    ax.set_ylim(0, max(1.2, float(table.relative.max()) * 1.15))
    ax.set_xlabel("slice position S (mm)")
    ax.set_ylabel("attention (x uniform)")
    slices = table.drop_duplicates("slice_index").sort_values("slice_index")
    if len(slices) > 1:  # slice index on the top axis: z is linear in the index on an axial grid
        slope, intercept = np.polyfit(slices.slice_index, slices.z_mm, 1)
        if abs(slope) > 0:
            top_axis = ax.secondary_xaxis(
                "top", functions=(lambda z: (z - intercept) / slope, lambda k: intercept + slope * k)
            )
            top_axis.set_xlabel("slice index", fontsize=8)
    ax.set_title(title, fontsize=10)
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=4, fontsize=8, frameon=False)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return figure_png(fig)


def top_slices_png(volume, attention: pd.DataFrame, windows, k: int = 5) -> bytes:
    """Thumbnails of the k most attended instances of a case's attention table, each slice shown under its
    own window, titled with its index, window, position and attention (x uniform)."""
    import numpy as np
    from matplotlib.figure import Figure

    bounds = {w.name: (w.low, w.high) for w in windows}
    top = top_attention(attention, k)
    n = max(len(top), 1)
    fig = Figure(figsize=(2.2 * n, 2.9), dpi=90)
    for i, row in enumerate(top.itertuples()):
        low, high = bounds.get(row.window, (-175.0, 275.0))
        ax = fig.add_subplot(1, n, i + 1)
        ax.imshow(np.clip((volume.hu[int(row.slice_index)] - low) / (high - low), 0, 1), cmap="gray")
        label = f"slice {int(row.slice_index)} ({row.window})\n{row.z_mm:.1f} mm, {row.relative:.2f}x"
        ax.set_title(label, fontsize=7)
        ax.axis("off")
    fig.tight_layout(pad=1.5)
    return figure_png(fig)


def stability_plot_png(result, title: str = "") -> bytes:
    """A lesion result's seed stability: each class's probability at every perturbed seed against how far
    that seed moved from the clicked one (mm), with the clicked seed's probability as a line."""
    import numpy as np
    from matplotlib.figure import Figure

    stability = result.stability
    if not stability or "drawn_probabilities" not in stability:
        raise ValueError("the lesion result has no stability run with probabilities (predict with stability=N)")
    moved = np.linalg.norm(np.asarray(stability["seeds_lps"]) - np.asarray(result.seed_lps), axis=1)
    fig = Figure(figsize=(6, 3.4), dpi=110)
    ax = fig.add_subplot()
    for j, (label, clicked) in enumerate(result.probabilities.items()):
        line = ax.axhline(clicked, linestyle="--", linewidth=0.9, color=f"C{j}")
        ax.scatter(moved, stability["drawn_probabilities"][:, j], s=14, color=line.get_color(),
                   label=f"{label}: {clicked:.2f} at the seed, {stability['mean'][label]:.2f} "
                   f"\u00b1 {stability['std'][label]:.2f} moved")  # fmt: skip
    ax.set_ylim(-0.03, 1.03)
    ax.set_xlabel("seed moved by (mm)")
    ax.set_ylabel("probability")
    ax.set_title(
        title or f"seed stability: {stability['n']} seeds drawn with sd {stability['sd_mm']:.0f} mm", fontsize=10
    )
    ax.legend(fontsize=7, loc="center right")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return figure_png(fig)
