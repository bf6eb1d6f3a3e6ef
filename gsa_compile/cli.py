"""The `gsa-compile` command. Each subcommand lives in its own module that exposes
`register(subparsers)`; the module list below is the whole command surface."""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys

# Longest error line a failing command prints for an exception that is not a GSAError (a
# third-party message can list hundreds of names).
MESSAGE_LIMIT = 300

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
    except KeyboardInterrupt:
        print(f"gsa-compile {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001  (a command fails with one line, not a traceback)
        if args.verbose:
            logging.getLogger("gsa_compile.cli").exception("gsa-compile %s failed", args.command)
        print(f"gsa-compile {args.command}: {one_line(exc)} (-v shows the traceback)", file=sys.stderr)
        return 1


def one_line(exc: BaseException, limit: int = MESSAGE_LIMIT) -> str:
    """An exception as one line of at most `limit` characters: its type and its first line."""
    text = str(exc).strip().splitlines()
    line = f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__
    return line if len(line) <= limit else line[: limit - 3] + "..."


if __name__ == "__main__":
    sys.exit(main())
