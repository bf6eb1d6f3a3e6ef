"""Subcommands of the `gsa-compile` command, one module each (see gsa_compile/cli.py)."""
