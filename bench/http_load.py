"""End-to-end HTTP benchmark: `jointpq serve` on a loopback port, a load generator against it.

For each configuration (client x uvicorn workers x engine mode x user count) it starts a
fresh service, runs the load for a set time and prints (and with --json-out writes) RPS, p50 / p95 /
p99 latency per endpoint and the failure count. Beside it, the in-process engine's QPS for the same
single vector queries at the same nprobe (no HTTP), so the HTTP overhead shows.

    python bench/http_load.py --root artifacts/demo --mix text --users 32 --seconds 20
    python bench/http_load.py --root artifacts/demo --mix mixed --reload-every 2 --reload-versions v1 v2
    python bench/http_load.py --synthetic 1000000 --mix vector --client locust wrk --workers 1 2
    python bench/http_load.py --tiny       # seconds: a tiny hashed artifact, 4 users x 2 s, on + off

Clients: `locust` runs `loadtest/locustfile.py` (FastHttpUser; checks every answer). `wrk`
(`apt install wrk`; C, one thread, closed loop like locust's users) posts the same kinds of bodies
from a pre-built pool and only counts non-2xx answers and socket errors: it costs the CPU ~10x
less per request than locust, which matters when client and service share 2 cores, so its row is
the closer measure of what the service itself sustains. Both run on the same machine as the
service, so every figure is a floor for a client on another machine.

`--reload-every N` hot-reloads between the given versions every N seconds during the run and
exits non-zero if any request failed. The batching column is the mode each service reported in
its /info (a service that does not run the mode asked for stops the run).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import secrets
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from harness import (
    BATCHING_MODES,
    DEMO_DATA,
    ROOT,
    Batching,
    Report,
    Service,
    artifact_root,
    bin_path,
    markdown_table,
    parse_args,
    parse_modes,
)

MIXES = {
    "text": "text=1,batch=0,vector=0,invalid=0",
    "vector": "text=0,batch=0,vector=1,invalid=0",
    "mixed": "",  # the locustfile's default mix
}


def percentile_ms(cell: str) -> float:
    """A locust CSV percentile: blank or "N/A" (no request of that name finished) is NaN, not a crash."""
    return float(cell) if cell and cell != "N/A" else float("nan")


def run_locust(url: str, users: int, seconds: float, mix: str, out_dir: Path, rate: float | None = None) -> list[dict]:
    prefix = out_dir / f"locust-{users}"
    env = {**os.environ, "LOADTEST_WEIGHTS": MIXES[mix]}
    if rate:
        env["LOADTEST_RATE"] = str(rate)
    cmd = [
        bin_path("locust"), "-f", str(ROOT / "loadtest" / "locustfile.py"), "--headless", "--only-summary",
        "-u", str(users), "-r", str(users), "-t", f"{max(1, round(seconds))}s", "--host", url, "--csv", str(prefix),
        "--stop-timeout", "10", "--loglevel", "WARNING",
    ]  # fmt: skip
    subprocess.run(cmd, env=env, check=False, capture_output=True, text=True)
    with open(f"{prefix}_stats.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    out = []
    for r in rows:
        out.append(
            {
                "name": r["Name"],
                "requests": int(r["Request Count"]),
                "failures": int(r["Failure Count"]),
                "rps": float(r["Requests/s"]),
                "p50_ms": percentile_ms(r["50%"]),
                "p95_ms": percentile_ms(r["95%"]),
                "p99_ms": percentile_ms(r["99%"]),
            }
        )
    return out


WRK_SCRIPT = """
local bodies = {%s}
local i = 0
request = function()
  i = i %% #bodies + 1
  return wrk.format("POST", "/search", {["Content-Type"] = "application/json"}, bodies[i])
end
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'WRK {"requests": %%d, "duration_us": %%d, "non2xx": %%d, "socket_errors": %%d, '
    .. '"p50_us": %%d, "p95_us": %%d, "p99_us": %%d}\\n',
    summary.requests, summary.duration, e.status, e.connect + e.read + e.write + e.timeout,
    latency:percentile(50), latency:percentile(95), latency:percentile(99)))
end
"""


def pool_texts() -> list[str]:
    """The locustfile's query pool: $LOADTEST_QUERIES, else the shipped SciFact subset's queries."""
    path = Path(os.environ.get("LOADTEST_QUERIES", DEMO_DATA / "queries.jsonl"))
    return [json.loads(line)["text"] for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def wrk_bodies(url: str, mix: str, n: int = 512, k: int = 10) -> list[bytes]:
    """The locustfile's request kinds, pre-encoded: text queries from its pool, or Gaussian vectors
    of the served artifact's dimension."""
    if mix == "text":
        return [json.dumps({"query": t, "k": k}).encode() for t in pool_texts()]
    dim = int(httpx.get(f"{url}/info", timeout=10).json()["artifact"]["dim"])
    rng = np.random.default_rng(0)
    return [json.dumps({"vector": [round(float(v), 6) for v in rng.standard_normal(dim)], "k": k}).encode()
            for _ in range(n)]  # fmt: skip


def run_wrk(url: str, users: int, seconds: float, mix: str, out_dir: Path) -> list[dict]:
    if mix not in ("text", "vector"):
        raise SystemExit("--client wrk runs the text or vector mix (its answers are not checked for expected 4xx)")
    bodies = wrk_bodies(url, mix)
    script = out_dir / "wrk.lua"
    # Lua long strings hold the JSON bodies verbatim; none of them contains "]==]"
    script.write_text(WRK_SCRIPT % ",\n".join(f"[==[{b.decode()}]==]" for b in bodies), encoding="utf-8")
    cmd = ["wrk", "-t1", f"-c{users}", f"-d{max(1, round(seconds))}s", "--timeout", "10s", "-s", str(script), url]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    line = next(ln for ln in out.splitlines() if ln.startswith("WRK "))
    w = json.loads(line[4:])
    failures = w["non2xx"] + w["socket_errors"]
    return [
        {
            "name": f"/search {mix}",
            "requests": w["requests"],
            "failures": failures,
            "rps": w["requests"] / (w["duration_us"] / 1e6),
            "p50_ms": w["p50_us"] / 1000,
            "p95_ms": w["p95_us"] / 1000,
            "p99_ms": w["p99_us"] / 1000,
        }
    ]


def reloader(
    url: str, token: str, versions: list[str], every: float, stop: threading.Event, log: list,
    root: Path | None = None,
) -> None:  # fmt: skip
    """Every `every` seconds the next version: by POST /admin/reload (one process), or with `root`
    by publishing it as the root's CURRENT pointer, which every worker of a watching service follows."""
    from index.pointer import publish

    i = 0
    while not stop.wait(every):
        v = versions[i % len(versions)]
        if root is not None:
            publish(root, v)
            log.append((v, 200))
        else:
            r = httpx.post(f"{url}/admin/reload", json={"version": v}, headers={"Authorization": f"Bearer {token}"},
                           timeout=60)  # fmt: skip
            log.append((v, r.status_code))
        i += 1


def warm(url: str, workers: int) -> None:
    """Every query of the locustfile's pool once per worker process (each has its own cache)."""
    texts = pool_texts()
    with httpx.Client(base_url=url, timeout=120) as c:
        for _ in range(workers * 3):  # connections land on workers at random: go round a few times
            for s in range(0, len(texts), 64):
                c.post("/search", json={"queries": texts[s : s + 64]}, headers={"connection": "close"})


def engine_qps(root: Path, version: str, nprobe: int, seconds: float = 5.0) -> dict:
    """In-process, no HTTP: single vector queries from one caller and from two threads (one per
    core; Faiss releases the GIL), and 64-query batches from one caller."""
    from concurrent.futures import ThreadPoolExecutor

    import torch

    from index import load_index

    torch.set_num_threads(2)
    idx = load_index(root / version, device="cpu")
    q = np.random.default_rng(0).standard_normal((4096, idx.data.d)).astype(np.float32)

    def loop(batch: int, offset: int = 0) -> int:
        n, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            s = (offset + n) % 4096
            idx.search_rows(q[s : s + batch], 10, nprobe)
            n += batch
        return n

    out = {"engine_qps_batch1": loop(1) / seconds, "engine_qps_batch64": loop(64) / seconds}
    with ThreadPoolExecutor(2) as pool:
        out["engine_qps_batch1_2threads"] = sum(pool.map(loop, [1, 1], [0, 2048])) / seconds
    return out


def service_env(args: argparse.Namespace) -> dict[str, str]:
    """The run's JOINTPQ_* settings beyond the harness's: encoder runtime, query cache, batcher."""
    env = {"JOINTPQ_ENCODER_RUNTIME": args.encoder_runtime}
    if not args.query_cache:  # every text is encoded: unique queries, whatever the pool repeats
        env["JOINTPQ_QUERY_CACHE_SIZE"] = "0"
    if args.batch_wait_ms is not None:
        env["JOINTPQ_BATCH_WAIT_MS"] = str(args.batch_wait_ms)
    if args.batch_max_queries is not None:
        env["JOINTPQ_BATCH_MAX_QUERIES"] = str(args.batch_max_queries)
    return env


def encoder_qps(root: Path, version: str, runtime: str, threads: int | None, seconds: float) -> dict:
    """In-process, no HTTP: the served artifact's query tower on the same runtime, over the text
    pool (texts never repeat within a timed call), one query per call and batches of 64."""
    import torch

    from model.encoders import load_encoder

    if threads:
        torch.set_num_threads(threads)
    enc = load_encoder(root / version, runtime=runtime, threads=threads)
    texts = pool_texts()

    def loop(batch: int) -> float:
        n, i, t0 = 0, 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            chunk = [texts[(i + j) % len(texts)] for j in range(batch)]
            enc.encode(chunk, batch_size=batch)
            n, i = n + batch, i + batch
        return n / (time.perf_counter() - t0)

    loop(1)  # warm-up
    serving = enc.runtime_info or {}
    return {"encoder_qps_batch1": loop(1), "encoder_qps_batch64": loop(64),
            "encoder_runtime": serving.get("runtime"), "encoder_precision": serving.get("precision")}  # fmt: skip


def synthetic_root(n: int) -> Path:
    """artifacts/bench-<n>: a two-step IVF-PQ artifact over seeded synthetic vectors (built once)."""
    from index import build_ivfpq, write_artifact
    from index.pointer import publish
    from service.demo import synthetic_clustered

    root = ROOT / "artifacts" / f"bench-{n}"
    if not (root / "v1" / "manifest.json").exists():
        x, _ = synthetic_clustered(n, 1, d=128, seed=0)
        for v in ("v1", "v2"):  # two versions to hot-reload between
            idx = build_ivfpq(x, nlist=1024, M=16, metric="ip", ids=[f"item-{i}" for i in range(n)], seed=int(v[1]))
            write_artifact(root / v, idx)
        publish(root, "v1")
    return root


def run_one(
    args: argparse.Namespace, root: Path, version: str, versions: list[str], token: str, tmp: Path,
    client: str, workers: int, mode: Batching, users: int,
) -> tuple[list[dict], list, Batching, Any]:  # fmt: skip
    """A fresh service, warmed if asked, `client` against it (hot reloads meanwhile if asked).
    Returns the client's stats, the reload log, the batching mode the service reported in /info
    and what /info says runs its query encoder."""
    from index.pointer import publish

    by_pointer = args.reload_every is not None and args.reload_via == "pointer"
    with Service(
        root, workers=workers, batching=mode, token=token, version=version, torch_threads=args.torch_threads,
        watch=by_pointer, env=service_env(args),
    ) as svc:  # fmt: skip
        served = svc.batching
        encoder = ((svc.info.get("artifact") or {}).get("encoder") or {}).get("serving")
        if args.warm_cache:
            warm(svc.url, workers)
        stop, log = threading.Event(), []
        t = None
        if args.reload_every:
            t = threading.Thread(
                target=reloader,
                args=(svc.url, token, versions, args.reload_every, stop, log, root if by_pointer else None),
            )
            t.start()
        try:
            if client == "wrk":
                stats = run_wrk(svc.url, users, args.seconds, args.mix, tmp)
            else:
                stats = run_locust(svc.url, users, args.seconds, args.mix, tmp, args.rate)
        finally:
            stop.set()
            if t:
                t.join()
            if by_pointer:
                publish(root, version)  # leave the root as it was
    return stats, log, served, encoder


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--root", type=Path, help="artifact root (default: artifacts/demo; --tiny: a tiny hashed one)")
    p.add_argument("--synthetic", type=int, help="serve a synthetic N-item artifact instead of --root")
    p.add_argument("--mix", choices=sorted(MIXES), default="text")
    p.add_argument("--client", choices=("locust", "wrk"), nargs="+", default=["locust"])
    p.add_argument("--users", type=int, nargs="+", default=[32])
    p.add_argument("--seconds", type=float, default=20)
    p.add_argument("--workers", type=int, nargs="+", default=[1])
    p.add_argument(
        "--batching", choices=(*BATCHING_MODES, "both", "all"), default="both",
        help="micro-batching on, off, or off with vector searches on the event loop (inline); both: on + off",
    )  # fmt: skip
    p.add_argument("--rate", type=float, help="requests/s per user (offered load = users x rate); default: flat out")
    p.add_argument("--reload-every", type=float, help="hot-reload every N seconds during each run")
    p.add_argument(
        "--reload-via", choices=("admin", "pointer"), default="admin",
        help="admin: POST /admin/reload (one worker process); pointer: publish CURRENT, the service watches it",
    )  # fmt: skip
    p.add_argument("--reload-versions", nargs="+", help="versions to alternate between (default: all in root)")
    p.add_argument(
        "--torch-threads", type=int, help="JOINTPQ_TORCH_THREADS per worker (default: torch's, one per core)"
    )
    p.add_argument("--nprobe", type=int, default=16, help="the service's default nprobe (for the engine row)")
    p.add_argument(
        "--warm-cache", action="store_true", help="send every query text once before the run (steady-state cache)"
    )
    p.add_argument("--engine-seconds", type=float, default=5.0, help="time per in-process engine QPS sample")
    p.add_argument(
        "--encoder-runtime", choices=("auto", "torch", "onnx"), default="auto", help="JOINTPQ_ENCODER_RUNTIME"
    )
    p.add_argument(
        "--query-cache", action=argparse.BooleanOptionalAction, default=True,
        help="--no-query-cache: JOINTPQ_QUERY_CACHE_SIZE=0, every text query is encoded (unique queries)",
    )  # fmt: skip
    p.add_argument("--batch-wait-ms", type=float, help="JOINTPQ_BATCH_WAIT_MS (default: the service's)")
    p.add_argument("--batch-max-queries", type=int, help="JOINTPQ_BATCH_MAX_QUERIES (default: the service's)")
    p.add_argument("--json-out", type=Path)
    args = parse_args(p, tiny={"users": [4], "seconds": 2, "engine_seconds": 0.2})
    if "wrk" in args.client and (args.rate or args.mix == "mixed"):
        p.error("--client wrk runs flat out (no --rate) and only the text or vector mix")

    root, version = artifact_root(synthetic_root(args.synthetic) if args.synthetic else args.root, args.tiny)
    versions = args.reload_versions or sorted(
        d.name for d in root.iterdir() if d.is_dir() and (d / "manifest.json").exists()
    )
    token = secrets.token_hex(16)
    report = Report(as_json=True)
    engine = engine_qps(root, version, args.nprobe, args.engine_seconds)
    if args.mix == "text":  # the text path's own limit: the encoder in process, same runtime, same run
        engine |= encoder_qps(root, version, args.encoder_runtime, args.torch_threads, args.engine_seconds)
    report({"event": "engine", "version": version, "nprobe": args.nprobe, **engine})
    modes = parse_modes(args.batching)
    results = []
    failed = 0
    with tempfile.TemporaryDirectory() as tmp:
        configs = [(c, w, m, u) for c in args.client for w in args.workers for m in modes for u in args.users]
        for client, workers, mode, users in configs:
            stats, log, served, encoder = run_one(
                args, root, version, versions, token, Path(tmp), client, workers, mode, users
            )
            for s in stats:  # batching: what the service reported in /info, not what was asked for
                row = {"client": client, "workers": workers, "batching": served, "users": users, "mix": args.mix,
                       "artifact": f"{root.name}/{version}", "warm_cache": args.warm_cache,
                       "rate_per_user": args.rate,
                       "query_cache": args.query_cache and os.environ.get("JOINTPQ_QUERY_CACHE_SIZE", "default"),
                       "encoder": encoder, "batch_wait_ms": args.batch_wait_ms,
                       "batch_max_queries": args.batch_max_queries, **s}  # fmt: skip
                if "encoder_qps_batch64" in engine:  # share of the encoder's in-process batched throughput
                    row["of_encoder_batch64"] = s["rps"] / engine["encoder_qps_batch64"]
                if args.reload_every:
                    row["reloads"] = len(log)
                    row["reloads_ok"] = sum(code == 200 for _, code in log)
                results.append(row)
                report(row)
                if s["name"] == "Aggregated" or client == "wrk":
                    failed += s["failures"] + (row.get("reloads", 0) - row.get("reloads_ok", 0))
    header = ("client", "workers", "batching", "users", "endpoint", "RPS", "p50 / p95 / p99 ms", "failures",
              "of encoder b64")  # fmt: skip
    shown = [r for r in results if r["name"] != "/info" and (r["name"] != "Aggregated" or args.mix == "mixed")]
    print("\n" + markdown_table(header, [
        (r["client"], r["workers"], r["batching"], r["users"], r["name"], f"{r['rps']:.0f}",
         f"{r['p50_ms']:.1f} / {r['p95_ms']:.1f} / {r['p99_ms']:.1f}", r["failures"],
         f"{r['of_encoder_batch64']:.0%}" if "of_encoder_batch64" in r else "-")
        for r in shown
    ]))  # fmt: skip
    print(f"\nin-process engine, nprobe {args.nprobe}: {engine['engine_qps_batch1']:.0f} QPS single queries "
          f"(one caller), {engine['engine_qps_batch1_2threads']:.0f} (two threads), "
          f"{engine['engine_qps_batch64']:.0f} in batches of 64")  # fmt: skip
    if "encoder_qps_batch64" in engine:
        print(f"in-process query encoder ({engine['encoder_runtime']} {engine['encoder_precision']}):"
              f" {engine['encoder_qps_batch1']:.0f} q/s one at a time, {engine['encoder_qps_batch64']:.0f} in batches"
              " of 64")  # fmt: skip
    if args.json_out:
        args.json_out.write_text(json.dumps({"engine": engine, "runs": results}, indent=1))
    if args.reload_every and failed:
        print(f"FAILED: {failed} requests failed across hot reloads", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
