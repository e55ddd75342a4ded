"""bench/sharding.py --tiny: the real `jointpq serve` and `jointpq serve --cluster` (its own local Ray),
wrk against each, the memory of each shard replica from the cluster's /info."""

from __future__ import annotations

import pytest

from tests.bench.conftest import ok, run_bench, tables


@pytest.mark.slow
def test_tiny_run_has_a_single_process_row_and_a_cluster_row():
    pytest.importorskip("ray", reason="the cluster extra is not installed: pip install 'jointpq[cluster]'")
    (table,) = tables(ok(run_bench("sharding.py", "--tiny", timeout=600)))
    assert [r["serving"] for r in table] == ["single process", "ray serve, S=1 R=1"]
    for r in table:
        assert r["failures"] == "0" and float(r["RPS"]) > 0 and 0 < float(r["p50 ms"]) <= float(r["p99 ms"])
        assert float(r["RSS MB (each shard)"]) > 100  # a real process: Python + torch at least
    assert 0 < float(table[1]["index MB (each shard)"]) < 10  # 20k items x (16 B codes + ids)
