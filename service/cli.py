"""`jointpq`: one command, one subcommand per job. Each package contributes its own."""

from __future__ import annotations

import argparse
import sys

from index import JointPQError
from index import cli as index_cli
from model import cli as model_cli

from . import compaction, demo, serve


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="jointpq", description="Jointly learned IVF-PQ retrieval: build, search, serve.")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    index_cli.add_commands(sub)
    model_cli.add_commands(sub)
    serve.add_command(sub)
    compaction.add_command(sub)
    demo.add_command(sub)
    _plugins(sub)
    return p


PLUGINS = "jointpq.cli"


def _plugins(sub: argparse._SubParsersAction) -> None:
    """Let installed packages extend the built-in commands: each entry point of group
    `jointpq.cli` is a function `extend(commands)` given the subparsers by name (it may add flags
    and wrap a command's `func`). So `cluster` adds `index --ray` and `serve --cluster` while
    `service` never imports it: dependencies point one way. A plugin that fails to load is named
    on stderr and left out; the built-in commands still run."""
    from importlib.metadata import entry_points

    commands = dict(sub.choices)
    for ep in sorted(entry_points(group=PLUGINS), key=lambda e: e.name):
        try:
            ep.load()(commands)
        except Exception as e:  # a broken plugin must not take the built-in commands down with it
            print(f"warning: {PLUGINS} plugin {ep.name!r} ({ep.value}) not loaded: {e}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (JointPQError, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
