"""Locust load test for the jointpq service: a realistic mix of searches.

    locust -f loadtest/locustfile.py --headless -u 50 -r 50 -t 60s --host http://127.0.0.1:8000
    locust -f loadtest/locustfile.py --headless ... --tags vector       # only vector queries

Tasks (tags, default weights): `text` single text queries drawn from a data set's queries (70),
`batch` batches of 8 text queries (5), `vector` single pre-encoded vectors (20), `invalid` bad
requests that must be refused with their 4xx, counted as expected, not as failures (5).
Any other status, a wrong body or a missing `version` is a failure.

Environment:
    LOADTEST_QUERIES   BEIR queries.jsonl to draw texts from (default: the shipped SciFact subset)
    LOADTEST_WEIGHTS   e.g. "text=1,vector=0,batch=0,invalid=0" to change the mix
    LOADTEST_K         k per query (default 10)
    LOADTEST_RATE      requests/s per user (offered load = users x rate); default: as fast as possible
    LOADTEST_WAIT      fixed pause between a user's requests, in seconds
"""

from __future__ import annotations

import functools
import json
import os
import random
from pathlib import Path

from locust import FastHttpUser, constant, constant_throughput, tag, task

HERE = Path(__file__).resolve().parent
QUERIES = Path(os.environ.get("LOADTEST_QUERIES", HERE.parent / "data" / "scifact-demo" / "queries.jsonl"))
K = int(os.environ.get("LOADTEST_K", "10"))
WAIT = float(os.environ.get("LOADTEST_WAIT", "0"))
RATE = float(os.environ.get("LOADTEST_RATE", "0"))  # per-user requests/s: users x rate = offered load


def _texts() -> list[str]:
    with open(QUERIES, encoding="utf-8") as f:
        return [json.loads(line)["text"] for line in f if line.strip()]


def _weights() -> dict[str, int]:
    w = {"text": 70, "batch": 5, "vector": 20, "invalid": 5}
    for part in filter(None, os.environ.get("LOADTEST_WEIGHTS", "").split(",")):
        name, _, value = part.partition("=")
        if name.strip() not in w:
            raise ValueError(f"LOADTEST_WEIGHTS: unknown task {name!r} (one of {sorted(w)})")
        w[name.strip()] = int(value)
    return w


TEXTS = _texts()
WEIGHTS = _weights()
INVALID = [  # (body, expected status)
    ({"query": ""}, 400),
    ({"query": "x", "k": 0}, 422),
    ({"vector": [float("nan")]}, 422),
    ({"query": "x", "unknown": 1}, 422),
    ({}, 422),
]


JSON = {"content-type": "application/json"}


@functools.cache
def _vector_bodies(dim: int, n: int = 512) -> tuple[bytes, ...]:
    """Pre-encoded Gaussian query vectors: drawing and JSON-encoding hundreds of floats per request
    would cost the load generator more CPU than the service spends on some searches."""
    rng = random.Random(0)
    return tuple(
        json.dumps({"vector": [round(rng.gauss(0.0, 1.0), 6) for _ in range(dim)], "k": K}).encode() for _ in range(n)
    )


class SearchUser(FastHttpUser):
    wait_time = constant_throughput(RATE) if RATE else constant(WAIT)
    dim: int | None = None

    def on_start(self) -> None:
        with self.client.get("/info", name="/info", catch_response=True) as r:
            art = (r.json() or {}).get("artifact") if r.status_code == 200 else None
            if not art:
                r.failure(f"service not ready: {r.status_code}")
                return
            self.dim = int(art["dim"])
            self.has_encoder = art.get("encoder") is not None

    def _search(self, body: dict | bytes, name: str, n: int) -> None:
        kw = {"data": body, "headers": JSON} if isinstance(body, bytes) else {"json": body}
        with self.client.post("/search", name=name, catch_response=True, **kw) as r:
            if r.status_code != 200:
                r.failure(f"{r.status_code}: {r.text[:200]}")
                return
            out = r.json()
            if not out.get("version") or len(out.get("results", ())) != n:
                r.failure(f"malformed answer: {r.text[:200]}")

    @tag("text")
    @task(WEIGHTS["text"])
    def text(self) -> None:
        if self.dim is not None and self.has_encoder:
            self._search({"query": random.choice(TEXTS), "k": K}, "/search text", 1)

    @tag("batch")
    @task(WEIGHTS["batch"])
    def batch(self) -> None:
        if self.dim is not None and self.has_encoder:
            self._search({"queries": random.sample(TEXTS, 8), "k": K}, "/search batch8", 8)

    @tag("vector")
    @task(WEIGHTS["vector"])
    def vector(self) -> None:
        if self.dim is not None:
            self._search(random.choice(_vector_bodies(self.dim)), "/search vector", 1)

    @tag("invalid")
    @task(WEIGHTS["invalid"])
    def invalid(self) -> None:
        body, status = random.choice(INVALID)
        data = json.dumps(body).encode()  # json writes NaN as the non-standard literal the server must refuse
        with self.client.post("/search", data=data, headers=JSON, name="/search invalid", catch_response=True) as r:
            if r.status_code == status and "error" in r.text:
                r.success()  # the refusal we expect is not a failure
            else:
                r.failure(f"expected {status}, got {r.status_code}: {r.text[:200]}")
