"""bench/search.py --tiny: every engine row on a small synthetic set, and on siftsmall when the suite has it."""

from __future__ import annotations

import pytest

from tests.bench.conftest import ok, run_bench, tables
from tests.conftest import SHARED_DATA

ENGINES = {
    "torch ours IVF{n},PQ16", "faiss ours IVF{n},PQ16", "torch ours IVF{n},PQ32x4", "faiss ours IVF{n},PQ32x4fs",
    "Faiss IVF{n},PQ16", "Faiss IVF{n},PQ32x4fs",
}  # fmt: skip


@pytest.mark.slow
def test_tiny_run_prints_a_plausible_row_per_engine_and_nprobe():
    with_sift = (SHARED_DATA / "siftsmall").exists()
    out = ok(run_bench("search.py", "--tiny", *([] if with_sift else ["--skip-sift"])))
    (table,) = tables(out)
    expected = {"synthetic-2000": 16} | ({"siftsmall": 64} if with_sift else {})
    assert {r["dataset"] for r in table} == set(expected)
    for dataset, nlist in expected.items():
        rows = [r for r in table if r["dataset"] == dataset]
        assert {r["engine"] for r in rows} == {e.format(n=nlist) for e in ENGINES}
        assert sorted((r["engine"], r["nprobe"]) for r in rows) == sorted(
            (e.format(n=nlist), p) for e in ENGINES for p in ("1", "8")
        )
    for r in table:
        assert r["device"] == "cpu" and r["threads"] == "1"
        assert 0 <= float(r["R@10"]) <= 1 and 0 <= float(r["R@100"]) <= 1
        assert float(r["QPS"]) > 0
    # more cells probed, more true neighbours found: the numbers are measurements, not placeholders
    by = {(r["dataset"], r["engine"], r["nprobe"]): float(r["R@100"]) for r in table}
    assert all(by[d, e, "8"] >= by[d, e, "1"] for d, e, _ in by)
