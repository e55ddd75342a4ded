"""Bad input gets a clear 4xx naming the field, never a 500 or a stack trace; 503 until ready."""

from __future__ import annotations

import pytest

from tests.service.conftest import client

V64 = [0.1] * 64
CASES = [  # (body, status, field, words in the message)
    ({"query": 5}, 422, "query", "string"),
    ({"query": ""}, 400, "query", "empty"),
    ({"query": "   "}, 400, "query", "empty"),
    ({"queries": []}, 400, "queries", "empty"),
    ({"queries": ["fine", " "]}, 400, "queries[1]", "empty"),
    ({"queries": "not a list"}, 422, "queries", "array"),
    ({"vector": [0.1] * 63}, 422, "vector", "63 dimensions"),
    ({"vectors": [V64, [0.1] * 3]}, 422, "vectors[1]", "3 dimensions"),
    ({"vectors": []}, 400, "vectors", "empty"),
    ({"vector": ["a", *V64[1:]]}, 422, "vector[0]", "number"),
    ({"query": "x", "k": 0}, 422, "k", "greater than or equal to 1"),
    ({"query": "x", "k": 100_000}, 422, "k", "less than or equal to 1000"),
    ({"query": "x", "k": "5"}, 422, "k", "integer"),
    ({"query": "x", "k": 2.5}, 422, "k", "integer"),
    ({"query": "x", "nprobe": 0}, 422, "nprobe", "greater than or equal to 1"),
    ({"query": "x", "nprobe": -3}, 422, "nprobe", "greater than or equal to 1"),
    ({"query": "x", "unknown": 1}, 422, "unknown", "Extra inputs"),
    ({"query": "x", "vector": V64}, 422, "body", "exactly one"),
    ({}, 422, "body", "exactly one"),
    ({"query": "x" * 5000}, 422, "query", "at most 2048"),
    ({"queries": ["q"] * 9}, 413, "queries", "at most 8"),
    ({"vectors": [V64] * 9}, 413, "vectors", "at most 8"),
]


@pytest.fixture(scope="module")
def srv(artifact_root):
    from service.settings import Settings
    from tests.service.conftest import TOKEN, Server

    with Server(Settings(artifact_root=artifact_root, device="cpu", admin_token=TOKEN, max_batch=8)) as s:
        yield s


@pytest.mark.parametrize(("body", "status", "field", "words"), CASES, ids=[str(c[0])[:40] for c in CASES])
def test_bad_body(srv, body, status, field, words):
    with client(srv) as c:
        r = c.post("/search", json=body)
    assert r.status_code == status, r.text
    out = r.json()
    assert words in out["error"], out
    assert field in [d["field"] for d in out["detail"]], out
    assert "Traceback" not in r.text


@pytest.mark.parametrize(
    ("raw", "words"),
    [
        (b'{"vector": [NaN' + b", 0.1" * 63 + b"]}", "finite"),
        (b'{"vector": [Infinity' + b", 0.1" * 63 + b"]}", "finite"),
        (b'{"query": "unterminated', "JSON"),
        (b"not json at all", "JSON"),
    ],
)
def test_nan_inf_and_broken_json(srv, raw, words):
    with client(srv) as c:
        r = c.post("/search", content=raw, headers={"content-type": "application/json"})
    assert r.status_code == 422, r.text
    assert words in r.json()["error"]


def test_oversized_body_is_413_before_parsing(artifact_root, serve):
    s = serve(artifact_root, max_body_bytes=4096)
    with client(s) as c:
        r = c.post("/search", json={"query": "y" * 10_000})
        assert r.status_code == 413 and "4096 bytes" in r.json()["error"]

        def chunks():  # no Content-Length: counted while streaming
            for _ in range(10):
                yield b"x" * 1000

        r = c.post("/search", content=chunks(), headers={"content-type": "application/json"})
        assert r.status_code == 413
        assert c.post("/search", json={"query": "still serving"}).status_code == 200


def test_text_on_a_vector_only_artifact_is_400(artifact_root, serve):
    s = serve(artifact_root, artifact="vec-v1")
    with client(s) as c:
        r = c.post("/search", json={"query": "hello"})
        assert r.status_code == 400 and "no query encoder" in r.json()["error"]
        assert c.post("/search", json={"vector": [0.0] * 24}).status_code == 200


def test_not_ready_without_artifact(tmp_path, serve):
    s = serve(tmp_path)  # an empty root
    with client(s) as c:
        assert c.get("/healthz").status_code == 200
        assert c.get("/readyz").status_code == 503
        r = c.post("/search", json={"query": "x"})
        assert r.status_code == 503 and "not ready" in r.json()["error"]
        assert c.get("/info").json()["ready"] is False


def test_unknown_route_and_method_are_json(srv):
    with client(srv) as c:
        r = c.get("/nope")
        assert r.status_code == 404 and r.json()["error"]
        r = c.get("/search")
        assert r.status_code == 405 and r.json()["error"]
