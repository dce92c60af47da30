"""`clear-ct`: the engine's command line. Every subcommand calls the same engine functions as Slicer."""

from __future__ import annotations

import argparse
import json
import logging
import sys

from . import __version__
from .errors import CLEARInputError
from .io import read_ct, write_volume


def _add_read_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--series-uid", help="SeriesInstanceUID to read from a DICOM folder with several series")
    parser.add_argument("--allow-non-ct", action="store_true", help="read a series whose modality is not CT")
    parser.add_argument(
        "--resample-oblique", action="store_true", help="resample an oblique acquisition onto an axial grid"
    )


def _read(args):
    return read_ct(
        args.path,
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="clear-ct", description=__doc__)
    parser.add_argument("--version", action="version", version=f"clear-ct {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log what the engine decides")
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
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    try:
        return args.func(args)
    except CLEARInputError as exc:
        print(f"clear-ct: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
