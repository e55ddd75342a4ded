"""bench/live.py --tiny: every part (unseen items, indexing throughput, live updates over real HTTP)
runs end to end on small data and prints plausible rows."""

from __future__ import annotations

import json

import pytest

from tests.bench.conftest import ok, run_bench
from tests.conftest import shared


@pytest.mark.slow
def test_tiny_run_prints_every_part():
    shared("scifact")
    rows = [json.loads(ln) for ln in ok(run_bench("live.py", "--tiny", "--json", timeout=600)).splitlines()
            if ln.startswith("{")]  # fmt: skip
    quality = {r["row"] for r in rows if "row" in r}
    assert any("forward-pass add of 20 %" in r for r in quality)
    assert any("trained on 100 %" in r for r in quality)
    assert {"two-step Faiss (OPQ) on 100 %", "two-step Faiss (OPQ) trained on 80 %, all added"} <= quality
    for r in rows:
        if "row" in r:
            assert 0 <= r["ndcg@10"] <= 1 and 0 <= r["recall@100"] <= 1
    add = next(r for r in rows if r.get("event") == "add")
    assert add["added"] > 0 and add["drift_ratio"] > 0
    indexing = {r["what"]: r for r in rows if r.get("event") == "indexing"}
    assert {"vectors (jointpq index)", "vectors (Faiss IndexIVFPQ.add)"} <= set(indexing)
    assert all(r["items_per_second"] > 0 for r in indexing.values())
    upserts = [r for r in rows if r.get("event") == "upserts"]
    assert {(r["kind"], r["batch"]) for r in upserts} == {
        ("vectors", 1),
        ("vectors", 100),
        ("texts (hashed tower)", 1),
        ("texts (hashed tower)", 100),
    }
    deltas = [r["delta"] for r in rows if r.get("event") == "search"]
    assert deltas == ["0 %", "1 %", "10 %", "1 % + 1 % deleted"]
    compaction = next(r for r in rows if r.get("event") == "compaction")
    assert compaction["items"] == 22_000  # 20k base + the 10 % delta
