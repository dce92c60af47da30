"""`clear-train`: the training command line, one subcommand per stage."""

from __future__ import annotations

import argparse
import json
import logging
import sys

from CLEARLib.errors import CLEARInputError, run_command
from CLEARLib.progress import ProgressBar

from . import __version__


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
    from .export import export_encoder
    from .pretrain import Trainer

    config = load_config(args.config, args.set)
    if args.check:
        print(config.model_dump_json(indent=2))
        return 0
    trainer = Trainer(config)
    with ProgressBar("pretrain", total=trainer.total_steps(), unit="step", quiet=args.quiet) as bar:
        trainer.fit(progress=bar)
    if trainer.dist.is_main:  # after the last epoch or run.max_steps
        path = export_encoder(trainer.out_dir / "last.pt", trainer.out_dir / f"{config.run.name}.zip")
        print(f"exported encoder bundle {path}")
    return 0


def _lesion_command(args, finetune: bool) -> int:
    from .config import LesionPretrainConfig, load_config
    from .export import export_lesion_bundle
    from .lesion import LesionFinetuner, LesionPretrainer

    config = load_config(args.config, args.set, model=LesionPretrainConfig)
    if args.check:
        print(config.model_dump_json(indent=2))
        return 0
    trainer = (LesionFinetuner if finetune else LesionPretrainer)(config)
    desc = "lesion-finetune" if finetune else "lesion-pretrain"
    with ProgressBar(desc, total=trainer.total_steps(), unit="step", quiet=args.quiet) as bar:
        trainer.fit(progress=bar)
    if trainer.dist.is_main:
        path = export_lesion_bundle(trainer.out_dir / "last.pt", trainer.out_dir / f"{config.run.name}.zip")
        print(f"exported lesion bundle {path}")
    return 0


def cmd_lesion_pretrain(args) -> int:
    return _lesion_command(args, finetune=False)


def cmd_lesion_finetune(args) -> int:
    return _lesion_command(args, finetune=True)


def cmd_export(args) -> int:
    from .export import export_encoder

    print(f"wrote bundle {export_encoder(args.checkpoint, args.out, name=args.name)}")
    return 0


def cmd_extract(args) -> int:
    from CLEARLib.cli import encoder_options

    from .extract import extract

    progress = ProgressBar("extract", quiet=args.quiet)
    report = extract(args.model, args.cohort, args.out, progress=progress, **encoder_options(args))
    print(json.dumps({k: (len(v) if isinstance(v, list) else v) for k, v in report.items()}, indent=2))
    for failure in report["failed"]:
        print(f"failed: {failure['case_id']}: {failure['error']}", file=sys.stderr)
    return 0


def cmd_mil(args) -> int:
    from .config import MilConfig, load_config
    from .mil import run_mil

    config = load_config(args.config, args.set, model=MilConfig)
    if args.check:
        print(config.model_dump_json(indent=2))
        return 0
    with ProgressBar("mil", quiet=args.quiet) as bar:
        metrics = run_mil(config, progress=bar)
    summary = {k: metrics[k] for k in ("ensemble_test", "nested_cv", "across_folds", "bundle") if k in metrics}
    print(json.dumps(summary, indent=2, default=str))
    return 0


def cmd_extract_lesions(args) -> int:
    from .probe import extract_lesion_features

    with ProgressBar("extract-lesions", quiet=args.quiet) as bar:
        summary = extract_lesion_features(args.model, args.seeds, args.out, device=args.device, progress=bar)
    print(json.dumps(summary, indent=2))
    return 0


def cmd_probe(args) -> int:
    import numpy as np

    from CLEARLib.files import write_json

    from .probe import compare_probes, evaluate_probe, export_probe, fit_probe, load_probe_data

    data = load_probe_data(args.features)
    options = {"folds": args.folds, "seed": args.seed, "trials": args.trials, "groups": data.groups}
    with ProgressBar("probe", total=args.folds, unit="fold", quiet=args.quiet) as bar:
        result = evaluate_probe(data.x, data.y, n_boot=args.bootstrap, progress=bar, **options)
    report = {"features": str(args.features), **{k: result[k] for k in ("classes", "metrics", "ci95", "protocol")}}
    report["protocol"]["grouped_by"] = data.grouped_by
    if args.compare:
        other = load_probe_data(args.compare)
        if not np.array_equal(data.y, other.y):
            raise CLEARInputError(f"labels differ from {args.features}; compare the same cases", args.compare)
        report["comparison"] = compare_probes(data.x, other.x, data.y, **options)
    if args.export:
        if not args.lesion_bundle:
            raise CLEARInputError("--export needs --lesion-bundle (the bundle whose features were probed)")
        model = fit_probe(data.x, data.y, **options)
        report["bundle"] = str(export_probe(model, result["classes"], args.lesion_bundle, args.export, args.name))
    if args.out:
        write_json(args.out, report)
    print(json.dumps(report, indent=2))
    return 0


def cmd_stats(args) -> int:
    import pandas as pd

    from CLEARLib.files import write_json

    from .stats import embedding_plot, survival_analysis

    out = {}
    if args.survival:
        table = pd.read_csv(args.survival)
        out["survival"] = survival_analysis(table, args.score, args.time, args.event, args.out_dir, args.covariates)
    if args.features:
        from .probe import load_probe_data

        data = load_probe_data(args.features)
        embedding_plot(data.x, data.y, f"{args.out_dir}/{args.method}.png", method=args.method)
        out["embedding"] = f"{args.out_dir}/{args.method}.png"
    if not out:
        raise CLEARInputError("give --survival TABLE and/or --features FILE.h5")
    write_json(f"{args.out_dir}/stats.json", out)
    print(json.dumps(out, indent=2))
    return 0


def cmd_demo(args) -> int:
    from pathlib import Path

    from .demo import SMALL, DemoSize, run_demo

    summary = run_demo(args.out, SMALL if args.small else DemoSize(), quiet=args.quiet, seed=args.seed)
    print(f"\nreport: {Path(summary['report']).resolve()}")
    print(f"bundles: {summary['case_bundle']}, {summary['lesion_bundle']}, {summary['encoder_bundle']}")
    return 0


def _add_model_input_out(parser: argparse.ArgumentParser, model_help: str, table: tuple[str, str], out_help: str):
    """--model, the input table option, --out and --device of the extraction commands."""
    parser.add_argument("--model", required=True, help=model_help)
    parser.add_argument(table[0], required=True, help=table[1])
    parser.add_argument("--out", required=True, help=out_help)
    parser.add_argument("--device", default="auto", help="auto, cpu or gpu")


def _add_config_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="YAML config (see training/configs)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override, e.g. method.lam=3")
    parser.add_argument("--check", action="store_true", help="validate the config, print it resolved, and stop")


def build_parser() -> argparse.ArgumentParser:
    from CLEARLib.cli import add_backend_options

    parser = argparse.ArgumentParser(
        prog="clear-train",
        description="CLEAR training: pretraining, feature extraction, MIL, probes and export.",
    )
    parser.add_argument("--version", action="version", version=f"clear-train {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log what each stage decides")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bars or progress lines")
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
    _add_config_arguments(p)
    p.set_defaults(func=cmd_pretrain)

    p = sub.add_parser("extract", help="slice features of a cohort, one HDF5 per case (torchrun: sharded)")
    _add_model_input_out(p, "case or encoder bundle", ("--cohort", "cohort table: path[, case_id, patient_id, "
                         "format, spacing_x/y/z]"), "feature folder")  # fmt: skip
    p.add_argument("--batch-size", type=int)
    add_backend_options(p)
    p.set_defaults(func=cmd_extract)

    p = sub.add_parser("mil", help="ABMIL with held-out test and cross-validation; metrics, plots, bundle")
    _add_config_arguments(p)
    p.set_defaults(func=cmd_mil)

    p = sub.add_parser("extract-lesions", help="lesion-bundle features at the seeds of a seed table")
    seeds_help = "CSV: image_path, coordX, coordY, coordZ (LPS mm)[, label, case_id]"
    _add_model_input_out(p, "lesion bundle", ("--seeds", seeds_help), "features .h5")
    p.set_defaults(func=cmd_extract_lesions)

    p = sub.add_parser("probe", help="linear probe (logistic regression, C by CV) with bootstrap CIs")
    p.add_argument("features", help="features .h5 from extract-lesions (with labels)")
    p.add_argument("--compare", help="a second features .h5 of the same seeds: paired permutation test")
    p.add_argument("--folds", type=int, default=5)
    p.add_argument("--bootstrap", type=int, default=1000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--trials", type=int, default=0, help="optuna trials over C and class weighting (0: grid of C by CV)"
    )
    p.add_argument("--out", help="report JSON")
    p.add_argument("--export", help="write the probe as the head of a lesion bundle here")
    p.add_argument("--lesion-bundle", help="the bundle the features came from (for --export)")
    p.add_argument("--name", default="lesion-probe")
    p.set_defaults(func=cmd_probe)

    p = sub.add_parser("stats", help="Kaplan-Meier/log-rank/Cox of scores; t-SNE/UMAP of features")
    p.add_argument("--survival", help="CSV with score, time and event columns")
    p.add_argument("--score", default="score")
    p.add_argument("--time", default="time")
    p.add_argument("--event", default="event")
    p.add_argument("--covariates", nargs="*", default=[])
    p.add_argument("--features", help="features .h5 with labels, for the embedding plot")
    p.add_argument("--method", default="tsne", choices=["tsne", "umap"])
    p.add_argument("--out-dir", required=True)
    p.set_defaults(func=cmd_stats)

    for name, func, text in (
        ("lesion-pretrain", cmd_lesion_pretrain, "SimCLR pretraining of the 3D lesion model from a seed table"),
        ("lesion-finetune", cmd_lesion_finetune, "fine-tuning of the lesion model with a classification head"),
    ):
        p = sub.add_parser(name, help=text + " (torchrun for several GPUs)")
        _add_config_arguments(p)
        p.set_defaults(func=func)

    p = sub.add_parser("demo", help="CLEAR end to end on synthetic CTs, with an HTML report (make demo)")
    p.add_argument("--out", default="clear-output/demo", help="output folder (report in report/index.html)")
    p.add_argument("--small", action="store_true", help="a shorter lesion-model run, as the tests use")
    p.add_argument(
        "--seed", type=int, default=0, help="seed of the trainings; the CTs are the same for every seed (default 0)"
    )
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("export", help="pretraining checkpoint -> encoder bundle for the engine")
    p.add_argument("checkpoint")
    p.add_argument("out", help="bundle folder or .zip")
    p.add_argument("--name")
    p.set_defaults(func=cmd_export)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    from CLEARLib.cli import with_model_resolved

    return run_command("clear-train", with_model_resolved(args.func), args)


if __name__ == "__main__":
    sys.exit(main())
