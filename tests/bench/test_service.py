"""bench/service.py --tiny: the real `jointpq serve`, batching on and off, rows labelled from /info."""

from __future__ import annotations

import pytest

from tests.bench.conftest import ok, run_bench, tables


@pytest.mark.slow
def test_tiny_run_has_on_and_off_rows_as_the_servers_reported(tiny_root):
    out = ok(run_bench("service.py", "--tiny", "--heavy", "--root", str(tiny_root)))
    heavy, table = tables(out)
    assert [(r["batching"], r["heavy running"]) for r in heavy] == [
        ("on", "no"),
        ("on", "yes"),
        ("off", "no"),
        ("off", "yes"),
    ]
    for r in heavy:
        assert r["errors"] == "0" and float(r["small RPS"]) > 0
        assert (int(r["heavy requests"]) >= 1) == (r["heavy running"] == "yes")
    assert sorted((r["kind"], r["batching"]) for r in table) == [
        ("text", "off"), ("text", "on"), ("vector", "off"), ("vector", "on"),
    ]  # fmt: skip
    for r in table:
        assert r["clients"] == "4" and r["errors"] == "0"
        assert float(r["RPS"]) > 0 and 0 < float(r["p50 ms"]) <= float(r["p99 ms"])
        assert float(r["mean batch"]) >= 1
    sequential = [ln for ln in out.splitlines() if ln.startswith("test=sequential")]
    assert len(sequential) == 2 and all("batching=on" in ln for ln in sequential)
