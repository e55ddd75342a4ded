"""Live items across real `jointpq serve` processes: an acknowledged write survives kill -9, a torn
log tail is ignored (logged) then cut off, two workers see each other's writes, and
`jointpq compact` folds a stopped root's log into a version a restarted server serves as before."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest

from index.wal import WAL, WriteAheadLog, encode_vector, scan
from tests.service.conftest import TOKEN, admin
from tests.service.test_items import NLIST, D, N, base_vectors, build_vector_artifact, new_vectors

pytestmark = pytest.mark.slow  # every test starts `jointpq serve` processes (a few seconds each)


@pytest.fixture(scope="module")
def vec_template(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("durable-root")
    build_vector_artifact(root)
    return root


@pytest.fixture
def root(vec_template, tmp_path) -> Path:
    dst = tmp_path / "root"
    shutil.copytree(vec_template, dst)
    return dst


def _jointpq() -> list[str]:
    exe = Path(sys.executable).with_name("jointpq")
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "service.cli"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Proc:
    """`jointpq serve` on `root` (settings from JOINTPQ_* env vars), its JSON log in a file."""

    def __init__(self, root: Path, log: Path, *args: str, **env: str):
        self.port, self.log = free_port(), log
        self.url = f"http://127.0.0.1:{self.port}"
        full = {
            **os.environ,
            "JOINTPQ_ARTIFACT_ROOT": str(root),
            "JOINTPQ_ADMIN_TOKEN": TOKEN,
            "JOINTPQ_PORT": str(self.port),
            "JOINTPQ_DEVICE": "cpu",
            "JOINTPQ_MAX_K": "4096",
            **env,
        }
        self._err = open(log, "w")  # noqa: SIM115 - closed in stop()
        self.p = subprocess.Popen([*_jointpq(), "serve", *args], env=full, stdout=self._err, stderr=self._err)
        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(f"{self.url}/readyz", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            if self.p.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise AssertionError(f"jointpq serve did not become ready:\n{self.log.read_text()[-3000:]}")
            time.sleep(0.1)

    def lines(self) -> list[dict]:
        return [json.loads(line) for line in self.log.read_text().splitlines() if line.startswith("{")]

    def stop(self, sig: int = signal.SIGINT) -> None:
        if self.p.poll() is None:
            self.p.send_signal(sig)
            try:
                self.p.wait(30)
            except subprocess.TimeoutExpired:
                self.p.kill()
                self.p.wait(30)
        self._err.close()


@pytest.fixture
def procs():
    started: list[Proc] = []

    def start(root: Path, log: Path, *args: str, **env: str) -> Proc:
        p = Proc(root, log, *args, **env)
        started.append(p)
        return p

    yield start
    for p in started:
        p.stop()


def top1(url: str, x: np.ndarray) -> list[str]:
    """Top-1 id of each vector (every cell probed), 256 queries a request, a new connection each."""
    out = []
    for s in range(0, len(x), 256):
        body = {"vectors": x[s : s + 256].tolist(), "k": 1, "nprobe": NLIST}
        r = httpx.post(f"{url}/search", json=body, timeout=60)
        assert r.status_code == 200, r.text
        out += [res["ids"][0] for res in r.json()["results"]]
    return out


def test_acknowledged_writes_survive_kill_9(root, tmp_path, procs):
    p = procs(root, tmp_path / "first.log")
    acked: list[tuple[str, np.ndarray]] = []
    refused: list[str] = []
    ended: list[BaseException] = []

    def stream():
        rng = np.random.default_rng(100)
        with httpx.Client(base_url=p.url, timeout=30) as c:
            for n in range(100_000):
                ids = [f"k{n}-{j}" for j in range(1 + n % 3)]  # batches of 1, 2, 3 items
                x = rng.standard_normal((len(ids), D)).astype(np.float32)
                items = [{"id": i, "vector": v.tolist()} for i, v in zip(ids, x, strict=True)]
                try:
                    r = c.post("/admin/items", json={"items": items}, headers=admin())
                except httpx.TransportError as e:  # the server died under this request
                    ended.append(e)
                    return
                if r.status_code == 200:
                    acked.extend(zip(ids, x, strict=True))
                else:
                    refused.append(r.text)

    t = threading.Thread(target=stream, daemon=True)
    t.start()
    deadline = time.monotonic() + 60
    while len(acked) < 60 and time.monotonic() < deadline and t.is_alive():
        time.sleep(0.02)
    os.kill(p.p.pid, signal.SIGKILL)  # mid-stream: the writer thread is still sending
    assert p.p.wait(30) == -signal.SIGKILL
    t.join(30)
    assert not t.is_alive() and ended, "the stream should have been cut by the kill"
    assert refused == [] and len(acked) >= 60

    q = procs(root, tmp_path / "second.log")
    ids = [i for i, _ in acked]
    assert top1(q.url, np.stack([v for _, v in acked])) == ids  # every acknowledged write, top-1
    st = httpx.get(f"{q.url}/info").json()["artifact"]["live"]
    # the batch in flight at the kill may or may not have been logged (it was never acknowledged)
    assert N + len(acked) <= st["live_items"] <= N + len(acked) + 3
    assert st["applied_seq"] >= len({i.split("-")[0] for i in ids})


def test_torn_tail_is_ignored_then_cut_off(root, tmp_path, procs):
    x = new_vectors(4, seed=110)
    wal = WriteAheadLog(root)
    for i in range(3):  # three acknowledged records, as a server writes them
        wal.append("upsert", {"items": [{"id": f"ok{i}", "vector": encode_vector(x[i])}]}, after=i)
    good = (root / WAL).stat().st_size
    with open(root / WAL, "ab") as f:
        f.write(b"JPQW\x04\x00\x00\x00\x00\x00\x00\x00\xff\xff\x00\x00half a record")  # a crash mid-append

    p = procs(root, tmp_path / "first.log")
    assert top1(p.url, x[:3]) == ["ok0", "ok1", "ok2"]
    assert httpx.get(f"{p.url}/info").json()["artifact"]["live"]["applied_seq"] == 3
    ignored = [e["msg"] for e in p.lines() if "ignoring" in e["msg"]]
    assert len(ignored) == 1 and "never completed" in ignored[0] and f"offset {good}" in ignored[0], ignored
    assert (root / WAL).stat().st_size > good  # only read so far: the next append cuts it

    r = httpx.post(f"{p.url}/admin/items", json={"items": [{"id": "ok3", "vector": x[3].tolist()}]}, headers=admin())
    assert r.status_code == 200 and r.json()["seq"] == 4, r.text
    assert top1(p.url, x) == ["ok0", "ok1", "ok2", "ok3"]
    found = scan((root / WAL).read_bytes())
    assert found.tail is None and [e.seq for e in found.entries] == [1, 2, 3, 4]
    assert any("dropping" in e["msg"] for e in p.lines())
    p.stop()

    q = procs(root, tmp_path / "second.log")  # a clean restart: nothing to ignore, everything back
    assert top1(q.url, x) == ["ok0", "ok1", "ok2", "ok3"]
    assert httpx.get(f"{q.url}/info").json()["artifact"]["live"]["applied_seq"] == 4
    assert not [e for e in q.lines() if e["level"] in ("warning", "error")], q.lines()


def test_two_workers_then_offline_compaction(root, tmp_path, procs):
    p = procs(root, tmp_path / "workers.log", "--workers", "2", JOINTPQ_WATCH_INTERVAL_S="0.5")
    x = new_vectors(3, seed=120)
    r = httpx.post(f"{p.url}/admin/items", json={"items": [{"id": "w0", "vector": x[0].tolist()}]}, headers=admin())
    assert r.status_code == 200, r.text
    r = httpx.post(f"{p.url}/admin/items/delete", json={"ids": ["v3"]}, headers=admin())
    assert r.status_code == 200 and r.json()["seq"] == 2, r.text

    # new connections land on either worker; each worker is told apart by when it loaded
    workers: dict[float, int] = {}
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        art = httpx.get(f"{p.url}/info", timeout=10).json()["artifact"]
        workers[art["loaded_at"]] = art["live"]["applied_seq"]
        if len(workers) == 2 and min(workers.values()) == 2:
            break
        time.sleep(0.05)
    assert len(workers) == 2 and set(workers.values()) == {2}, workers
    queries = np.concatenate([x[:1], base_vectors()[:8]])
    before = [httpx.post(f"{p.url}/search", json={"vectors": queries.tolist(), "k": 5, "nprobe": NLIST}).json()
              for _ in range(12)]  # fmt: skip
    assert all(b["results"][0]["ids"][0] == "w0" for b in before)
    assert all("v3" not in res["ids"] for b in before for res in b["results"])
    assert len({json.dumps(b["results"]) for b in before}) == 1  # both workers answer alike
    p.stop()

    out = subprocess.run([*_jointpq(), "compact", "--artifact-root", str(root)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    summary = json.loads(out.stdout)
    assert summary["compacted"] is True and summary["version"] == "vec-v1-c2" and summary["parent"] == "vec-v1"
    assert summary["records"] == 2 and summary["items"] == N and summary["log_records_kept"] == 0
    assert (root / "CURRENT").read_text().strip() == "vec-v1-c2"
    assert [(e.seq, e.op) for e in scan((root / WAL).read_bytes()).entries] == [(2, "mark")]

    q = procs(root, tmp_path / "after.log")
    art = httpx.get(f"{q.url}/info").json()["artifact"]
    assert art["version"] == "vec-v1-c2" and art["checks"]["replayed_updates"] == 0
    assert art["live"]["delta_items"] == 0 and art["live"]["applied_seq"] == 2 and art["live"]["live_items"] == N
    after = httpx.post(f"{q.url}/search", json={"vectors": queries.tolist(), "k": 5, "nprobe": NLIST}).json()
    assert after["version"] == "vec-v1-c2"
    for got, want in zip(after["results"], before[0]["results"], strict=True):
        assert got["ids"] == want["ids"]
        np.testing.assert_allclose(got["scores"], want["scores"], rtol=1e-4, atol=1e-4)
    r = httpx.post(f"{q.url}/admin/items", json={"items": [{"id": "w1", "vector": x[1].tolist()}]}, headers=admin())
    assert r.status_code == 200 and r.json()["seq"] == 3  # numbering goes on after the mark
    assert top1(q.url, x[:2]) == ["w0", "w1"]
