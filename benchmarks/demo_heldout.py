"""Held-out AUROC of finished demos' bundles on further CTs drawn as the demo draws its held-out set: CT j from seed
HELDOUT_SEED + j with the findings of HELDOUT_PATTERN[j % 4]. The demo's own 48 are j = 0-47; 48 CTs cannot tell
AUROCs apart by less than about 0.02 (one CT moves it that much), so more CTs measure a setting better. Prints JSON.

Usage: python benchmarks/demo_heldout.py DEMO_DIR [DEMO_DIR ...] [--first 144] [--count 192] [--baseline]
(--first 0 --count 48 reproduces each demo's summary.json.)
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from clear_training.demo import HELDOUT_PATTERN, LABELS, DemoSize, heldout_ct, heldout_metrics, score_heldout
from CLEARLib.phantom import make_ct_like_case


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("demos", nargs="+", type=Path, help="output folders of `clear-train demo`")
    parser.add_argument(
        "--first",
        type=int,
        default=144,
        help="first held-out CT (default: the first after the 144 the README's settings were chosen on)",
    )
    parser.add_argument("--count", type=int, default=192, help="how many held-out CTs, from --first on")
    parser.add_argument("--baseline", action="store_true", help="score the baseline bundles too")
    args = parser.parse_args()
    if args.first < 0 or args.count < len(HELDOUT_PATTERN):
        parser.error(f"--first must be >= 0 and --count >= {len(HELDOUT_PATTERN)} (positives and negatives per label)")
    started = time.perf_counter()
    first, last = args.first, args.first + args.count - 1
    cases = []
    for j in range(first, last + 1):
        organs, seed = heldout_ct(j)
        volume, _ = make_ct_like_case(seed, organs, matrix=DemoSize().matrix)
        cases.append({"volume": volume, "truth": {label: int(label in organs) for label in LABELS}})
    report = {
        "cts": {"first": args.first, "count": args.count, "seeds": [heldout_ct(j)[1] for j in (first, last)]},
        "positives": {label: sum(case["truth"][label] for case in cases) for label in LABELS},
        "bundles": {},
    }
    names = ["demo-lesion-location"] + (["baseline"] if args.baseline else [])
    for demo in args.demos:
        for name in names:
            bundle = demo / "bundles" / f"{name}.zip"
            scores = heldout_metrics(cases, score_heldout(bundle, cases))
            report["bundles"][str(bundle)] = {
                "auroc": {label: scores["per_label"][label]["auroc"] for label in LABELS},
                "auroc_ci95": {label: scores["ci95"][label]["auroc"] for label in LABELS},
                "f1": {label: scores["per_label"][label]["f1"] for label in LABELS},
            }
    report["seconds"] = round(time.perf_counter() - started, 1)
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
