"""POST /search over real HTTP: text, batch and vector queries answer what the index answers
when called directly, with and without micro-batching."""

from __future__ import annotations

import asyncio

import httpx
import numpy as np
import pytest

from index import load_index
from model.encoders import load_encoder
from tests.service.conftest import client, rng_vectors


@pytest.fixture(scope="module")
def direct(artifact_root):
    idx = load_index(artifact_root / "text-v1", device="cpu")
    return idx, load_encoder(artifact_root / "text-v1")


def expected(direct, texts, k=10, nprobe=16):
    idx, enc = direct
    scores, ids = idx.search(enc.encode(texts).numpy(), k, nprobe)
    return scores, ids


@pytest.mark.parametrize("batching", [True, False])
def test_text_and_batch_match_the_index(serve, artifact_root, queries, direct, batching):
    srv = serve(artifact_root, batching=batching)
    with client(srv) as c:
        r = c.post("/search", json={"query": queries[0], "k": 10})
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["version"] == "text-v1" and body["k"] == 10 and body["nprobe"] == 16
        assert body["took_ms"] > 0 and len(body["results"]) == 1
        scores, ids = expected(direct, queries[:1])
        assert body["results"][0]["ids"] == ids[0]
        np.testing.assert_allclose(body["results"][0]["scores"], scores[0], rtol=1e-4, atol=1e-5)

        r = c.post("/search", json={"queries": queries[:20], "k": 5, "nprobe": 8})
        assert r.status_code == 200, r.text
        _, ids = expected(direct, queries[:20], k=5, nprobe=8)
        assert [res["ids"] for res in r.json()["results"]] == ids


@pytest.mark.parametrize("mode", ["batching", "inline"])
def test_vector_queries_match_the_index(serve, artifact_root, direct, mode):
    inline = mode == "inline"  # batching off, vector searches on the event loop
    srv = serve(artifact_root, batching=not inline, inline_vector_search=inline)
    vecs = rng_vectors(6, 64, seed=4)
    idx, _ = direct
    scores, ids = idx.search(np.asarray(vecs, np.float32), 7, 4)
    with client(srv) as c:
        one = c.post("/search", json={"vector": vecs[0], "k": 7, "nprobe": 4}).json()
        many = c.post("/search", json={"vectors": vecs, "k": 7, "nprobe": 4}).json()
    assert one["results"][0]["ids"] == ids[0]
    assert [r["ids"] for r in many["results"]] == ids
    np.testing.assert_allclose(many["results"][5]["scores"], scores[5], rtol=1e-5, atol=1e-6)


def test_defaults_and_nprobe_capped_at_nlist(serve, artifact_root, queries):
    srv = serve(artifact_root, default_k=3)
    with client(srv) as c:
        body = c.post("/search", json={"query": queries[1], "nprobe": 4000}).json()
    assert body["k"] == 3 and len(body["results"][0]["ids"]) == 3
    assert body["nprobe"] == 32  # the demo artifact's nlist


def test_concurrent_requests_are_coalesced_and_answered_correctly(serve, artifact_root, queries, direct):
    srv = serve(artifact_root, batch_wait_ms=5)
    _, want = expected(direct, queries[:40])

    async def run():
        async with httpx.AsyncClient(base_url=srv.url, timeout=60) as c:
            return await asyncio.gather(*(c.post("/search", json={"query": q}) for q in queries[:40]))

    rs = asyncio.run(run())
    assert all(r.status_code == 200 for r in rs)
    assert [r.json()["results"][0]["ids"] for r in rs] == want
    from prometheus_client.parser import text_string_to_metric_families

    with client(srv) as c:
        fams = {f.name: f for f in text_string_to_metric_families(c.get("/metrics").text)}
    batches = {s.name: s.value for s in fams["jointpq_batch_requests"].samples}
    # 40 requests (+ 0 warm-ups: those bypass the batcher) in fewer engine calls than requests
    assert batches["jointpq_batch_requests_sum"] == 40
    assert batches["jointpq_batch_requests_count"] < 40


def test_query_cache_serves_repeats_identically(serve, artifact_root, queries):
    srv = serve(artifact_root)
    with client(srv) as c:
        before = c.get("/info").json()["artifact"]["query_cache"]  # the reload checks encoded canaries
        first = c.post("/search", json={"queries": queries[:4]}).json()
        again = c.post("/search", json={"queries": [queries[1], queries[0], queries[9]]}).json()
        stats = c.get("/info").json()["artifact"]["query_cache"]
        m = c.get("/metrics").text
    assert again["results"][0] == first["results"][1] and again["results"][1] == first["results"][0]
    hits, misses = stats["hits"] - before["hits"], stats["misses"] - before["misses"]
    assert hits + misses == 7 and hits >= 2  # queries[1], queries[0] repeat (others may be canaries)
    assert f"jointpq_query_cache_hits {float(stats['hits'])}" in m
    off = serve(artifact_root, query_cache_size=0)
    with client(off) as c:
        assert c.post("/search", json={"queries": queries[:4]}).json()["results"] == first["results"]
        assert c.get("/info").json()["artifact"]["query_cache"] is None


def test_the_documented_route_answers_like_the_fast_path(serve, artifact_root, queries):
    """The middleware sends POST /search straight to the handler; the FastAPI route (what the
    OpenAPI schema documents) calls the same handler. Both must give the same answers and errors."""
    from service.settings import Settings
    from tests.service.conftest import TOKEN, Server

    fast = serve(artifact_root)
    routed = Server(Settings(artifact_root=artifact_root, device="cpu", admin_token=TOKEN))
    routed.app.user_middleware.clear()  # no RequestMiddleware: requests reach the route
    bodies = [
        {"query": queries[3], "k": 4},
        {"vectors": rng_vectors(2, 64, seed=9), "nprobe": 2},
        {"query": "x", "k": 0},
        {"vector": [0.1] * 3},
        {},
    ]
    with routed, client(routed) as r, client(fast) as f:
        answers = [(r.post("/search", json=b), f.post("/search", json=b)) for b in bodies]
        assert "x-request-id" not in answers[0][0].headers and "x-request-id" in answers[0][1].headers
    for b, (ra, fa) in zip(bodies, answers, strict=True):
        assert ra.status_code == fa.status_code, (b, ra.text, fa.text)
        rj, fj = ra.json(), fa.json()
        rj.pop("took_ms", None), fj.pop("took_ms", None)
        assert rj == fj, b
    assert [fa.status_code for _, fa in answers] == [200, 200, 422, 422, 422]
