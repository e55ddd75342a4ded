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
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (JointPQError, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
