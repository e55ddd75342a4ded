"""bench/quality.py --tiny: every engine's row (two-step ours / Faiss, distill, jpq, poeem, auto, ablations)
on a SciFact subset with one short training run each, and the indexing-time row."""

from __future__ import annotations

import json

import pytest

from tests.bench.conftest import ok, run_bench, tables
from tests.conftest import shared

TRAINED = {
    "distill (train query texts)", "distill (pseudo-queries)", "jpq [96 labels]", "jpq + distill [96 labels]",
    "poeem [96 labels]", "poeem + distill [96 labels]", "jpq [40 labels]", "jpq + distill [40 labels]",
    "poeem [40 labels]", "poeem + distill [40 labels]", "two-step fine-tuned (OPQ)", "poeem no rotation",
    "poeem no warm start",
}  # fmt: skip
ENGINES = {"two-step ours (OPQ)", "two-step Faiss (OPQ)", "auto [all]", "auto [40]"} | TRAINED


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
    assert set(trained) == TRAINED
    autos = [e for e in events if e.get("event") == "auto"]
    assert [a["labels"] for a in autos] == ["all", 40] and all(a["picks"] in TRAINED for a in autos)
    assert all(steps >= 1 for steps in trained.values()), trained  # each training row really trained
    indexing = [e for e in events if e.get("event") == "indexing"]
    assert [e["data"] for e in indexing] == ["scifact"] and indexing[0]["forward_pass_seconds"] > 0
