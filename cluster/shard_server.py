"""One shard replica: holds its slice of one or two versions (two only during a swap) and scans it.

A Ray Serve deployment per shard (`shard-0` ... `shard-{S-1}`), R replicas each. The router
computes the probe once and sends every shard the same (queries, cells, coarse distances, k); a
replica answers with its top-k (scores, ids) from the version the request names, never another,
so no response mixes versions.

Versions are held by a *key* the router chose for one load of one version (`hold` / `drop`,
broadcast to every replica). A replica that does not hold the key a request names (it started
after the broadcast: a replacement for a killed replica) answers ``None`` at once and starts
loading it from the path the request carries; the router retries another replica meanwhile.

Live updates: the router appends each write to the artifact root's item log (`index.wal`, on the
shared volume) before answering; every replica of every shard applies the records for the ids it
owns (`index.shard.entries_for`), polling the log, and at once when a search says it must reflect
writes up to `min_seq` (read-your-writes through the router).
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from index import load_index
from index.live import LiveIndex, replay
from index.search import Probe
from index.shard import entries_for
from index.wal import WriteAheadLog

log = logging.getLogger("jointpq.cluster.shard")


@dataclass
class Held:
    """One held version of this shard: its live view (replaced whole on every applied write)."""

    key: str
    path: Path
    view: LiveIndex
    manifest_sha256: str
    tower: str | None = None  # fingerprint of the version's encoders (`model.towers.tower_fingerprint`)
    loaded_at: float = field(default_factory=time.time)
    lock: threading.Lock = field(default_factory=threading.Lock)  # one log catch-up at a time
    item_encoder: Any = None  # loaded on first need: texts logged under another model are encoded again

    def encode_texts(self, texts: list[str]) -> np.ndarray:
        """This version's item tower over `texts` (n,) -> (n, d): replaying a text written while
        another model served puts it where this model puts it, as the single-process service does."""
        if self.item_encoder is None:
            from model.encoders import load_encoder
            from model.towers import load_item_encoder
            query = load_encoder(self.path, runtime="torch", device="cpu") if (
                self.path / "encoder" / "encoder.json").is_file() else None  # fmt: skip
            self.item_encoder = load_item_encoder(self.path, query=query, device=torch.device("cpu"),
                                                  runtime="torch").eval()  # fmt: skip
        from service.holder import encode_by_length

        return encode_by_length(self.item_encoder, texts)


class ShardServer:
    """The deployment class; `cluster.app` binds it once per shard with `.options(name=f"shard-{i}")`."""

    def __init__(self, root: str, shard: int, shards: int, device: str = "cpu", backend: str = "auto",
                 torch_threads: int | None = None, poll_s: float = 1.0):  # fmt: skip
        if torch_threads:
            torch.set_num_threads(torch_threads)
        self.root, self.shard, self.shards = Path(root), shard, shards
        self.device, self.backend, self.poll_s = device, backend, poll_s
        self.held: dict[str, Held] = {}
        self.loading: dict[str, asyncio.Task] = {}
        self.wal = WriteAheadLog(self.root, fsync=False)  # read only here: the router appends
        self._follower: asyncio.Task | None = None

    # -- versions ------------------------------------------------------------------------------------
    def _load(self, key: str, path: str) -> Held:
        """Load and verify (checksums, shapes) the shard artifact at `path`; replay the item log."""
        p = Path(path)
        if not p.resolve().is_relative_to(self.root.resolve()):
            raise ValueError(f"{path}: not inside the artifact root")
        index = load_index(p, device=self.device, backend=self.backend)
        m = index.manifest
        if m is None or m.shard is None or m.shard["index"] != self.shard or m.shard["count"] != self.shards:
            raise ValueError(f"{p.name}: not shard {self.shard} of {self.shards}")
        from index.artifact import sha256_file
        from model.towers import tower_fingerprint

        seq = int((m.training or {}).get("applied_seq") or 0)
        held = Held(key, p, LiveIndex(index, seq), sha256_file(p / "manifest.json"), tower_fingerprint(m.files))
        entries = self.wal.read_all(after=seq)
        if entries:
            held.view = replay(held.view, entries_for(entries, self.shard, self.shards), held.encode_texts, held.tower)
        return held

    async def hold(self, key: str, path: str) -> dict[str, Any]:
        """Load `key` (idempotent); what the router checks before it switches: this replica's
        shard number, item count, the manifest's sha256 and the log position it reached."""
        if key not in self.held:
            task = self.loading.get(key)
            if task is None:
                task = self.loading[key] = asyncio.ensure_future(asyncio.to_thread(self._load, key, path))
            try:
                self.held[key] = await task
            finally:
                self.loading.pop(key, None)
        self._start_follower()
        h = self.held[key]
        return {"shard": self.shard, "key": key, "items": h.view.n_live, "manifest_sha256": h.manifest_sha256,
                "applied_seq": h.view.applied_seq}  # fmt: skip

    def drop(self, key: str) -> bool:
        """Forget `key` (after the router switched away from it and its requests drained)."""
        return self.held.pop(key, None) is not None

    def keys(self) -> list[str]:
        return sorted(self.held)

    # -- search --------------------------------------------------------------------------------------
    async def search(self, key: str, path: str, queries: np.ndarray, cells: np.ndarray, dist: np.ndarray, k: int,
                     min_seq: int = 0) -> tuple[list[np.ndarray], list[list[str]]] | None:  # fmt: skip
        """This shard's top-k for (B, d) queries over the (B, nprobe) cells the router probed, or
        None when this replica does not hold `key` (yet): the router asks another replica."""
        h = self.held.get(key)
        if h is None:
            if key not in self.loading:  # a replacement replica: load it in the background
                self.loading[key] = asyncio.ensure_future(self._hold_quietly(key, path))
            return None
        return await asyncio.to_thread(self._search, h, queries, cells, dist, k, min_seq)

    def _search(self, h: Held, queries, cells, dist, k: int, min_seq: int):
        if h.view.applied_seq < min_seq:
            self._catch_up(h)
        probe = Probe(torch.from_numpy(np.array(cells, dtype=np.int64)), np.asarray(dist, dtype=np.float32))
        scores, ids = h.view.search(queries, k, None, probe)
        return scores, ids

    async def _hold_quietly(self, key: str, path: str) -> None:
        try:
            self.held[key] = await asyncio.to_thread(self._load, key, path)
            self._start_follower()
        except Exception:
            log.warning("shard %d could not load %s", self.shard, key, exc_info=True)
        finally:
            self.loading.pop(key, None)

    # -- live updates --------------------------------------------------------------------------------
    def _catch_up(self, h: Held) -> int:
        """Apply the log records after this view's position, cut to this shard's ids."""
        with h.lock:
            entries = self.wal.read_new(after=h.view.applied_seq)
            if entries:
                h.view = replay(h.view, entries_for(entries, self.shard, self.shards), h.encode_texts, h.tower)
            return len(entries)

    def _start_follower(self) -> None:
        if self._follower is None or self._follower.done():
            self._follower = asyncio.ensure_future(self._follow())

    async def _follow(self) -> None:
        while True:
            await asyncio.sleep(self.poll_s)
            for h in list(self.held.values()):
                try:
                    await asyncio.to_thread(self._catch_up, h)
                except Exception:  # the loop must live on; the next tick retries
                    log.warning("shard %d: following the item log failed", self.shard, exc_info=True)

    # -- reports -------------------------------------------------------------------------------------
    def stats(self, key: str) -> dict[str, Any] | None:
        """The live view's counts, drift statistics and cell sizes, for the router's /info."""
        h = self.held.get(key)
        if h is None:
            return None
        d = h.view.drift_stats()
        data = h.view.base.data
        index_bytes = data.codes.nbytes + data.offsets.nbytes + sum(len(i) + 49 for i in data.ids[:1000]) * (
            data.n / max(1, min(data.n, 1000)))  # ids: str objects, sampled  # fmt: skip
        return h.view.stats() | {
            "shard": self.shard, "drift_items": d.items, "drift_sum": d.distortion_sum,
            "cell_sizes": h.view.cell_sizes().numpy(), "rss_bytes": rss_bytes(), "index_bytes": int(index_bytes),
        }  # fmt: skip

    def contains(self, key: str, ids: list[str], min_seq: int = 0) -> list[bool] | None:
        h = self.held.get(key)
        if h is None:
            return None
        if h.view.applied_seq < min_seq:
            self._catch_up(h)
        return [h.view.contains(i) for i in ids]

    def check_health(self) -> None:
        """Ray Serve's health check: a replica is healthy while it can serve what it holds."""
        for h in self.held.values():
            if h.view.base.data.n and not torch.isfinite(h.view.base.data.centroids[:1]).all():
                raise RuntimeError(f"shard {self.shard}: {h.key} is damaged in memory")


def rss_bytes() -> int | None:
    """This process's resident memory (Linux /proc; None elsewhere): what a shard replica costs."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None
