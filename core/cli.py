"""The `nad` command. Each subcommand imports what it needs only when it runs, so `nad keys` or `nad submit`
never pay for importing torch."""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="nad", description="Remove backdoors from image classifiers.")
    commands = parser.add_subparsers(dest="command", required=True)
    _add_engine_commands(commands)
    _add_keys_command(commands)
    _add_submit_command(commands)
    args = parser.parse_args(argv)
    return args.run(args)


def _add_engine_commands(commands: argparse._SubParsersAction) -> None:
    """sanitize, evaluate, attack: the engine on local files."""
    from core.engine.commands import add_commands

    add_commands(commands)


def _add_keys_command(commands: argparse._SubParsersAction) -> None:
    """keys: API key management against the service's database."""


def _add_submit_command(commands: argparse._SubParsersAction) -> None:
    """submit: the HTTP client of a running service."""


if __name__ == "__main__":
    sys.exit(main())
