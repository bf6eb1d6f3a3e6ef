"""The `gsa-compile` command. Each subcommand lives in its own module that exposes
`register(subparsers)`; the module list below is the whole command surface."""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys

# Modules that each add one or more subcommands.
COMMAND_MODULES = [
    "gsa_compile.commands.configs",
    "gsa_compile.commands.inspect",
    "gsa_compile.commands.npu",
    "gsa_compile.commands.bench",
    "gsa_compile.commands.demo",
    "gsa_compile.commands.export_onnx",
    "gsa_compile.commands.calibrate",
    "gsa_compile.commands.eval",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gsa-compile",
        description="Hash-aware top-k sparse attention (GSA / HATA) for any PyTorch model.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log what the library does")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(subparsers)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    from .errors import GSAError

    try:
        return int(args.handler(args) or 0)
    except GSAError as exc:
        print(f"gsa-compile {args.command}: {exc}", file=sys.stderr)
        return 2
    except BrokenPipeError:
        # The reader (e.g. `| head`) stopped early: not an error of ours.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    sys.exit(main())
