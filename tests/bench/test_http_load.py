"""bench/http_load.py --tiny: locust against the real `jointpq serve`, batching on and off, rows
labelled with the mode each server reported in /info, beside the in-process engine's QPS."""

from __future__ import annotations

import re

import pytest

from tests.bench.conftest import ok, run_bench, tables


@pytest.mark.slow
def test_tiny_run_has_on_and_off_rows_as_the_servers_reported(tiny_root):
    out = ok(run_bench("http_load.py", "--tiny", "--root", str(tiny_root)))
    (table,) = tables(out)
    assert [r["batching"] for r in table] == ["on", "off"]
    for r in table:
        assert (r["client"], r["workers"], r["users"], r["endpoint"]) == ("locust", "1", "4", "/search text")
        assert float(r["RPS"]) > 0 and r["failures"] == "0"
        p50, p95, p99 = (float(x) for x in r["p50 / p95 / p99 ms"].split(" / "))
        assert 0 <= p50 <= p95 <= p99
    engine = re.search(r"in-process engine, nprobe 16: (\d+) QPS single queries", out)
    assert engine and int(engine.group(1)) > 0
