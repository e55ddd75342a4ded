"""The router's side of sharded serving: a version served as S shard deployments, fanned out to.

`ShardedHolder` is the service's `IndexHolder` (same app, routes, errors, metrics, item writes)
whose versions are shard sets: a reload resolves the name to a shard set (`jointpq shard`'s
output, or the artifact sharded here on first use into ``<root>/.shards/``), has **every replica**
of every shard deployment load it beside what they serve (`ShardServer.hold`, broadcast),
checks what they loaded against the set's checksums, validates it through the router path (smoke
searches, the artifact's canary gate, all shards answering), switches with one reference
assignment, then drains the old version's requests and has the replicas drop it.

`ShardedView` is what a request searches: it computes the coarse probe once (`index.search.Probe`),
sends the same probe to one replica of each shard, retries another replica when one fails or
does not hold the version (a replacement for a killed replica), and merges the top-k exactly
(`index.shard.merge`, ties by id). A shard that does not answer within the deadline makes the
answer partial (flagged in `coverage`) or a 503, by setting (`ClusterConfig.on_partial`).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open

from index import JointPQError
from index.artifact import MANIFEST, TENSORS, read_manifest, sha256_file, verify_files
from index.canary import read_canaries
from index.drift import DriftStats
from index.ivfpq import IVFPQ
from index.loader import make_searcher
from index.pointer import BadArtifactName, check_links_inside, resolve_in_root
from index.shard import ShardSet, is_shard_set, merge, read_shard_set, shard_artifact, shard_of
from service.holder import IndexHolder, Loaded, QueryCache, ReloadRefused, _canary_gate, describe, encoder_threads
from service.items import LiveSlot
from service.settings import Settings

log = logging.getLogger("jointpq.cluster")

ON_PARTIAL = ("partial", "503")


def _gone_errors() -> tuple[type[BaseException], ...]:
    """The errors of a replica that died or left (not of one that refused the work)."""
    from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError
    from ray.serve.exceptions import DeploymentUnavailableError, ReplicaUnavailableError

    return (ActorDiedError, ActorUnavailableError, RayActorError, ReplicaUnavailableError, DeploymentUnavailableError)


GONE = _gone_errors()
CACHE_DIR = ".shards"  # plain artifacts sharded on first use, inside the root (hidden from version listings)


@dataclass(frozen=True)
class ClusterConfig:
    """How the router fans out (`jointpq serve --cluster` flags, the RayService's app args)."""

    shards: int
    replicas: int = 1
    on_partial: str = "partial"  # or "503": what a query gets when a shard misses its deadline
    shard_deadline_s: float = 5.0  # per request, all shards, retries included
    drain_s: float = 30.0  # the longest an old version's requests are waited for before it is dropped
    hold_timeout_s: float = 600.0  # loading a version on every replica (checksums of GBs take a while)

    def __post_init__(self) -> None:
        if self.on_partial not in ON_PARTIAL:
            raise ValueError(f"on_partial must be one of {ON_PARTIAL}, got {self.on_partial!r}")
        if self.shard_deadline_s <= 0:
            raise ValueError(f"shard_deadline_s must be > 0, got {self.shard_deadline_s}")


class ShardsUnavailable(JointPQError):  # noqa: N818 - reads as the condition
    """Shards missed the deadline (or every replica of one is gone): answered 503, never a 500."""

    http_status = 503


@dataclass
class ShardMeta:
    """What `Loaded.summary` and the search path read of an index: the shape of the whole."""

    metric: str
    d: int
    nlist: int
    M: int
    nbits: int
    n: int


class ShardedIndex:
    """One load of one version across the shard deployments (the `Loaded.index` of the router)."""

    def __init__(self, key: str, shard_set: ShardSet, handles: list[Any], config: ClusterConfig, quantizer: IVFPQ,
                 manifest: Any, backend: str):  # fmt: skip
        self.key, self.shard_set, self.handles, self.config = key, shard_set, handles, config
        self.manifest = manifest  # shard 0's: the model and training record every shard shares
        self.data = ShardMeta(quantizer.metric, quantizer.d, quantizer.nlist, quantizer.M, quantizer.nbits,
                              shard_set.n_items)  # fmt: skip
        self.prober = make_searcher(quantizer, "cpu", backend)  # the probe, once per query batch
        self.device = torch.device("cpu")
        self.backend = f"ray-serve ({shard_set.count} shards, {self.prober.name} on each)"
        self.paths = [str(shard_set.member(i)) for i in range(shard_set.count)]
        self._inflight = 0
        self._lock = threading.Lock()
        self._stats: tuple[float, list[dict[str, Any]]] | None = None
        self._refreshing = threading.Lock()

    @property
    def version(self) -> str:
        return self.shard_set.parent

    @property
    def inflight(self) -> int:
        return self._inflight

    def search(self, queries, k: int = 10, nprobe: int | None = None, min_seq: int = 0):
        scores, ids, _ = self.search_covered(queries, k, nprobe or 16, min_seq)
        return scores, ids

    def search_covered(self, queries, k: int, nprobe: int, min_seq: int = 0):
        """(B, d) queries -> per query (scores, ids) best first, and the coverage record."""
        with self._lock:
            self._inflight += 1
        try:
            return self._fan_out(queries, k, nprobe, min_seq)
        finally:
            with self._lock:
                self._inflight -= 1

    def _send(self, i: int, xq: np.ndarray, probe, k: int, min_seq: int):
        return self.handles[i].search.remote(self.key, self.paths[i], xq, probe.cells.numpy(), probe.dist, k, min_seq)

    def _fan_out(self, queries, k: int, nprobe: int, min_seq: int):
        xq = np.ascontiguousarray(np.asarray(queries, dtype=np.float32))
        S = len(self.handles)
        if len(xq) == 0:
            return [], [], {"answered": S, "shards": S, "partial": False}
        probe = self.prober.coarse(xq, nprobe)
        deadline = time.monotonic() + self.config.shard_deadline_s
        pending = {i: self._send(i, xq, probe, k, min_seq) for i in range(S)}
        tries = dict.fromkeys(range(S), 1)
        parts: dict[int, Any] = {}
        failed: dict[int, str] = {}
        while pending:
            for i, resp in list(pending.items()):
                left = deadline - time.monotonic()
                try:
                    out = resp.result(timeout_s=max(left, 0.001))
                except TimeoutError:
                    resp.cancel()
                    failed[i] = f"no answer within {self.config.shard_deadline_s:g} s"
                    del pending[i]
                    continue
                except Exception as e:  # the replica died, or is gone: another one may answer
                    out, why = None, f"{type(e).__name__}: {str(e)[:120]}"
                else:
                    why = "no replica holds this version yet"
                if out is not None:
                    parts[i] = out
                    del pending[i]
                elif time.monotonic() + 0.01 < deadline:
                    time.sleep(min(0.005 * tries[i], 0.05))  # the handle learns of a dead replica meanwhile
                    tries[i] += 1
                    pending[i] = self._send(i, xq, probe, k, min_seq)
                else:
                    failed[i] = why
                    del pending[i]
        coverage = {"answered": len(parts), "shards": S, "partial": bool(failed)}
        if failed:
            detail = "; ".join(f"shard {i}: {why} ({tries[i]} tries)" for i, why in sorted(failed.items()))
            log.warning("version %s: %d of %d shards answered (%s)", self.version, len(parts), S, detail)
            if self.config.on_partial == "503" or not parts:
                raise ShardsUnavailable(f"{len(failed)} of {S} shards did not answer: {detail}")
        scores, ids = merge([parts[i] for i in sorted(parts)], k, self.data.metric)
        return scores, ids, coverage

    # -- reports, cached: /metrics and /info ask on every call, from the event loop ------------------
    def shard_stats(self, max_age_s: float = 5.0) -> list[dict[str, Any]]:
        """Each answering shard's live stats (`ShardServer.stats`). Refreshed in the calling thread
        when stale, except on the event loop (a handle must not block it): there the last figures
        are returned and a refresh runs in a thread."""
        cached = self._stats
        if cached is not None and time.monotonic() - cached[0] < max_age_s:
            return cached[1]
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            return self._refresh_stats()
        if not self._refreshing.locked():
            threading.Thread(target=self._refresh_stats, name="jointpq-shard-stats", daemon=True).start()
        return cached[1] if cached is not None else []

    def _refresh_stats(self) -> list[dict[str, Any]]:
        with self._refreshing:
            calls = [h.stats.remote(self.key) for h in self.handles]
            out = []
            for c in calls:
                try:
                    s = c.result(timeout_s=self.config.shard_deadline_s)
                except Exception:
                    s = None
                if s is not None:
                    out.append(s)
            self._stats = (time.monotonic(), out)
            return out


class ShardedView:
    """What `LiveSlot.view` is on the router: the searches of one `ShardedIndex` at one position of
    the item log. Writes are applied by the shard replicas themselves (each follows the log for its
    ids); this view only advances its position, and a search asks the shards to reflect at least
    that much (read-your-writes through the router)."""

    def __init__(self, index: ShardedIndex, applied_seq: int = 0):
        self.index, self.applied_seq = index, applied_seq

    # the `LiveIndex` surface the service reads --------------------------------------------------------
    @property
    def version(self) -> str:
        return self.index.version

    @property
    def manifest(self) -> Any:
        return self.index.manifest

    @property
    def data(self) -> ShardMeta:
        return self.index.data

    def search_covered(self, x, k: int, nprobe: int):
        return self.index.search_covered(x, k, nprobe, self.applied_seq)

    def search(self, x, k: int = 10, nprobe: int | None = None):
        scores, ids, _ = self.index.search_covered(x, k, nprobe or 16, self.applied_seq)
        return scores, ids

    def with_seq(self, applied_seq: int) -> ShardedView:
        return ShardedView(self.index, applied_seq)

    def upsert(self, ids, vectors, applied_seq: int | None = None) -> ShardedView:
        return self.with_seq(self.applied_seq if applied_seq is None else applied_seq)

    def delete(self, ids, applied_seq: int | None = None) -> tuple[ShardedView, list[str]]:
        return self.with_seq(self.applied_seq if applied_seq is None else applied_seq), []

    def contains_many(self, ids: list[str]) -> list[bool]:
        """Ask each owning shard (one call per shard) whether the ids are live items."""
        owner = shard_of(ids, len(self.index.handles))
        out = [False] * len(ids)
        for s in sorted(set(owner.tolist())):
            rows = [j for j, o in enumerate(owner) if o == s]
            got = self.index.handles[s].contains.remote(self.index.key, [ids[j] for j in rows], self.applied_seq)
            found = got.result(timeout_s=self.index.config.shard_deadline_s)
            if found is None:
                raise ShardsUnavailable(f"shard {s} does not hold {self.version} yet: retry")
            for j, f in zip(rows, found, strict=True):
                out[j] = f
        return out

    def contains(self, item_id: str) -> bool:
        return self.contains_many([item_id])[0]

    @property
    def changed(self) -> bool:
        """Whether any shard holds writes beyond its artifact (the cached figures)."""
        return any(s["delta_items"] or s["deleted_base_items"] for s in self.index.shard_stats())

    @property
    def n_live(self) -> int:
        stats = self.index.shard_stats()
        return sum(s["live_items"] for s in stats) if len(stats) == len(self.index.handles) else self.index.data.n

    def stats(self) -> dict[str, Any]:
        stats = self.index.shard_stats()
        keys = ("base_items", "deleted_base_items", "delta_items", "live_items")
        out: dict[str, Any] = {key: sum(s[key] for s in stats) for key in keys}
        out |= {"applied_seq": self.applied_seq, "shards_reporting": len(stats), "shards": len(self.index.handles)}
        out["per_shard"] = [  # one replica's figures per shard (the one that answered last)
            {"shard": s.get("shard"), "live_items": s["live_items"],
             "rss_mb": round((s.get("rss_bytes") or 0) / 2**20, 1),
             "index_mb": round(s.get("index_bytes", 0) / 2**20, 1)}
            for s in sorted(stats, key=lambda s: s.get("shard", 0))
        ]  # fmt: skip
        from index.drift import cell_balance

        out["cells"] = cell_balance(self.cell_sizes())
        return out

    def drift_stats(self) -> DriftStats:
        stats = self.index.shard_stats()
        return DriftStats(sum(s["drift_items"] for s in stats), sum(s["drift_sum"] for s in stats))

    def cell_sizes(self) -> torch.Tensor:
        sizes = [torch.as_tensor(s["cell_sizes"]) for s in self.index.shard_stats()]
        return torch.stack(sizes).sum(0) if sizes else torch.zeros(self.index.data.nlist, dtype=torch.int64)


class ShardedHolder(IndexHolder):
    """The service's holder with shard sets for versions (see the module docstring)."""

    def __init__(self, settings: Settings, config: ClusterConfig, handles: list[Any]):
        super().__init__(settings)
        if len(handles) != config.shards:
            raise ValueError(f"{len(handles)} shard deployments for {config.shards} shards")
        self.config, self.handles = config, handles
        self._keys = itertools.count(1)
        self._drains: set[asyncio.Task] = set()

    async def reload(self, name: str) -> tuple[Loaded, Loaded | None]:
        async with self.lock:
            key = f"{name}#{next(self._keys)}"
            try:
                shard_set = await asyncio.to_thread(self._resolve, name)
                await self._hold_everywhere(key, shard_set)
                candidate = await asyncio.to_thread(self._candidate, name, key, shard_set)
                candidate.checks["replayed_updates"] = await asyncio.to_thread(self.writer.replay_all, candidate)
                await asyncio.to_thread(self._validate, candidate)
            except BaseException:
                await self._drop_everywhere(key)
                raise
            old = self.current

            def swap() -> None:  # one reference assignment: from here every request gets the new version
                self.previous, self.current = old, candidate

            await asyncio.to_thread(self.writer.swap_in, candidate, swap)
            log.info("switched to %s (%s) from %s", candidate.version, key, old.version if old else None)
            if old is not None:
                task = asyncio.create_task(self._drain_and_drop(old))
                self._drains.add(task)
                task.add_done_callback(self._drains.discard)
            return candidate, old

    async def rollback(self) -> tuple[Loaded, Loaded]:
        """Back to the previous version: its shards were dropped after the switch, so this is a
        reload of its name (the same checks, the same switch)."""
        if self.previous is None or self.current is None:
            raise ReloadRefused(409, "no previous artifact to roll back to")
        new, old = await self.reload(self.previous.name)
        return new, old  # type: ignore[return-value]

    # -- steps -------------------------------------------------------------------------------------------
    def _resolve(self, name: str) -> ShardSet:
        """`name` as a shard set of `shards` members: a shard set in the root, or an artifact
        sharded here on first use (into `.shards/`, reused while the artifact is unchanged)."""
        root, S = self.settings.artifact_root, self.config.shards
        try:
            path = resolve_in_root(root, name)
            if not path.is_dir():
                raise ReloadRefused(404, f"refused: no artifact named {name[:80]!r} in the artifact root")
            check_links_inside(root, path)
        except BadArtifactName as e:
            raise ReloadRefused(400, f"refused: {e}") from None
        try:
            if is_shard_set(path):
                shard_set = read_shard_set(path)
                if shard_set.count != S:
                    raise ReloadRefused(422, f"refused: {name[:80]!r} has {shard_set.count} shards, this cluster {S}")
                return shard_set
            if not (path / MANIFEST).is_file():
                raise ReloadRefused(404, f"refused: no artifact named {name[:80]!r} in the artifact root")
            tag = sha256_file(path / MANIFEST)[:12]
            cache = Path(root) / CACHE_DIR / f"{path.name}-{tag}-of-{S}"
            if cache.is_dir():
                return read_shard_set(cache)
            t0 = time.perf_counter()
            shard_set = shard_artifact(path, S, cache)
            log.info("sharded %s into %d shards in %.1f s", name, S, time.perf_counter() - t0)
            return shard_set
        except JointPQError as e:
            raise ReloadRefused(422, f"refused: artifact {name[:80]!r} failed verification: {e}") from None

    async def _hold_everywhere(self, key: str, shard_set: ShardSet) -> None:
        """Every running replica of every shard loads the version; each must report the manifest the
        set records (checksums verified by the replica's load). Replicas started later load it on
        their first request for it."""
        import json

        doc = json.loads((shard_set.path / "shards.json").read_text(encoding="utf-8"))
        want = [m["manifest_sha256"] for m in doc["members"]]

        async def one(i: int, handle: Any) -> None:
            path = str(shard_set.member(i))
            end = time.monotonic() + self.config.hold_timeout_s
            while True:  # replicas may be starting (at start-up, or replacing killed ones): wait for one
                try:
                    got = await handle.broadcast("hold", key, path).results_async(
                        timeout_s=self.config.hold_timeout_s, return_exceptions=True
                    )
                except GONE as e:  # no replica at all right now (DeploymentUnavailableError): Serve is replacing them
                    got = [e]
                gone = [r for r in got if isinstance(r, GONE)]  # died since: its replacement loads on demand
                loaded = [r for r in got if not isinstance(r, GONE)]
                if loaded or time.monotonic() > end:
                    break
                await asyncio.sleep(0.5)
            if not loaded:
                raise ReloadRefused(503, f"refused: shard {i} has no running replica")
            if gone:
                log.warning("shard %d: %d replicas gone while loading %s", i, len(gone), key)
            for r in loaded:
                if isinstance(r, BaseException):
                    raise ReloadRefused(422, f"refused: shard {i} could not load {shard_set.members[i]}: {r}")
                if r["manifest_sha256"] != want[i] or r["shard"] != i:
                    raise ReloadRefused(422, f"refused: shard {i} loaded another manifest than shards.json records")

        await asyncio.gather(*(one(i, h) for i, h in enumerate(self.handles)))

    async def _drop_everywhere(self, key: str) -> None:
        for h in self.handles:
            try:
                await h.broadcast("drop", key).results_async(timeout_s=30, return_exceptions=True)
            except Exception:  # a replica that cannot be told drops it when it is replaced
                log.warning("could not tell every replica to drop %s", key, exc_info=True)

    async def _drain_and_drop(self, old: Loaded) -> None:
        """Wait for the old version's requests (each took `current` once, at its start), then
        have every replica drop it."""
        index: ShardedIndex = old.index
        end = time.monotonic() + self.config.drain_s
        while index.inflight and time.monotonic() < end:
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.2)  # requests that took `current` just before the switch reach the shards
        await self._drop_everywhere(index.key)
        log.info("dropped %s (%s)", old.version, index.key)

    def _candidate(self, name: str, key: str, shard_set: ShardSet) -> Loaded:
        """The router's `Loaded`: the quantizer (for the probe), the encoders, the cache, the view."""
        t0 = time.perf_counter()
        first = shard_set.member(0)
        manifest = read_manifest(first)
        verify_files(first, manifest)  # the encoders and the quantizer tensors the router runs
        with safe_open(str(first / TENSORS), framework="pt") as f:
            rotation, centroids, codebooks = (f.get_tensor(n) for n in ("rotation", "centroids", "codebooks"))
        quantizer = IVFPQ(manifest.metric, rotation, centroids, codebooks,
                          torch.zeros(0, manifest.M if manifest.nbits == 8 else manifest.M // 2, dtype=torch.uint8),
                          torch.zeros(manifest.nlist + 1, dtype=torch.int64), np.empty(0, dtype=object),
                          manifest.nbits)  # fmt: skip
        quantizer.check()
        index = ShardedIndex(key, shard_set, self.handles, self.config, quantizer, manifest, self.settings.backend)
        encoder = None
        checks: dict[str, Any] = {"verified": True, "shards": shard_set.count, "shard_set": shard_set.path.name}
        if (first / "encoder" / "encoder.json").is_file():
            from model.encoders import load_encoder

            try:
                encoder = load_encoder(first, runtime=self.settings.encoder_runtime, device="cpu",
                                       threads=encoder_threads(self.settings))  # fmt: skip
            except Exception as e:
                why = f"refused: artifact {name[:80]!r} has an unusable query encoder: {e}"
                raise ReloadRefused(422, why) from None
            if encoder.dim != manifest.dim:
                raise ReloadRefused(422, f"refused: encoder outputs {encoder.dim} dims, the index has {manifest.dim}")
            checks["encoder"] = describe(encoder)
        s = self.settings
        cache = QueryCache(s.query_cache_size, s.query_cache_bytes) if encoder and s.query_cache_size else None
        from model.towers import tower_fingerprint

        seq = int((manifest.training or {}).get("applied_seq") or 0)
        slot = LiveSlot(ShardedView(index, seq), tower_fingerprint(manifest.files))  # type: ignore[arg-type]
        index.shard_stats()  # the first figures for /info and /metrics (later ones refresh in the background)
        checks["load_seconds"] = round(time.perf_counter() - t0, 4)
        return Loaded(name, first, index, encoder, time.time(), checks, cache, slot)  # type: ignore[arg-type]

    def _validate(self, c: Loaded) -> None:
        """Smoke searches through the router path (every shard must answer, with finite scores),
        then the artifact's canary gate on the merged results."""
        view: ShardedView = c.live.view
        rng = np.random.default_rng(0)
        k = min(self.settings.default_k, max(1, c.index.data.n))
        for b in (1, 8):
            x = rng.standard_normal((b, c.dim)).astype(np.float32)
            try:
                scores, ids, coverage = view.search_covered(x, k, min(self.settings.default_nprobe, c.nlist))
            except ShardsUnavailable as e:
                raise ReloadRefused(422, f"refused: {c.version} failed its smoke test: {e}") from None
            if coverage["partial"]:
                raise ReloadRefused(422, f"refused: {c.version}: only {coverage['answered']} shards answered")
            if not any(len(i) for i in ids) or not all(np.isfinite(s).all() for s in scores):
                raise ReloadRefused(422, f"refused: {c.version} returned no hits or non-finite scores")
        if c.encoder is not None:
            emb = c.encode(["smoke test query"])
            if emb.shape != (1, c.dim) or not np.isfinite(emb).all():
                raise ReloadRefused(422, f"refused: the encoder of {c.version} gave {emb.shape} or non-finite output")
        c.checks["smoke"] = "ok"
        if read_canaries(c.path) is None:
            c.checks["canary"] = "none in artifact"
            return
        _canary_gate(c, self.settings)  # searches `c.index`, i.e. the merged shards
