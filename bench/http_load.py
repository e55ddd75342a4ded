"""End-to-end HTTP benchmark: `jointpq serve` on a loopback port, a load generator against it.

For each configuration (client x uvicorn workers x engine mode x user count) it starts a
fresh service, runs the load for a set time and prints (and with --json-out writes) RPS, p50 / p95 /
p99 latency per endpoint and the failure count. Beside it, the in-process engine's QPS for the same
single vector queries at the same nprobe (no HTTP), so the HTTP overhead shows.

    python bench/http_load.py --root artifacts/demo --mix text --users 32 --seconds 20
    python bench/http_load.py --root artifacts/demo --mix mixed --reload-every 2 --reload-versions v1 v2
    python bench/http_load.py --synthetic 1000000 --mix vector --client locust wrk --workers 1 2

Clients: `locust` runs `loadtest/locustfile.py` (FastHttpUser; checks every answer). `wrk`
(`apt install wrk`; C, one thread, closed loop like locust's users) posts the same kinds of bodies
from a pre-built pool and only counts non-2xx answers and socket errors: it costs the CPU ~10x
less per request than locust, which matters when client and service share 2 cores, so its row is
the closer measure of what the service itself sustains. Both run on the same machine as the
service, so every figure is a floor for a client on another machine.

`--reload-every N` hot-reloads between the given versions every N seconds during the run and
exits non-zero if any request failed.
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

    def __init__(
        self, root: Path, workers: int, mode: str, token: str, version: str | None = None,
        torch_threads: int | None = None, watch: bool = False,
    ):  # fmt: skip
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = {
            **os.environ,
            "JOINTPQ_ARTIFACT_ROOT": str(root),
            "JOINTPQ_WORKERS": str(workers),
            "JOINTPQ_BATCHING": str(mode == "on").lower(),
            "JOINTPQ_INLINE_VECTOR_SEARCH": str(mode == "inline").lower(),
            "JOINTPQ_ADMIN_TOKEN": token,
            "JOINTPQ_DEVICE": "cpu",
            "JOINTPQ_LOG_LEVEL": "warning",
            "JOINTPQ_PORT": str(self.port),
        }
        if version:
            env["JOINTPQ_ARTIFACT"] = version
        if watch:  # every worker follows the root's CURRENT pointer
            env["JOINTPQ_WATCH"], env["JOINTPQ_WATCH_INTERVAL_S"] = "true", "0.5"
        if torch_threads:  # torch's default is one thread per core in every worker process
            env["JOINTPQ_TORCH_THREADS"] = str(torch_threads)
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


def wrk_bodies(url: str, mix: str, n: int = 512, k: int = 10) -> list[bytes]:
    """The locustfile's request kinds, pre-encoded: text queries from its pool, or Gaussian vectors
    of the served artifact's dimension."""
    if mix == "text":
        path = Path(os.environ.get("LOADTEST_QUERIES", ROOT / "data" / "scifact-demo" / "queries.jsonl"))
        texts = [json.loads(line)["text"] for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        return [json.dumps({"query": t, "k": k}).encode() for t in texts]
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
    cmd = ["wrk", "-t1", f"-c{users}", f"-d{int(seconds)}s", "--timeout", "10s", "-s", str(script), url]
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
    path = Path(os.environ.get("LOADTEST_QUERIES", ROOT / "data" / "scifact-demo" / "queries.jsonl"))
    texts = [json.loads(line)["text"] for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
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


def run_one(args, root: Path, version: str, versions: list[str], token: str, tmp: Path,
            client: str, workers: int, mode: str, users: int) -> tuple[list[dict], list]:  # fmt: skip
    """A fresh service, warmed if asked, `client` against it (hot reloads meanwhile if asked)."""
    from index.pointer import publish

    by_pointer = args.reload_every is not None and args.reload_via == "pointer"
    with Service(root, workers, mode, token, version, args.torch_threads, watch=by_pointer) as svc:
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
    return stats, log


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--root", type=Path, default=ROOT / "artifacts" / "demo")
    p.add_argument("--synthetic", type=int, help="serve a synthetic N-item artifact instead of --root")
    p.add_argument("--mix", choices=sorted(MIXES), default="text")
    p.add_argument("--client", choices=("locust", "wrk"), nargs="+", default=["locust"])
    p.add_argument("--users", type=int, nargs="+", default=[32])
    p.add_argument("--seconds", type=float, default=20)
    p.add_argument("--workers", type=int, nargs="+", default=[1])
    p.add_argument(
        "--batching", choices=("on", "off", "inline", "both", "all"), default="both",
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
    p.add_argument("--json-out", type=Path)
    args = p.parse_args()
    if "wrk" in args.client and (args.rate or args.mix == "mixed"):
        p.error("--client wrk runs flat out (no --rate) and only the text or vector mix")

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
    modes = {"both": ["on", "off"], "all": ["on", "off", "inline"]}.get(args.batching, [args.batching])
    failed = 0
    with tempfile.TemporaryDirectory() as tmp:
        configs = [(c, w, m, u) for c in args.client for w in args.workers for m in modes for u in args.users]
        for client, workers, mode, users in configs:
            stats, log = run_one(args, root, version, versions, token, Path(tmp), client, workers, mode, users)
            for s in stats:
                row = {"client": client, "workers": workers, "batching": mode, "users": users, "mix": args.mix,
                       "artifact": f"{root.name}/{version}", "warm_cache": args.warm_cache,
                       "rate_per_user": args.rate,
                       "query_cache": os.environ.get("JOINTPQ_QUERY_CACHE_SIZE", "default"), **s}  # fmt: skip
                if args.reload_every:
                    row["reloads"] = len(log)
                    row["reloads_ok"] = sum(code == 200 for _, code in log)
                results.append(row)
                print(json.dumps(row), flush=True)
                if s["name"] == "Aggregated" or client == "wrk":
                    failed += s["failures"] + (row.get("reloads", 0) - row.get("reloads_ok", 0))
    print("\n| client | workers | batching | users | endpoint | RPS | p50 / p95 / p99 ms | failures |")
    print("|---|---|---|---|---|---|---|---|")
    for r in results:
        if r["name"] == "/info" or (r["name"] == "Aggregated" and args.mix != "mixed"):
            continue
        print(
            f"| {r['client']} | {r['workers']} | {r['batching']} | {r['users']} | {r['name']} | "
            f"{r['rps']:.0f} | {r['p50_ms']:.0f} / {r['p95_ms']:.0f} / {r['p99_ms']:.0f} | {r['failures']} |"
        )
    print(f"\nin-process engine, nprobe {args.nprobe}: {engine['engine_qps_batch1']:.0f} QPS single queries "
          f"(one caller), {engine['engine_qps_batch1_2threads']:.0f} (two threads), "
          f"{engine['engine_qps_batch64']:.0f} in batches of 64")  # fmt: skip
    if args.json_out:
        args.json_out.write_text(json.dumps({"engine": engine, "runs": results}, indent=1))
    if args.reload_every and failed:
        print(f"FAILED: {failed} requests failed across hot reloads", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
