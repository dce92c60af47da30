"""`clear-train`: the training command line. Stages are added as subcommands by their own modules."""

from __future__ import annotations

import argparse
import sys

from . import __version__


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="clear-train",
        description="CLEAR training: pretraining, feature extraction, MIL, probes and export.",
    )
    parser.add_argument("--version", action="version", version=f"clear-train {__version__}")
    parser.add_subparsers(dest="command", title="stages")
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        print("\nNo training stage is available in this version yet.", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
