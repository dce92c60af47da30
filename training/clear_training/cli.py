"""`clear-train`: the training command line, one subcommand per stage."""

from __future__ import annotations

import argparse
import json
import logging
import sys

from . import __version__
from .config import ConfigError


def cmd_prepare_deeplesion(args) -> int:
    from .data import prepare_deeplesion

    summary = prepare_deeplesion(
        args.root,
        args.out,
        size=args.size,
        test_fraction=args.test_fraction,
        seed=args.seed,
        splits_file=args.splits,
        shard_slices=args.shard_slices,
    )
    print(json.dumps(summary, indent=2))
    return 0


def cmd_prepare_ct(args) -> int:
    from .data import prepare_ct

    summary = prepare_ct(
        args.cohort, args.out, key_slices_csv=args.key_slices, size=args.size, shard_slices=args.shard_slices
    )
    print(json.dumps(summary, indent=2))
    return 1 if summary["failures"] and not summary["cases"] else 0


def cmd_pretrain(args) -> int:
    from .config import load_config
    from .pretrain import Trainer, export_encoder

    config = load_config(args.config, args.set)
    if args.check:
        print(config.model_dump_json(indent=2))
        return 0
    trainer = Trainer(config)
    trainer.fit()
    if trainer.dist.is_main and trainer.epoch >= config.run.epochs:
        path = export_encoder(trainer.out_dir / "last.pt", trainer.out_dir / f"{config.run.name}.zip")
        print(f"exported encoder bundle {path}")
    return 0


def cmd_export(args) -> int:
    from .pretrain import export_encoder

    print(f"wrote bundle {export_encoder(args.checkpoint, args.out, name=args.name)}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="clear-train",
        description="CLEAR training: pretraining, feature extraction, MIL, probes and export.",
    )
    parser.add_argument("--version", action="version", version=f"clear-train {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", title="stages", required=True)

    p = sub.add_parser("prepare-deeplesion", help="DeepLesion -> slice store for pretraining (once)")
    p.add_argument("root", help="DeepLesion folder holding DL_info.csv and Images_png/")
    p.add_argument("out", help="slice store folder to create")
    p.add_argument("--size", type=int, default=512, help="stored slice size (pixels)")
    p.add_argument("--test-fraction", type=float, default=0.2, help="labelled patients held out for testing")
    p.add_argument("--splits", help="existing patient_id,split CSV to reuse instead")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--shard-slices", type=int, default=1024)
    p.set_defaults(func=cmd_prepare_deeplesion)

    p = sub.add_parser("prepare-ct", help="CT cohort (DICOM/NIfTI/NRRD) -> slice store")
    p.add_argument("cohort", help="CSV with a path column (case_id, patient_id optional)")
    p.add_argument("out", help="slice store folder to create")
    p.add_argument("--key-slices", help="DeepLesion-style key-slice table (e.g. exported from Slicer)")
    p.add_argument("--size", type=int, default=512)
    p.add_argument("--shard-slices", type=int, default=1024)
    p.set_defaults(func=cmd_prepare_ct)

    p = sub.add_parser("pretrain", help="MoCo v3 / LeCL pretraining (run under torchrun for several GPUs)")
    p.add_argument("--config", required=True, help="YAML config (see training/configs)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override, e.g. method.lam=3")
    p.add_argument("--check", action="store_true", help="validate the config, print it resolved, and stop")
    p.set_defaults(func=cmd_pretrain)

    p = sub.add_parser("export", help="pretraining checkpoint -> encoder bundle for the engine")
    p.add_argument("checkpoint")
    p.add_argument("out", help="bundle folder or .zip")
    p.add_argument("--name")
    p.set_defaults(func=cmd_export)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    try:
        return args.func(args)
    except (ConfigError, FileNotFoundError, ValueError) as exc:
        print(f"clear-train: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
