"""The `jointpq.cli` entry point of the cluster package (pyproject.toml): flags it adds to the
built-in commands. Loaded on every `jointpq` run, so it imports no Ray: the modules it calls
import Ray only when their flags are used."""

from __future__ import annotations

import argparse


def extend(commands: dict[str, argparse.ArgumentParser]) -> None:
    from . import indexing_cli, serve_cli

    indexing_cli.extend(commands)
    serve_cli.extend(commands)
