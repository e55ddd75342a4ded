"""Bench fixtures: run a bench script as the user would (`python bench/x.py --tiny ...`, a subprocess),
read back the markdown tables it prints, and one tiny text artifact shared by the service benches."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT, SHARED_DATA

BENCH = ROOT / "bench"


def run_bench(
    script: str, *args: str, env: dict[str, str] | None = None, timeout: float = 300
) -> subprocess.CompletedProcess:
    """`python bench/<script> <args>` from the project root; JOINTPQ_SHARED_DATA is the suite's own
    (tests/conftest.py), so a bench reads the data the skips were decided on, unless `env` says otherwise."""
    full_env = {**os.environ, "JOINTPQ_SHARED_DATA": str(SHARED_DATA), **(env or {})}
    return subprocess.run(
        [sys.executable, str(BENCH / script), *args],
        cwd=ROOT, env=full_env, capture_output=True, text=True, timeout=timeout, check=False,
    )  # fmt: skip


def ok(proc: subprocess.CompletedProcess) -> str:
    """stdout of a run that must have succeeded (else fail showing the end of its stderr)."""
    tail = f"--- stdout\n{proc.stdout[-3000:]}\n--- stderr\n{proc.stderr[-3000:]}"
    assert proc.returncode == 0, f"exit {proc.returncode}\n{tail}"
    return proc.stdout


def tables(text: str) -> list[list[dict[str, str]]]:
    """Every markdown table in `text` (blocks of `|` lines: header, `|---|` rule, rows) as row dicts."""
    blocks: list[list[str]] = [[]]
    for line in text.splitlines():
        if line.startswith("|"):
            blocks[-1].append(line)
        elif blocks[-1]:
            blocks.append([])
    out = []
    for block in filter(None, blocks):
        header, rule, *rows = ([c.strip() for c in ln.strip().strip("|").split("|")] for ln in block)
        assert set("".join(rule)) <= {"-", ":"}, block
        out.append([dict(zip(header, row, strict=True)) for row in rows])
    return out


@pytest.fixture(scope="session")
def tiny_root(tmp_path_factory) -> Path:
    """A root with the --tiny text artifact, built once per session by the benches' own builder (a fresh
    one: a cached artifacts/bench-tiny may predate a change of the artifact format)."""
    from bench.harness import tiny_artifact

    return tiny_artifact(tmp_path_factory.mktemp("bench-tiny"))
