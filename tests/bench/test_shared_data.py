"""A bench whose shared data is missing stops with an error naming where it looked and the variable
that moves it, instead of printing a table that looks complete."""

from __future__ import annotations

import pytest

from tests.bench.conftest import run_bench


@pytest.mark.parametrize(("script", "data_set"), [("search.py", "siftsmall"), ("quality.py", "scifact")])
def test_missing_shared_data_fails_loudly(tmp_path, script, data_set):
    proc = run_bench(script, "--tiny", env={"JOINTPQ_SHARED_DATA": str(tmp_path)}, timeout=120)
    assert proc.returncode != 0
    assert str(tmp_path / data_set) in proc.stderr and "JOINTPQ_SHARED_DATA" in proc.stderr, proc.stderr[-2000:]
    assert "|" not in proc.stdout  # no table: it stopped before measuring anything
