"""Service latency and the effect of micro-batching, over real HTTP on loopback.

Starts the service (`jointpq serve`, one uvicorn process, its own GIL) on a loopback port with an
artifact root; this process is the client (httpx). Then:
1. single-request latency: N sequential requests from one httpx client (p50 / p90 / p99);
2. throughput under concurrency: C concurrent clients for T seconds, micro-batching on vs off
   (each its own fresh server), RPS and p50 / p99, plus the mean engine batch size from /metrics.
Both for text queries and for vector queries (vectors: the artifact's own encoder output).
3. `--heavy`: small requests (one unique text query each, C clients) alone, then beside one client
   looping heavy requests (256 distinct 2,048-character queries, k = 1000, inside every limit):
   p50 / p99 of the small ones in both cases, and the heavy requests' latency. One heavy request
   once made every small one wait for all of it (14 s); it now runs in pieces, others between.
Every row's `batching` is the mode the server reported in /info, and a server that does not run the
mode asked for stops the run (a bool passed for a mode once made "on vs off" run off twice).

    python bench/service.py --root artifacts/demo [--n 500] [--concurrency 1 8 32] [--seconds 10] [--json]
    python bench/service.py --tiny         # seconds: a tiny hashed artifact, 20 sequential requests, 4 clients x 0.5 s
"""

from __future__ import annotations

import argparse
import asyncio
import os
import time
from pathlib import Path

import httpx
import numpy as np
from harness import DEMO_DATA, Batching, Report, Service, artifact_root, markdown_table, parse_args

MODES: tuple[Batching, Batching] = ("on", "off")  # the comparison this bench makes


def pct(xs: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(xs) * 1000, q)) if xs else float("nan")


def sequential(url: str, bodies: list[dict], n: int, warmup: int = 20) -> dict:
    lat = []
    with httpx.Client(base_url=url, timeout=30) as c:
        for i in range(warmup):
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


def unique_texts(texts: list[str], n: int, chars: int | None, start: int) -> list[str]:
    """n distinct texts (so the query cache never answers), each cut or padded to `chars`."""
    out = []
    for i in range(start, start + n):
        t = f"{i} {texts[i % len(texts)]}"
        if chars:
            t = (t + " ") * (chars // (len(t) + 1) + 1)
            t = t[:chars]
        out.append(t)
    return out


async def heavy_beside_small(url: str, texts: list[str], clients: int, seconds: float, heavy: bool) -> dict:
    """Closed-loop small requests (unique single texts) for `seconds`, with or without one client
    looping heavy requests at the same time; latency of both kinds."""
    small_lat: list[float] = []
    heavy_lat: list[float] = []
    errors = 0
    stop = time.perf_counter() + seconds
    counter = iter(range(10**9))
    limits = httpx.Limits(max_connections=clients + 1, max_keepalive_connections=clients + 1)
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as c:

        async def small_user() -> None:
            nonlocal errors
            while time.perf_counter() < stop:
                q = unique_texts(texts, 1, None, 10**6 + next(counter))[0]
                t0 = time.perf_counter()
                r = await c.post("/search", json={"query": q})
                small_lat.append(time.perf_counter() - t0)
                errors += r.status_code != 200

        async def heavy_user() -> None:
            nonlocal errors
            while time.perf_counter() < stop:
                qs = unique_texts(texts, 256, 2048, 256 * next(counter))
                t0 = time.perf_counter()
                r = await c.post("/search", json={"queries": qs, "k": 1000})
                heavy_lat.append(time.perf_counter() - t0)
                errors += r.status_code != 200

        users = [small_user() for _ in range(clients)] + ([heavy_user()] if heavy else [])
        t0 = time.perf_counter()
        await asyncio.gather(*users)
        took = time.perf_counter() - t0
    return {
        "small_rps": len(small_lat) / took,
        "small_p50_ms": pct(small_lat, 50),
        "small_p99_ms": pct(small_lat, 99),
        "small_max_ms": max(small_lat) * 1000 if small_lat else float("nan"),
        "heavy_requests": len(heavy_lat),
        "heavy_p50_ms": pct(heavy_lat, 50),
        "errors": errors,
    }


def mean_batch(url: str) -> float:
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(f"{url}/metrics").text
    vals = {s.name: s.value for f in text_string_to_metric_families(text) for s in f.samples if not s.labels}
    n = vals.get("jointpq_batch_queries_count", 0)
    return vals.get("jointpq_batch_queries_sum", 0) / n if n else float("nan")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--root", type=Path, help="artifact root (default: artifacts/demo; --tiny: a tiny hashed one)")
    p.add_argument("--n", type=int, default=500, help="sequential requests")
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument("--seconds", type=float, default=10)
    p.add_argument("--kinds", nargs="+", choices=("text", "vector"), default=["text", "vector"])
    p.add_argument("--warmup", type=int, default=20, help="unmeasured sequential requests first")
    p.add_argument("--heavy", action="store_true", help="also: small requests beside heavy ones (see above)")
    p.add_argument("--heavy-clients", type=int, default=4, help="small-request clients in --heavy")
    p.add_argument("--heavy-seconds", type=float, default=30, help="duration of each --heavy run")
    p.add_argument("--skip-basic", action="store_true", help="only the --heavy runs")
    p.add_argument(
        "--query-cache",
        action="store_true",
        help="keep the service's query-embedding cache on (default off: the bench cycles through a few hundred "
        "queries, so with it on every text row after the first pass measures cache hits, not the encoder)",
    )
    p.add_argument("--json", action="store_true")
    args = parse_args(
        p, tiny={"n": 20, "concurrency": [4], "seconds": 0.5, "warmup": 5, "heavy_seconds": 1.0, "heavy_clients": 2}
    )

    from index import load_index
    from model.data import load_beir
    from model.encoders import load_encoder

    if not args.query_cache:
        os.environ["JOINTPQ_QUERY_CACHE_SIZE"] = "0"  # inherited by every `jointpq serve` started below
    root, version = artifact_root(args.root, args.tiny)
    data = load_beir(DEMO_DATA, splits=("test",))
    texts = [data.queries[q] for q in sorted(data.qrels["test"])]
    enc = load_encoder(root / version)
    idx = load_index(root / version, device="cpu")
    vectors = enc.encode(texts).numpy().tolist()
    bodies = {"text": [{"query": t} for t in texts], "vector": [{"vector": v} for v in vectors]}
    emit = Report(args.json)
    emit({"event": "artifact", "version": version, "n_items": idx.data.n, "backend": idx.backend,
          "query_cache": bool(args.query_cache)})  # fmt: skip
    token = "bench-" + "0" * 16
    # rows carry `batching` as the server reported it (Service checks it against the mode asked for)
    if args.heavy:
        for mode in MODES:
            with Service(root, batching=mode, token=token, version=version) as srv:
                for heavy in (False, True):
                    r = asyncio.run(heavy_beside_small(srv.url, texts, args.heavy_clients, args.heavy_seconds, heavy))
                    emit({"test": "heavy", "batching": srv.batching, "with_heavy": heavy,
                          "clients": args.heavy_clients, **r})  # fmt: skip
    if args.skip_basic:
        modes: tuple[Batching, ...] = ()
    else:
        modes = MODES
        with Service(root, batching="on", token=token, version=version) as srv:
            for kind in args.kinds:
                r = sequential(srv.url, bodies[kind], args.n, args.warmup)
                emit({"test": "sequential", "kind": kind, "batching": srv.batching, **r})
    for mode in modes:
        for kind in args.kinds:
            for c in args.concurrency:
                with Service(root, batching=mode, token=token, version=version) as srv:
                    r = asyncio.run(closed_loop(srv.url, bodies[kind], c, args.seconds))
                    emit({"test": "concurrent", "kind": kind, "batching": srv.batching, "clients": c, **r,
                          "mean_batch": mean_batch(srv.url)})  # fmt: skip
    if not args.json and args.heavy:
        rows = [r for r in emit.rows if r.get("test") == "heavy"]
        print("\nSmall requests (unique single texts) alone and beside one client looping heavy requests\n")
        print(markdown_table(
            ("batching", "heavy running", "small RPS", "small p50 ms", "small p99 ms", "small max ms",
             "heavy requests", "heavy p50 ms", "errors"),
            [(r["batching"], "yes" if r["with_heavy"] else "no", f"{r['small_rps']:.0f}", f"{r['small_p50_ms']:.1f}",
              f"{r['small_p99_ms']:.1f}", f"{r['small_max_ms']:.1f}", r["heavy_requests"], f"{r['heavy_p50_ms']:.0f}",
              r["errors"]) for r in rows],
        ))  # fmt: skip
    if not args.json and modes:
        conc = [r for r in emit.rows if r.get("test") == "concurrent"]
        print(
            "\nClosed loop: one row per server, batching as its /info reported (mean batch: queries per engine call)\n"
        )
        print(markdown_table(
            ("kind", "clients", "batching", "RPS", "p50 ms", "p99 ms", "mean batch", "errors"),
            [(r["kind"], r["clients"], r["batching"], f"{r['rps']:.0f}", f"{r['p50_ms']:.1f}", f"{r['p99_ms']:.1f}",
              f"{r['mean_batch']:.1f}", r["errors"]) for r in sorted(conc, key=lambda r: (r["kind"], r["clients"]))],
        ))  # fmt: skip


if __name__ == "__main__":
    main()
