"""`clear-ct`: the engine's command line. Every subcommand calls the same engine functions as Slicer.

Heavy modules (numpy, pandas, SimpleITK, torch) are imported inside the commands that use them, so that
`--help` answers at once.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import sys
import time
from pathlib import Path

from . import __version__
from .errors import CLEARInputError, run_command
from .files import check_output_folder
from .progress import ProgressBar


def add_backend_options(parser: argparse.ArgumentParser) -> None:
    """--backend and --precision of the slice encoder (shared with clear-train extract)."""
    parser.add_argument(
        "--backend",
        default="auto",
        choices=["auto", "torch", "onnxruntime"],
        help="slice-encoder runtime; auto: ONNX Runtime on the CPU when installed (checked against torch), else torch",
    )
    parser.add_argument(
        "--precision",
        default="fp32",
        choices=["fp32", "bf16"],
        help="bf16 on the CPU needs AVX-512 BF16 or AMX; features then differ from fp32 by about 1e-2 (never default)",
    )


def encoder_options(args) -> dict:
    """The CasePredictor arguments of a command line: device, batch size, backend and precision."""
    return {"device": args.device, "batch_size": args.batch_size, "backend": args.backend, "precision": args.precision}


def _add_read_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--series-uid", help="SeriesInstanceUID to read from a DICOM folder with several series")
    parser.add_argument("--allow-non-ct", action="store_true", help="read a series whose modality is not CT")
    parser.add_argument(
        "--resample-oblique", action="store_true", help="resample an oblique acquisition onto an axial grid"
    )


def _read(args, path=None):
    """The CT at `path` (default: the command's), with the command's read options."""
    from .io import read_ct

    return read_ct(
        path or args.path,
        series_uid=args.series_uid,
        allow_non_ct=args.allow_non_ct,
        resample_oblique=args.resample_oblique,
    )


def _format_info(info: dict) -> str:
    hu = info["hu"]
    lines = [
        f"source         {info['source']}",
        f"shape (z,y,x)  {info['shape_zyx']}  ({info['dtype']})",
        f"spacing (x,y,z) mm  {', '.join(f'{s:.4g}' for s in info['spacing_xyz_mm'])}",
        f"origin LPS mm  {', '.join(f'{v:.2f}' for v in info['origin_lps_mm'])}",
        "direction LPS  " + "  ".join("[" + ", ".join(f"{v:.4f}" for v in row) + "]" for row in info["direction_lps"]),
        "extent LPS mm  " + ", ".join(f"{a:.1f}..{b:.1f}" for a, b in info["extent_lps_mm"]),
        f"slices z mm    {info['slice_z_mm'][0]:.2f} (slice 0, inferior) .. {info['slice_z_mm'][1]:.2f}",
        f"HU             min {hu['min']:.0f}  p1 {hu['p1']:.0f}  median {hu['median']:.0f}  "
        f"p99 {hu['p99']:.0f}  max {hu['max']:.0f}  mean {hu['mean']:.1f}  std {hu['std']:.1f}  "
        f"air {100 * hu['air_fraction']:.1f}%",
    ]
    lines += [f"{k:<20} {v}" for k, v in info["meta"].items()]
    return "\n".join(lines)


def cmd_info(args) -> int:
    info = _read(args).describe()
    print(json.dumps(info, indent=2) if args.json else _format_info(info))
    return 0


def cmd_phantom(args) -> int:
    from .io import write_volume
    from .phantom import make_phantom

    volume, lesions = make_phantom(
        shape_zyx=tuple(args.shape), spacing_xyz=tuple(args.spacing), seed=args.seed, noise_hu=args.noise
    )
    path = write_volume(volume, args.out)
    print(f"wrote {path}")
    for lesion in lesions:
        c = ", ".join(f"{v:.1f}" for v in lesion.center_lps)
        print(f"  lesion in {lesion.organ}: centre LPS ({c}) mm, radius {lesion.radius_mm:.1f} mm, {lesion.hu} HU")
    return 0


def _seed(text: str):
    try:
        values = [float(v) for v in text.split(",")]
    except ValueError:
        values = []
    if len(values) != 3:
        raise argparse.ArgumentTypeError(f"a seed is x,y,z in mm, got {text!r}")
    return values


def cmd_predict(args) -> int:
    import pandas as pd

    from .files import staged_outputs, write_atomic, write_csv, write_json
    from .inference import CasePredictor
    from .outputs import attention_plot_png, top_slices_png

    if args.out:
        check_output_folder(args.out)  # before minutes of encoding
    predictor = CasePredictor(args.model, **encoder_options(args))
    if args.attention_of is not None and args.attention_of not in predictor.labels:
        raise CLEARInputError(f"--attention-of {args.attention_of}: the bundle's labels are {predictor.labels}")
    started = time.perf_counter()
    volume = _read(args)
    read_s = time.perf_counter() - started
    with ProgressBar("predict", quiet=args.quiet) as bar:
        result = predictor.predict(volume, progress=bar)
    summary = {"ct": str(args.path), "input": volume.input_record(), **result.to_dict()}
    summary["timings_s"] = {"read": round(read_s, 4), **summary["timings_s"]}
    summary["bundle_sha256"] = predictor.bundle.manifest.weights.sha256
    print(json.dumps(summary, indent=2))
    if args.out:
        shown = result if args.attention_of is None else result.for_labels(args.attention_of)  # what is drawn
        with staged_outputs(args.out) as out:  # the set appears whole, or not at all
            write_json(out / "predictions.json", summary)
            probabilities = pd.DataFrame({"label": result.labels, "probability": result.probabilities.values()})
            write_csv(out / "predictions.csv", probabilities)
            write_csv(out / "attention.csv", result.attention)
            title = f"{Path(args.path).name}: attention" + (f" for {args.attention_of}" if args.attention_of else "")
            write_atomic(out / "attention.png", attention_plot_png(shown.attention, title=title))
            write_atomic(out / "top_slices.png", top_slices_png(volume, shown.attention, predictor.bundle.windows))
        written = "predictions.json, predictions.csv, attention.csv, attention.png, top_slices.png"
        if not args.no_slice_view and importlib.util.find_spec("slicer") is not None:
            # after the results are in place: the render adds a picture, it cannot cost them
            from .render import render_case_view

            render_case_view(volume, shown, Path(args.out) / "slice_view.png", predictor.bundle.windows[0])
            written += ", slice_view.png (Slicer's Red view at the most attended slice)"
        print(f"wrote {written} to {args.out}", file=sys.stderr)
    return 0


def _feature_rows(predictor, seeds, features):
    """One row per seed: the seed's columns, the bundle and its weights' sha256, then f0 ... f{D-1}."""
    import pandas as pd

    manifest = predictor.bundle.manifest
    values = pd.DataFrame(features, columns=[f"f{i}" for i in range(features.shape[1])], index=seeds.index)
    info = seeds.assign(bundle=manifest.name, bundle_sha256=manifest.weights.sha256)
    return pd.concat([info, values], axis=1)


def cmd_lesion(args) -> int:
    import pandas as pd

    from .files import staged_outputs, write_csv, write_json, write_npy
    from .inference import LesionPredictor

    if (args.seed is None) == (args.seeds is None):
        raise CLEARInputError("give one seed (--seed x,y,z with the CT) or a seed table (--seeds table.csv)")
    if args.seeds is None and args.path is None:
        raise CLEARInputError("--seed needs the CT it lies in")
    if args.stability < 0:
        raise CLEARInputError(f"--stability must be 0 or more, got {args.stability}")
    if args.stability and args.seeds is not None:
        raise CLEARInputError("--stability applies to one seed (--seed), not to a seed table")
    out = Path(args.out) if args.out else None
    if out:
        check_output_folder(out)
    predictor = LesionPredictor(args.model, device=args.device, border=args.border)
    if args.seeds is not None:
        return _lesion_table(args, predictor, out)
    volume = _read(args)
    with ProgressBar("lesion", total=1 + args.stability, unit="patch", quiet=args.quiet) as bar:
        result = predictor.predict(volume, args.seed, coord=args.coord, stability=args.stability, progress=bar)
    summary = {"ct": str(args.path), "input": volume.input_record(), "seed": args.seed, "coord": args.coord}
    summary.update(border=args.border, **result.to_dict())
    summary["bundle_sha256"] = predictor.bundle.manifest.weights.sha256
    print(json.dumps(summary, indent=2))
    if out:
        seed = pd.DataFrame([{"image_path": str(args.path), "coordX": result.seed_lps[0], "coordY": result.seed_lps[1],
                              "coordZ": result.seed_lps[2]}])  # fmt: skip
        with staged_outputs(out) as stage:
            write_csv(stage / "features.csv", _feature_rows(predictor, seed, result.features[None]))
            write_npy(stage / "features.npy", result.features[None])
            if result.stability is not None:
                write_npy(stage / "feature_cv.npy", result.stability["feature_cv"])
            write_json(stage / "lesion.json", summary)
            written = sorted(p.name for p in stage.iterdir())
        print(f"wrote {', '.join(written)} to {out}", file=sys.stderr)
    return 0


def _lesion_table(args, predictor, out: Path | None) -> int:
    """FMCIB's get_features for a seed table: every image read once, one features table for all seeds."""
    import numpy as np

    from .files import staged_outputs, write_csv, write_json, write_npy
    from .inference.lesion import seed_table_features
    from .io import read_seed_table

    seeds = read_seed_table(args.seeds)
    with ProgressBar("lesion", quiet=args.quiet) as bar:
        rows, features, failed = seed_table_features(predictor, seeds, read=lambda p: _read(args, p), progress=bar)
    summary = {"seeds": str(args.seeds), "bundle": predictor.bundle.manifest.name, "failed": failed}
    summary["scored"] = len(rows)
    print(json.dumps(summary, indent=2))
    if out:
        with staged_outputs(out) as stage:
            if len(rows):
                write_csv(stage / "features.csv", _feature_rows(predictor, rows, features))
                write_npy(stage / "features.npy", features.astype(np.float32))
            write_json(stage / "lesion.json", summary)
    if not len(rows):
        raise CLEARInputError(f"no seed could be scored ({failed[0]['error']})", args.seeds)
    return 0


def cmd_convert(args) -> int:
    from .files import check_bundle_target

    if not Path(args.checkpoint).is_file():  # before the heavy imports: a typo is answered at once
        raise CLEARInputError("no such checkpoint file", args.checkpoint)
    check_bundle_target(args.out)
    from .bundle.convert import convert_fmcib, convert_mambaout, convert_moco, convert_vmamba

    if args.source == "fmcib":
        path = convert_fmcib(args.checkpoint, args.out, name=args.name or "fmcib-foundation")
    else:
        convert = {"moco": convert_moco, "mambaout": convert_mambaout, "vmamba": convert_vmamba}[args.source]
        architecture = args.arch or ("vmamba_v2" if args.source == "vmamba" else "mambaout_tiny")
        path = convert(
            args.checkpoint, args.out, architecture, name=args.name, windows=args.windows, input_size=args.input_size
        )
    print(f"wrote bundle {path}")
    return 0


def cmd_fetch(args) -> int:
    from .published import PUBLISHED_NAMES, fetch_published, published_entry

    if args.list or not args.name:
        for name in PUBLISHED_NAMES:
            entry = published_entry(name)
            print(
                f"{entry.describe()}\n    {entry.url}\n    converted by '{entry.converter}' into a {entry.kind} bundle"
            )
        return 0
    entry = published_entry(args.name)
    print(entry.describe(), file=sys.stderr)
    with ProgressBar(f"fetch {entry.name}", quiet=args.quiet) as bar:
        bundle, record = fetch_published(entry.name, progress=bar)
    print(json.dumps({"bundle": str(bundle), **record}, indent=2))
    if record["verified_by"].startswith("first download"):
        print(
            f"{entry.name} has no published checksum: its sha256 {record['sha256']} was recorded at the first "
            "download and later downloads must match it",
            file=sys.stderr,
        )
    return 0


def resolve_model(model: str) -> str:
    """A bundle path as given, or the cached bundle of published weights fetched before (`clear-ct fetch`)."""
    if model is None or Path(model).exists():
        return model
    from .published import PUBLISHED_NAMES, cached_bundle, published_entry

    if model not in PUBLISHED_NAMES:
        return model  # the loader names the missing file
    entry = published_entry(model)
    bundle = cached_bundle(entry)
    if bundle is None:
        raise CLEARInputError(
            f"{model} has not been downloaded: run `clear-ct fetch {model}` first ({entry.describe()})"
        )
    return str(bundle)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="clear-ct", description=__doc__)
    parser.add_argument("--version", action="version", version=f"clear-ct {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log what the engine decides")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bars or progress lines")
    sub = parser.add_subparsers(dest="command", required=True)

    info = sub.add_parser("info", help="read a CT and print its geometry and HU statistics")
    info.add_argument("path", help="DICOM folder, multi-frame DICOM file, or NIfTI/NRRD/MHA file")
    info.add_argument("--json", action="store_true", help="print JSON instead of text")
    _add_read_options(info)
    info.set_defaults(func=cmd_info)

    phantom = sub.add_parser("phantom", help="write a synthetic CT phantom with lesions (NRRD/NIfTI/MHA)")
    phantom.add_argument("out", help="output file, e.g. phantom.nrrd")
    phantom.add_argument("--shape", type=int, nargs=3, default=(60, 96, 96), metavar=("Z", "Y", "X"))
    phantom.add_argument("--spacing", type=float, nargs=3, default=(3.0, 3.0, 5.0), metavar=("X", "Y", "Z"))
    phantom.add_argument("--noise", type=float, default=10.0, help="noise standard deviation in HU")
    phantom.add_argument("--seed", type=int, default=0)
    phantom.set_defaults(func=cmd_phantom)

    predict = sub.add_parser("predict", help="case predictions and per-slice attention from a case bundle")
    predict.add_argument("path", help="CT: DICOM folder, multi-frame DICOM, NIfTI/NRRD/MHA")
    predict.add_argument("--model", required=True, help="case bundle (folder or .zip)")
    predict.add_argument("--out", help="folder for predictions.json/.csv, attention.csv and attention.png")
    predict.add_argument(
        "--no-slice-view",
        action="store_true",
        help="skip slice_view.png (Slicer's Red view at the most attended slice, drawn when slicer-core is installed)",
    )
    predict.add_argument(
        "--attention-of",
        metavar="LABEL",
        help="draw the pictures with this label's attention (bundles with one attention per label; default: the "
        "labels' mean)",
    )
    predict.add_argument("--device", default="auto", help="auto, cpu or gpu")
    predict.add_argument("--batch-size", type=int, help="instances per encoder batch (default: by device)")
    add_backend_options(predict)
    _add_read_options(predict)
    predict.set_defaults(func=cmd_predict)

    lesion = sub.add_parser("lesion", help="lesion features and prediction at a seed point from a lesion bundle")
    lesion.add_argument("path", nargs="?", help="CT: DICOM folder, multi-frame DICOM, NIfTI/NRRD/MHA (with --seed)")
    lesion.add_argument("--model", required=True, help="lesion bundle (folder or .zip)")
    lesion.add_argument("--seed", type=_seed, help="x,y,z in mm, e.g. --seed -81.5,201.7,-456.5")
    lesion.add_argument(
        "--seeds", help="seed table instead of one seed: CSV of image_path, coordX, coordY, coordZ (LPS mm), as FMCIB's"
    )
    lesion.add_argument("--coord", default="LPS", choices=["LPS", "RAS"], type=str.upper)
    lesion.add_argument("--stability", type=int, default=0, help="also score N perturbed seeds (paper: 50)")
    lesion.add_argument(
        "--border",
        default="centred",
        choices=["centred", "fmcib"],
        help="near the image border: keep the patch centred on the seed (default) or crop and pad as FMCIB's code",
    )
    lesion.add_argument("--out", help="folder for lesion.json, features.csv and features.npy (and feature_cv.npy)")
    lesion.add_argument("--device", default="auto", help="auto, cpu or gpu")
    _add_read_options(lesion)
    lesion.set_defaults(func=cmd_lesion)

    convert = sub.add_parser("convert", help="convert published or pretraining weights into a bundle")
    convert.add_argument(
        "source",
        choices=["fmcib", "moco", "mambaout", "vmamba"],
        help="fmcib: model_weights.torch; moco: MoCo v3/CLEAR; mambaout: timm's mambaout_*.in1k model.safetensors "
        "or an original MambaOut checkpoint (ImageNet baseline); vmamba: an official VMamba (VSSM) checkpoint",
    )
    convert.add_argument("checkpoint", help="the checkpoint file (read with torch.load(weights_only=True))")
    convert.add_argument("out", help="bundle to write: a folder, or a file ending in .zip")
    convert.add_argument("--name", help="bundle name")
    convert.add_argument(
        "--arch", help="registered slice encoder (default: mambaout_tiny for moco and mambaout, vmamba_v2 for vmamba)"
    )
    convert.add_argument("--windows", nargs="+", default=["abdomen", "lung"], help="moco: windows of the bundle")
    convert.add_argument("--input-size", type=int, default=224, help="moco: input size")
    convert.set_defaults(func=cmd_convert)

    fetch = sub.add_parser(
        "fetch", help="download, verify and convert published weights (FMCIB, timm's ImageNet MambaOut); --list"
    )
    fetch.add_argument("name", nargs="?", help="fmcib, mambaout_tiny.in1k, ... (see --list)")
    fetch.add_argument("--list", action="store_true", help="what can be fetched: source, license, size limit")
    fetch.set_defaults(func=cmd_fetch)
    return parser


def attach_negative_values(argv: list[str], options=("--seed",)) -> list[str]:
    """`--seed -81.5,201.7,-456.5` -> `--seed=-81.5,201.7,-456.5`: argparse takes a value that starts
    with a minus (and is not a single number) for an option; half of all LPS/RAS seeds start with one."""
    out = []
    for i, arg in enumerate(argv):
        if i > 0 and argv[i - 1] in options and arg.startswith("-") and out and out[-1] == argv[i - 1]:
            out[-1] = f"{argv[i - 1]}={arg}"
        else:
            out.append(arg)
    return out


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(attach_negative_values(argv))
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    return run_command("clear-ct", with_model_resolved(args.func), args)


def with_model_resolved(command):
    """`--model fmcib` (or another published name fetched before) means its cached bundle, for every command
    of both command lines."""

    def run(args):
        if getattr(args, "model", None) is not None:
            args.model = resolve_model(args.model)
        return command(args)

    return run


if __name__ == "__main__":
    sys.exit(main())
