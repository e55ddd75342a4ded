"""Service latency and the effect of micro-batching, over real HTTP on loopback.

Starts the service (`jointpq serve`, one uvicorn process, its own GIL) on a loopback port with an
artifact root; this process is the client (httpx). Then:
1. single-request latency: N sequential requests from one httpx client (p50 / p90 / p99);
2. throughput under concurrency: C concurrent clients for T seconds, micro-batching on vs off
   (each its own fresh server), RPS and p50 / p99, plus the mean engine batch size from /metrics.
Both for text queries and for vector queries (vectors: the artifact's own encoder output).

    python bench/service.py --root artifacts/demo [--n 500] [--concurrency 1 8 32] [--seconds 10] [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path

import httpx
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/ itself, for http_load

from http_load import Service

DEMO_DATA = Path(__file__).resolve().parents[1] / "data" / "scifact-demo"


def pct(xs: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(xs) * 1000, q)) if xs else float("nan")


def sequential(url: str, bodies: list[dict], n: int) -> dict:
    lat = []
    with httpx.Client(base_url=url, timeout=30) as c:
        for i in range(20):  # warm-up
            c.post("/search", json=bodies[i % len(bodies)])
        for i in range(n):
            t0 = time.perf_counter()
            r = c.post("/search", json=bodies[i % len(bodies)])
            lat.append(time.perf_counter() - t0)
            assert r.status_code == 200, r.text
    return {"requests": n, "p50_ms": pct(lat, 50), "p90_ms": pct(lat, 90), "p99_ms": pct(lat, 99)}


async def closed_loop(url: str, bodies: list[dict], concurrency: int, seconds: float) -> dict:
    lat: list[float] = []
    errors = 0
    stop = time.perf_counter() + seconds
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=30, limits=limits) as c:

        async def user(u: int) -> None:
            nonlocal errors
            i = u
            while time.perf_counter() < stop:
                t0 = time.perf_counter()
                r = await c.post("/search", json=bodies[i % len(bodies)])
                lat.append(time.perf_counter() - t0)
                errors += r.status_code != 200
                i += concurrency

        t0 = time.perf_counter()
        await asyncio.gather(*(user(u) for u in range(concurrency)))
        took = time.perf_counter() - t0
    return {"rps": len(lat) / took, "p50_ms": pct(lat, 50), "p99_ms": pct(lat, 99), "errors": errors}


def mean_batch(url: str) -> float:
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(f"{url}/metrics").text
    vals = {s.name: s.value for f in text_string_to_metric_families(text) for s in f.samples if not s.labels}
    n = vals.get("jointpq_batch_queries_count", 0)
    return vals.get("jointpq_batch_queries_sum", 0) / n if n else float("nan")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--root", type=Path, default=Path("artifacts/demo"))
    p.add_argument("--n", type=int, default=500, help="sequential requests")
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument("--seconds", type=float, default=10)
    p.add_argument("--kinds", nargs="+", default=["text", "vector"])
    p.add_argument("--json", action="store_true")
    args = p.parse_args()

    from index import load_index
    from index.pointer import current_version
    from model.data import load_beir
    from model.encoders import load_encoder

    version = current_version(args.root)
    if version is None:
        sys.exit(f"no artifact in {args.root}: run `jointpq demo --no-serve` first")
    data = load_beir(DEMO_DATA, splits=("test",))
    texts = [data.queries[q] for q in sorted(data.qrels["test"])]
    enc = load_encoder(args.root / version)
    idx = load_index(args.root / version, device="cpu")
    vectors = enc.encode(texts).numpy().tolist()
    bodies = {"text": [{"query": t} for t in texts], "vector": [{"vector": v} for v in vectors]}
    rows = []

    def emit(row: dict) -> None:
        rows.append(row)
        if args.json:
            print(json.dumps(row), flush=True)
        else:
            cells = " ".join(f"{k}={v:.2f}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items())
            print(cells, flush=True)

    emit({"event": "artifact", "version": version, "n_items": idx.data.n, "backend": idx.backend})
    token = "bench-" + "0" * 16
    with Service(args.root, 1, True, token, version) as srv:
        for kind in args.kinds:
            emit({"test": "sequential", "kind": kind, "batching": True, **sequential(srv.url, bodies[kind], args.n)})
    for batching in (True, False):
        for kind in args.kinds:
            for c in args.concurrency:
                with Service(args.root, 1, batching, token, version) as srv:
                    r = asyncio.run(closed_loop(srv.url, bodies[kind], c, args.seconds))
                    emit({"test": "concurrent", "kind": kind, "batching": batching, "clients": c, **r,
                          "mean_batch": mean_batch(srv.url)})  # fmt: skip
    if not args.json:
        print("\n| kind | clients | batching on: RPS / p50 / p99 ms (mean batch) | off: RPS / p50 / p99 ms |")
        print("|---|---|---|---|")
        conc = [r for r in rows if r.get("test") == "concurrent"]
        for kind in args.kinds:
            for c in args.concurrency:
                on, off = (
                    next(r for r in conc if r["kind"] == kind and r["clients"] == c and r["batching"] is b)
                    for b in (True, False)
                )
                print(
                    f"| {kind} | {c} | {on['rps']:.0f} / {on['p50_ms']:.1f} / {on['p99_ms']:.1f} "
                    f"({on['mean_batch']:.1f})"
                    f" | {off['rps']:.0f} / {off['p50_ms']:.1f} / {off['p99_ms']:.1f} |"
                )


if __name__ == "__main__":
    main()
