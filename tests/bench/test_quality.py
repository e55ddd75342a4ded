"""bench/quality.py --tiny: every engine's row (two-step ours / Faiss, poeem and its ablations, jpq)
on a SciFact subset with one short training run each, and the indexing-time row."""

from __future__ import annotations

import json

import pytest

from tests.bench.conftest import ok, run_bench, tables
from tests.conftest import shared

ENGINES = {
    "two-step ours (OPQ)", "two-step Faiss (OPQ)", "poeem", "two-step fine-tuned (OPQ)", "poeem no rotation",
    "poeem no warm start", "jpq",
}  # fmt: skip


@pytest.mark.slow
def test_tiny_run_prints_every_engine_with_plausible_metrics():
    shared("scifact")
    out = ok(run_bench("quality.py", "--tiny"))
    (table,) = tables(out)
    assert {r["engine"] for r in table} == ENGINES
    for r in table:
        assert r["M"] == "8"
        for col in ("nprobe 4", "nprobe 16"):
            ndcg, rest = r[col].split(" ± ")
            std, recall100 = rest.split(" / ")
            assert 0 <= float(ndcg) <= 1 and 0 <= float(recall100) <= 1 and float(std) == 0  # one seed
    events = [json.loads(line[2:]) for line in out.splitlines() if line.startswith("# {")]
    subset = next(e for e in events if e.get("event") == "subset")
    assert subset["docs"] == 800 and subset["test"] == 96
    trained = {e["engine"]: e["steps"] for e in events if e.get("event") == "train"}
    assert set(trained) == ENGINES - {"two-step ours (OPQ)", "two-step Faiss (OPQ)"}
    assert all(steps >= 1 for steps in trained.values()), trained  # each training row really trained
    indexing = [e for e in events if e.get("event") == "indexing"]
    assert [e["data"] for e in indexing] == ["scifact"] and indexing[0]["forward_pass_seconds"] > 0
