"""Make Resources/Screenshot01.png for the Extensions Index from the demo's held-out CT.

    make demo && .venv/bin/python Resources/make_screenshot.py [--demo clear-output/demo]

Left: Slicer's Red slice view at the most attended slice, rendered offscreen by Slicer's own slice pipeline
(slicer-core, CLEARLib.render): the CT under the attention heat overlay, the lesion seed and its 50 mm patch.
Right: the attention curves against slice position, as the module plots them beside the slice views. It is a
rendering of Slicer's slice view by its libraries, not a screenshot of the application.
"""

from __future__ import annotations

import argparse
import io
import json
import tempfile
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from clear_training.demo import finding_attention  # noqa: E402
from CLEARLib.inference import CasePredictor  # noqa: E402
from CLEARLib.io import read_ct  # noqa: E402
from CLEARLib.outputs import attention_plot_png  # noqa: E402
from CLEARLib.render import render_case_view  # noqa: E402

HERE = Path(__file__).resolve().parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--demo", default="clear-output/demo", help="the folder `make demo` wrote")
    parser.add_argument("--out", default=str(HERE / "Screenshot01.png"))
    args = parser.parse_args()
    demo = Path(args.demo)
    summary = json.loads((demo / "summary.json").read_text())
    # The first held-out CT with a lesion whose most attended slice is on it (else the first with a lesion).
    cases = [c for c in summary["heldout_cases"] if c["lesion_slices"]]
    case = next((c for c in cases if c["top_slice_on_lesion"]), cases[0])
    volume = read_ct(case["path"])
    predictor = CasePredictor(summary["case_bundle"], device="cpu")
    result = finding_attention(case, predictor.predict(volume))  # as the demo's report shows it
    with tempfile.TemporaryDirectory() as tmp:
        view = render_case_view(
            volume, result, Path(tmp) / "view.png", predictor.bundle.windows[0], seed_lps=case["lesions_lps"][0]
        )
        view_pixels = plt.imread(view)
    z = volume.slice_positions_mm
    marks = [float(z[k]) for k in case["lesion_slices"]]
    plot = plt.imread(io.BytesIO(attention_plot_png(result.attention, "attention per slice", marks)))

    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 6), gridspec_kw={"width_ratios": [1, 1.25]})
    left.imshow(view_pixels)
    left.set_title("Red slice view at the most attended slice\n(rendered by Slicer's slice pipeline)", fontsize=11)
    right.imshow(plot)
    right.set_title("CLEAR attention beside the slice views (true lesion slices dotted)", fontsize=11)
    for axis in (left, right):
        axis.axis("off")
    probabilities = ", ".join(f"{k} {v:.2f}" for k, v in result.probabilities.items())
    fig.suptitle(f"CLEAR on a synthetic held-out CT: {probabilities}", fontsize=12)
    fig.tight_layout(rect=(0, 0, 1, 0.94))
    fig.savefig(args.out, dpi=100)
    print(args.out)


if __name__ == "__main__":
    main()
