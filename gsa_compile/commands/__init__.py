"""Subcommands of the `gsa-compile` command, one module each (see gsa_compile/cli.py).

A module registers its arguments without importing torch (the CLI answers --help before any
heavy import); help text that needs the library goes through `deferred_help`."""

from __future__ import annotations

from typing import Callable


class _Deferred:
    def __init__(self, compute: Callable[[], object]):
        self.compute = compute

    def __str__(self) -> str:
        return str(self.compute())


def deferred_help(action, **values: Callable[[], object]):
    """Let `action`'s help text use %(name)s for values computed only when the help is printed
    (argparse fills %(...)s from the action's attributes)."""
    for name, compute in values.items():
        setattr(action, name, _Deferred(compute))
    return action
