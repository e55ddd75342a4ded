"""Sharded serving on Ray Serve vs the single-process service: the router's overhead, memory per shard.

For the same artifact it starts `jointpq serve` (one uvicorn worker) and `jointpq serve --cluster
--shards S --replicas 1` for each S asked, the real commands as subprocesses on loopback ports,
drives each with wrk (closed loop, vector queries of the artifact's dimension) and prints RPS,
p50 / p99 and failures, with the resident memory of the single process and of each shard replica
(the cluster's /info, `live.per_shard`). On one machine every extra process competes for the same
cores, so this measures what the fan-out costs (proxy hop, router, one call per shard, the merge),
not the speed-up of S machines; docs/scaling.md turns the per-shard figures into a sizing.

    python bench/sharding.py --synthetic 1000000 --shards 1 2 --users 8 --seconds 20
    python bench/sharding.py --tiny      # seconds: a tiny artifact, S = 1, 2 s runs
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import httpx
from harness import ROOT, Report, Service, bin_path, free_port, markdown_table
from http_load import run_wrk, synthetic_root


def rss_mb(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        return None
    return None


class ClusterService:
    """`jointpq serve --cluster` as a subprocess (its own local Ray), until /readyz answers 200."""

    def __init__(self, root: Path, shards: int, replicas: int, token: str, version: str, torch_threads: int):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = {**os.environ, "JOINTPQ_ADMIN_TOKEN": token, "JOINTPQ_LOG_LEVEL": "warning", "JOINTPQ_DEVICE": "cpu",
               "JOINTPQ_ARTIFACT": version, "JOINTPQ_TORCH_THREADS": str(torch_threads)}  # fmt: skip
        self.log = tempfile.TemporaryFile("w+")  # noqa: SIM115 -- closed in __exit__
        cmd = [bin_path("jointpq"), "serve", "--cluster", "--shards", str(shards), "--replicas", str(replicas),
               "--artifact-root", str(root), "--port", str(self.port)]  # fmt: skip
        # its own session: Ray's processes are stopped with it (SIGTERM to the group)
        self.proc = subprocess.Popen(cmd, env=env, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True,
                                     cwd=ROOT)  # Ray's workers import the project from here

    def __enter__(self) -> ClusterService:
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                self.log.seek(0)
                raise RuntimeError(f"cluster exited: {self.log.read()[-3000:]}")
            try:
                if httpx.get(f"{self.url}/readyz", timeout=2).status_code == 200:
                    self.info = httpx.get(f"{self.url}/info", timeout=30).json()
                    return self
            except httpx.TransportError:
                pass
            time.sleep(0.5)
        self.__exit__()
        raise RuntimeError("cluster not ready after 600 s")

    def __exit__(self, *exc: object) -> None:
        try:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        finally:
            subprocess.run(["pkill", "-f", "-g", str(self.proc.pid)], check=False)
            self.log.close()


def sequential(url: str, dim: int, n: int = 200) -> dict:
    """One request at a time: the whole path's latency, and the router's (or service's) own part
    (`took_ms`: parse, probe, search or fan-out, merge), so the hops' cost shows."""
    import numpy as np

    x = np.random.default_rng(1).standard_normal((n + 20, dim)).astype(np.float32)
    took = []
    with httpx.Client(base_url=url, timeout=30) as c:
        for i in range(20):
            c.post("/search", json={"vector": x[i].tolist(), "k": 10})
        t0 = time.perf_counter()
        for i in range(20, n + 20):
            took.append(c.post("/search", json={"vector": x[i].tolist(), "k": 10}).json()["took_ms"])
        wall = (time.perf_counter() - t0) / n * 1000
    return {"seq_ms": round(wall, 2), "server_ms": round(float(np.median(took)), 2)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--synthetic", type=int, default=1_000_000, help="items of the synthetic artifact (d=128, M=16)")
    p.add_argument("--shards", type=int, nargs="+", default=[1, 2])
    p.add_argument("--users", type=int, default=8, help="wrk connections (closed loop)")
    p.add_argument("--seconds", type=float, default=20)
    p.add_argument("--torch-threads", type=int, default=1, help="per process (router, each replica, the service)")
    p.add_argument("--tiny", action="store_true", help="20k items, S = 1, 2 s runs (a smoke test)")
    p.add_argument("--json", action="store_true", help="one JSON line per row")
    args = p.parse_args(argv)
    if args.tiny:
        args.synthetic, args.shards, args.seconds, args.users = 20_000, [1], 2, 4
    root = synthetic_root(args.synthetic)
    report = Report(args.json)
    token = "bench-cluster-token"
    rows = []
    with tempfile.TemporaryDirectory() as tmp, Service(root, batching="on", token=token, version="v1",
                                                       torch_threads=args.torch_threads) as svc:  # fmt: skip
        stats = run_wrk(svc.url, args.users, args.seconds, "vector", Path(tmp))[0]
        stats |= sequential(svc.url, int(svc.info["artifact"]["dim"]))
        row = {"serving": "single process", "shards": "-", "rss_mb_per_process": rss_mb(svc.proc.pid)} | stats
        report(row)
        rows.append(row)
    for s in args.shards:
        with tempfile.TemporaryDirectory() as tmp, ClusterService(root, s, 1, token, "v1", args.torch_threads) as c:
            stats = run_wrk(c.url, args.users, args.seconds, "vector", Path(tmp))[0]
            stats |= sequential(c.url, int(c.info["artifact"]["dim"]))
            live = httpx.get(f"{c.url}/info", timeout=30).json()["artifact"]["live"]
            per = live.get("per_shard", [])
            row = {"serving": f"ray serve, S={s} R=1", "shards": s,
                   "rss_mb_per_process": " / ".join(str(x["rss_mb"]) for x in per),
                   "index_mb_per_shard": " / ".join(str(x["index_mb"]) for x in per),
                   "items_per_shard": " / ".join(str(x["live_items"]) for x in per)} | stats  # fmt: skip
            report(row)
            rows.append(row)
    if not args.json:
        print()
        print(markdown_table(
            ["serving", "RPS", "p50 ms", "p99 ms", "failures", "one at a time ms (server part)",
             "RSS MB (each shard)", "index MB (each shard)"],
            [[r["serving"], f"{r['rps']:.0f}", f"{r['p50_ms']:.1f}", f"{r['p99_ms']:.1f}", r["failures"],
              f"{r['seq_ms']:.1f} ({r['server_ms']:.1f})", r["rss_mb_per_process"], r.get("index_mb_per_shard", "-")]
             for r in rows],
        ))  # fmt: skip
    return 1 if any(r["failures"] for r in rows) else 0


if __name__ == "__main__":
    raise SystemExit(main())
