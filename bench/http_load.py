"""End-to-end HTTP benchmark: `jointpq serve` on a loopback port, locust headless against it.

For each configuration (uvicorn workers x micro-batching on/off x user count) it starts a fresh
service, runs `loadtest/locustfile.py` for a set time and prints (and with --json-out writes) RPS,
p50 / p95 / p99 latency per endpoint and the failure count. Beside it, the in-process engine's
QPS for the same single vector queries at the same nprobe (no HTTP), so the HTTP overhead shows.

    python bench/http_load.py --root artifacts/demo --mix text --users 32 --seconds 20
    python bench/http_load.py --root artifacts/demo --mix mixed --reload-every 2 --reload-versions v1 v2
    python bench/http_load.py --synthetic 1000000 --mix vector       # builds artifacts/bench-1m once

`--reload-every N` hot-reloads between the given versions every N seconds during the run and
exits non-zero if any request failed. Locust runs on the same machine as the service (on 2 cores
they share the CPU), so the figures are a floor for a separate client.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import secrets
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
MIXES = {
    "text": "text=1,batch=0,vector=0,invalid=0",
    "vector": "text=0,batch=0,vector=1,invalid=0",
    "mixed": "",  # the locustfile's default mix
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def bin_path(name: str) -> str:
    local = Path(sys.executable).parent / name
    return str(local) if local.exists() else name


class Service:
    """`jointpq serve` as a subprocess (the real command, real uvicorn workers)."""

    def __init__(self, root: Path, workers: int, batching: bool, token: str, version: str | None = None):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = {
            **os.environ,
            "JOINTPQ_ARTIFACT_ROOT": str(root),
            "JOINTPQ_WORKERS": str(workers),
            "JOINTPQ_BATCHING": str(batching).lower(),
            "JOINTPQ_ADMIN_TOKEN": token,
            "JOINTPQ_DEVICE": "cpu",
            "JOINTPQ_LOG_LEVEL": "warning",
            "JOINTPQ_PORT": str(self.port),
        }
        if version:
            env["JOINTPQ_ARTIFACT"] = version
        if workers > 1:  # share the 2 cores between processes instead of oversubscribing
            env["JOINTPQ_TORCH_THREADS"] = "1"
        self.proc = subprocess.Popen([bin_path("jointpq"), "serve"], env=env, stderr=subprocess.PIPE, text=True)

    def __enter__(self) -> Service:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"service exited: {self.proc.stderr.read()[-2000:]}")
            try:
                if httpx.get(f"{self.url}/readyz", timeout=2).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        raise RuntimeError("service not ready after 300 s")

    def __exit__(self, *exc) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def run_locust(url: str, users: int, seconds: float, mix: str, out_dir: Path, rate: float | None = None) -> list[dict]:
    prefix = out_dir / f"locust-{users}"
    env = {**os.environ, "LOADTEST_WEIGHTS": MIXES[mix]}
    if rate:
        env["LOADTEST_RATE"] = str(rate)
    cmd = [
        bin_path("locust"), "-f", str(ROOT / "loadtest" / "locustfile.py"), "--headless", "--only-summary",
        "-u", str(users), "-r", str(users), "-t", f"{int(seconds)}s", "--host", url, "--csv", str(prefix),
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
                "p50_ms": float(r["50%"] or "nan"),
                "p95_ms": float(r["95%"] or "nan"),
                "p99_ms": float(r["99%"] or "nan"),
            }
        )
    return out


def reloader(url: str, token: str, versions: list[str], every: float, stop: threading.Event, log: list) -> None:
    i = 0
    while not stop.wait(every):
        v = versions[i % len(versions)]
        r = httpx.post(f"{url}/admin/reload", json={"version": v}, headers={"Authorization": f"Bearer {token}"},
                       timeout=60)  # fmt: skip
        log.append((v, r.status_code))
        i += 1


def warm(url: str, workers: int) -> None:
    """Every query of the locustfile's pool once per worker process (each has its own cache)."""
    path = Path(os.environ.get("LOADTEST_QUERIES", ROOT / "data" / "scifact-demo" / "queries.jsonl"))
    texts = [json.loads(line)["text"] for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    with httpx.Client(base_url=url, timeout=120) as c:
        for _ in range(workers * 3):  # connections land on workers at random: go round a few times
            for s in range(0, len(texts), 64):
                c.post("/search", json={"queries": texts[s : s + 64]}, headers={"connection": "close"})


def engine_qps(root: Path, version: str, nprobe: int, seconds: float = 5.0) -> dict:
    """In-process: single vector queries, one search call each, and 64-query batches."""
    import torch

    from index import load_index

    torch.set_num_threads(2)
    idx = load_index(root / version, device="cpu")
    q = np.random.default_rng(0).standard_normal((4096, idx.data.d)).astype(np.float32)
    out = {}
    for batch in (1, 64):
        n, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            idx.search_rows(q[(n % 4096) : (n % 4096) + batch], 10, nprobe)
            n += batch
        out[f"engine_qps_batch{batch}"] = n / (time.perf_counter() - t0)
    return out


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


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--root", type=Path, default=ROOT / "artifacts" / "demo")
    p.add_argument("--synthetic", type=int, help="serve a synthetic N-item artifact instead of --root")
    p.add_argument("--mix", choices=sorted(MIXES), default="text")
    p.add_argument("--users", type=int, nargs="+", default=[32])
    p.add_argument("--seconds", type=float, default=20)
    p.add_argument("--workers", type=int, nargs="+", default=[1])
    p.add_argument("--batching", choices=("on", "off", "both"), default="both")
    p.add_argument("--rate", type=float, help="requests/s per user (offered load = users x rate); default: flat out")
    p.add_argument("--reload-every", type=float, help="hot-reload every N seconds during each run")
    p.add_argument("--reload-versions", nargs="+", help="versions to alternate between (default: all in root)")
    p.add_argument("--nprobe", type=int, default=16, help="the service's default nprobe (for the engine row)")
    p.add_argument(
        "--warm-cache", action="store_true", help="send every query text once before the run (steady-state cache)"
    )
    p.add_argument("--json-out", type=Path)
    args = p.parse_args()

    from index.pointer import current_version

    root = synthetic_root(args.synthetic) if args.synthetic else args.root
    version = current_version(root)
    if version is None:
        sys.exit(f"no artifact in {root}: run `jointpq demo --no-serve` first")
    versions = args.reload_versions or sorted(
        d.name for d in root.iterdir() if d.is_dir() and (d / "manifest.json").exists()
    )
    token = secrets.token_hex(16)
    results = []
    engine = engine_qps(root, version, args.nprobe)
    print(json.dumps({"event": "engine", "version": version, "nprobe": args.nprobe, **engine}), flush=True)
    batchings = {"on": [True], "off": [False], "both": [True, False]}[args.batching]
    failed = 0
    with tempfile.TemporaryDirectory() as tmp:
        for workers in args.workers:
            for batching in batchings:
                for users in args.users:
                    with Service(root, workers, batching, token, version) as svc:
                        if args.warm_cache:
                            warm(svc.url, workers)
                        stop, log = threading.Event(), []
                        t = None
                        if args.reload_every:
                            t = threading.Thread(
                                target=reloader, args=(svc.url, token, versions, args.reload_every, stop, log)
                            )
                            t.start()
                        stats = run_locust(svc.url, users, args.seconds, args.mix, Path(tmp), args.rate)
                        stop.set()
                        if t:
                            t.join()
                    for s in stats:
                        row = {"workers": workers, "batching": batching, "users": users, "mix": args.mix,
                               "artifact": f"{root.name}/{version}", "warm_cache": args.warm_cache,
                               "rate_per_user": args.rate,
                               "query_cache": os.environ.get("JOINTPQ_QUERY_CACHE_SIZE", "default"), **s}  # fmt: skip
                        if args.reload_every:
                            row["reloads"] = len(log)
                            row["reloads_ok"] = sum(code == 200 for _, code in log)
                        results.append(row)
                        print(json.dumps(row), flush=True)
                        if s["name"] == "Aggregated":
                            failed += s["failures"]
    print("\n| workers | batching | users | endpoint | RPS | p50 / p95 / p99 ms | failures |")
    print("|---|---|---|---|---|---|---|")
    for r in results:
        if r["name"] == "/info":
            continue
        print(
            f"| {r['workers']} | {'on' if r['batching'] else 'off'} | {r['users']} | {r['name']} | {r['rps']:.0f} | "
            f"{r['p50_ms']:.0f} / {r['p95_ms']:.0f} / {r['p99_ms']:.0f} | {r['failures']} |"
        )
    print(f"\nin-process engine, nprobe {args.nprobe}: {engine['engine_qps_batch1']:.0f} QPS single queries, "
          f"{engine['engine_qps_batch64']:.0f} QPS in batches of 64")  # fmt: skip
    if args.json_out:
        args.json_out.write_text(json.dumps({"engine": engine, "runs": results}, indent=1))
    if args.reload_every and failed:
        print(f"FAILED: {failed} requests failed across hot reloads", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
