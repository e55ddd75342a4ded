"""The served artifact and its atomic hot swap.

`load_candidate` loads a version off to the side and proves it can serve (checksums and shapes
via the index core, query encoder matches the index, a smoke query, the canary quality gate,
warm-up searches); only then does `IndexHolder` swap it in with one reference assignment.
A request takes `holder.current` once and keeps that `Loaded` to the end, so requests in flight
finish on the old artifact and every response carries exactly one version. A refused candidate
changes nothing.
"""

from __future__ import annotations

import asyncio
import logging
import sys
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from index import ArtifactError, Index, JointPQError, load_index
from index.canary import read_canaries, recall
from index.pointer import BadArtifactName, check_links_inside, current_version, resolve_in_root

from .items import drift_report
from .settings import Settings

if TYPE_CHECKING:
    from .metrics import Metrics

log = logging.getLogger("jointpq.service")


class QueryCache:
    """Thread-safe LRU of query text -> embedding, bounded by entries and by bytes. Real query
    streams repeat (head queries), and on a CPU the encoder costs 10-30x the index search, so a
    hit skips nearly all the work.

    Each entry owns its vector (a copy): a row *view* would keep its whole (batch, dim) encoder
    output alive, 40 cached rows holding 15.7 MB instead of 61 KB. The byte count is what the
    process really holds (keys, arrays with their headers, the dict's per-entry share)."""

    ENTRY_OVERHEAD = 100  # bytes of OrderedDict node + hash slot per entry, measured order

    def __init__(self, size: int, max_bytes: int = 64 << 20):
        self.size, self.max_bytes, self.hits, self.misses, self.bytes = size, max_bytes, 0, 0, 0
        self._data: OrderedDict[str, np.ndarray] = OrderedDict()
        self._lock = threading.Lock()

    @classmethod
    def cost(cls, text: str, vector: np.ndarray) -> int:
        return sys.getsizeof(text) + sys.getsizeof(vector) + cls.ENTRY_OVERHEAD

    def get_many(self, texts: list[str]) -> tuple[list[np.ndarray | None], list[int]]:
        out: list[np.ndarray | None] = []
        missing = []
        with self._lock:
            for i, t in enumerate(texts):
                v = self._data.get(t)
                if v is None:
                    missing.append(i)
                else:
                    self._data.move_to_end(t)
                out.append(v)
            self.hits += len(texts) - len(missing)
            self.misses += len(missing)
        return out, missing

    def put_many(self, texts: list[str], vectors: np.ndarray) -> None:
        with self._lock:
            for t, v in zip(texts, vectors, strict=True):
                v = np.array(v, copy=True)  # own memory, never a view into the batch
                v.setflags(write=False)  # shared by every request that hits it
                cost = self.cost(t, v)
                if cost > self.max_bytes:
                    continue
                old = self._data.pop(t, None)
                if old is not None:
                    self.bytes -= self.cost(t, old)
                self._data[t] = v
                self.bytes += cost
            while self._data and (len(self._data) > self.size or self.bytes > self.max_bytes):
                t, v = self._data.popitem(last=False)
                self.bytes -= self.cost(t, v)

    def stats(self) -> dict[str, int]:
        return {
            "size": len(self._data),
            "capacity": self.size,
            "bytes": self.bytes,
            "max_bytes": self.max_bytes,
            "hits": self.hits,
            "misses": self.misses,
        }


def encode_by_length(encoder: Any, texts: list[str]) -> np.ndarray:
    """(n,) texts -> (n, dim) float32, one encoder call per group of similar lengths (characters,
    the tokens' proxy). A transformer batch is padded to its longest input, so a short query
    coalesced with a 2,000-character one cost as much as the long one; grouped, each pays about
    its own length. The embeddings do not depend on the grouping (padding is masked)."""
    if len(texts) <= 1:
        return encoder.encode(texts, batch_size=1).numpy()
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    out = np.empty((len(texts), encoder.dim), dtype=np.float32)
    start = 0
    for end in range(1, len(order) + 1):
        if end == len(order) or len(texts[order[end]]) > 2 * len(texts[order[start]]) + 64:
            group = order[start:end]
            out[group] = encoder.encode([texts[i] for i in group], batch_size=len(group)).numpy()
            start = end
    return out


class ReloadRefused(Exception):  # noqa: N818 - reads as the outcome
    """A candidate artifact was not swapped in; `status` is the HTTP status that says why."""

    def __init__(self, status: int, reason: str):
        super().__init__(reason)
        self.status, self.reason = status, reason


@dataclass(frozen=True, eq=False)
class Loaded:
    """One verified, warmed artifact: index, optional query encoder, and what the checks found."""

    name: str  # as requested, relative to the artifact root
    path: Path
    index: Index
    encoder: Any  # model.encoders.TextEncoder | None (None: the artifact serves vectors only)
    loaded_at: float
    checks: dict[str, Any] = field(default_factory=dict)

    # read on every request: computed once (the index never changes once loaded)
    @cached_property
    def version(self) -> str:
        return self.index.version

    @cached_property
    def dim(self) -> int:
        return self.index.data.d

    @cached_property
    def nlist(self) -> int:
        return self.index.data.nlist

    cache: QueryCache | None = None
    live: Any = None  # service.items.LiveSlot: the view searches use (base + delta - tombstones)

    def encode(self, texts: list[str]) -> np.ndarray:
        """Query embeddings; repeated texts come from the LRU cache (one per artifact version, so
        a reload can never serve another encoder's vectors)."""
        if self.encoder is None:
            raise JointPQError(f"artifact {self.version} has no query encoder: send vectors")
        if self.cache is None:
            return encode_by_length(self.encoder, texts)
        out, missing = self.cache.get_many(texts)
        if missing:
            todo = list(dict.fromkeys(texts[i] for i in missing))
            fresh = encode_by_length(self.encoder, todo)
            self.cache.put_many(todo, fresh)
            row = {t: fresh[j] for j, t in enumerate(todo)}
            for i in missing:
                out[i] = row[texts[i]]
        return np.stack(out)

    def summary(self) -> dict[str, Any]:
        m = self.index.manifest
        training = m.training if m else {}
        return {
            "version": self.version,
            "name": self.name,
            "metric": self.index.data.metric,
            "dim": self.dim,
            "nlist": self.nlist,
            "M": self.index.data.M,
            "nbits": self.index.data.nbits,
            "n_items": self.live.view.n_live if self.live else self.index.data.n,
            "created": m.created if m else None,
            "mode": training.get("mode"),
            "metrics": training.get("metrics"),
            "encoder": None if self.encoder is None else self.encoder.config() | {"serving": describe(self.encoder)},
            "encoder_precision": training.get("encoder_precision", "fp32") if self.encoder is not None else None,
            "device": str(self.index.device),
            "backend": self.index.backend,
            "loaded_at": self.loaded_at,
            "checks": self.checks,
            "query_cache": self.cache.stats() if self.cache else None,
            "item_tower": (training.get("item_encoder") or {}).get("tower"),
            "live": self.live.view.stats() | {"updates": self.live.updates} if self.live else None,
            "drift": drift_report(self) if self.live else None,
            "indexed": training.get("indexed"),
            "compacted": training.get("compacted"),
        }


def describe(encoder: Any) -> dict[str, Any]:
    """What runs the encoder now: the ONNX attach record (runtime, precision, probe cosine) or torch."""
    from model.onnx_runtime import describe as runtime_of

    return runtime_of(encoder) or {"runtime": "torch"}


def encoder_threads(settings: Settings) -> int | None:
    """ONNX Runtime intra-op threads per session: the setting, else torch's, else one per core
    (ONNX Runtime's default). Measured on 2 cores with 2 workers (docs/benchmarks.md): 1 thread
    per worker was no better than 2 (226 vs 127 RPS at 8 clients, 158 vs 173 at 32)."""
    return settings.encoder_threads or settings.torch_threads


def shown(name: str, limit: int = 80) -> str:
    """A client-given name quoted for a message, cut short (names may be 4 KB long)."""
    return repr(name if len(name) <= limit else name[: limit - 3] + "...")


def load_candidate(settings: Settings, name: str) -> Loaded:
    """Load and validate `name` (a version or a path inside the artifact root). Blocking: call it
    from a worker thread. Raises ReloadRefused with the reason; never returns a half-checked one,
    and never lets another exception out: whatever a crafted artifact makes the loaders raise
    (RecursionError, MemoryError, TypeError, ...) is a 422 refusal that names it, logged."""
    try:
        return _load_candidate(settings, name)
    except ReloadRefused:
        raise
    except Exception as e:
        log.warning("reload candidate %s raised %s", shown(name), type(e).__name__, exc_info=True)
        reason = f"{type(e).__name__}: {str(e)[:200]}"
        raise ReloadRefused(422, f"refused: artifact {shown(name)} could not be loaded ({reason})") from None


def _load_candidate(settings: Settings, name: str) -> Loaded:
    try:
        path = resolve_in_root(settings.artifact_root, name)
        if not (path / "manifest.json").is_file():
            raise ReloadRefused(404, f"refused: no artifact named {shown(name)} in the artifact root")
        check_links_inside(settings.artifact_root, path)
    except BadArtifactName as e:
        raise ReloadRefused(400, f"refused: {e}") from None
    t0 = time.perf_counter()
    try:
        index = load_index(path, device=settings.device, backend=settings.backend)
    except JointPQError as e:
        raise ReloadRefused(422, f"refused: artifact {shown(name)} failed verification: {e}") from None
    checks: dict[str, Any] = {"verified": True}
    encoder = None
    if (path / "encoder" / "encoder.json").is_file():
        try:
            from model.encoders import load_encoder

            encoder = load_encoder(  # on CUDA the encoder runs there too
                path, runtime=settings.encoder_runtime, device=index.device, threads=encoder_threads(settings)
            )
        except Exception as e:
            raise ReloadRefused(422, f"refused: artifact {shown(name)} has an unusable query encoder: {e}") from None
        if encoder.dim != index.data.d:
            raise ReloadRefused(422, f"refused: encoder outputs {encoder.dim} dims, the index has {index.data.d}")
        checks["encoder"] = describe(encoder)
    cache = (
        QueryCache(settings.query_cache_size, settings.query_cache_bytes)
        if encoder is not None and settings.query_cache_size and settings.query_cache_bytes
        else None
    )
    from .items import new_slot

    candidate = Loaded(name, path, index, encoder, time.time(), checks, cache, new_slot(index))
    try:
        _smoke(candidate, settings)
        _canary_gate(candidate, settings)
    except (JointPQError, ValueError, RuntimeError) as e:
        raise ReloadRefused(422, f"refused: artifact {shown(name)} failed its smoke test: {e}") from None
    checks["load_seconds"] = round(time.perf_counter() - t0, 4)
    return candidate


def _smoke(c: Loaded, settings: Settings) -> None:
    """One search per path a request can take, at the batch sizes the batcher produces (warm-up)."""
    nprobe = min(settings.default_nprobe, c.nlist)
    rng = np.random.default_rng(0)
    for b in (1, 8, min(settings.batch_max_queries, 64)):
        x = rng.standard_normal((b, c.dim)).astype(np.float32)
        scores, rows = c.index.search_rows(x, min(settings.default_k, c.index.data.n), nprobe)
        if not (rows >= 0).any():
            raise ReloadRefused(422, f"refused: artifact {shown(c.name)} returned no hits for a smoke query")
        if not np.isfinite(scores[rows >= 0]).all():
            raise ReloadRefused(422, f"refused: artifact {shown(c.name)} returned non-finite scores")
    if c.encoder is not None:
        emb = c.encode(["smoke test query", "a second, longer smoke test query for the encoder"])
        if emb.shape != (2, c.dim) or not np.isfinite(emb).all():
            raise ReloadRefused(422, f"refused: the encoder of {shown(c.name)} gave {emb.shape} or non-finite output")
    c.checks["smoke"] = "ok"


def _canary_gate(c: Loaded, settings: Settings) -> None:
    """Recall on the artifact's canary queries must reach the threshold (setting, else the artifact's)."""
    try:
        canaries = read_canaries(c.path)
    except ArtifactError as e:
        raise ReloadRefused(422, f"refused: artifact {shown(c.name)}: {e}") from None
    if canaries is None or not canaries.queries:
        c.checks["canary"] = "none in artifact"
        return
    texts = [q.text for q in canaries.queries]
    if c.encoder is not None and all(texts):
        x = c.encode(texts)  # checks the shipped encoder too
    else:
        x = np.asarray([q.vector for q in canaries.queries], dtype=np.float32)
        if x.ndim != 2 or x.shape[1] != c.dim:
            raise ReloadRefused(422, f"refused: canary vectors of {shown(c.name)} are {x.shape}, index dim {c.dim}")
    _, ids = c.index.search(x, canaries.k, min(canaries.nprobe, c.nlist))
    got = recall(ids, [q.expected for q in canaries.queries])
    threshold = settings.canary_min_recall if settings.canary_min_recall is not None else canaries.min_recall
    c.checks["canary"] = {"recall": round(got, 4), "min_recall": threshold, "queries": len(canaries.queries)}
    if got < threshold:
        raise ReloadRefused(
            422, f"refused: canary recall@{canaries.k} of {shown(c.name)} is {got:.3f}, below the gate {threshold:.3f}"
        )


class IndexHolder:
    """Holds the artifact being served and the one before it (for rollback)."""

    def __init__(self, settings: Settings):
        from .items import ItemWriter

        self.settings = settings
        self.writer = ItemWriter(settings, lambda: self.current)  # the root's item log, this worker's writes
        self.current: Loaded | None = None
        self.previous: Loaded | None = None
        self.lock = asyncio.Lock()  # one reload at a time; searches never take it

    def initial_name(self) -> str | None:
        return self.settings.artifact or current_version(self.settings.artifact_root, self.settings.pointer_file)

    async def reload(self, name: str) -> tuple[Loaded, Loaded | None]:
        """Load `name` off to the side (in a thread: searches go on), then swap. ReloadRefused if bad."""
        async with self.lock:
            candidate = await asyncio.to_thread(load_candidate, self.settings, name)
            try:  # the logged item updates after the version's applied_seq, off to the side too
                candidate.checks["replayed_updates"] = await asyncio.to_thread(self.writer.replay_all, candidate)
            except (JointPQError, ValueError) as e:
                raise ReloadRefused(422, f"refused: replaying the item-update log onto {shown(name)}: {e}") from None
            old = self.current

            def swap() -> None:  # the swap: one reference assignment each
                self.previous, self.current = old, candidate

            # under the write lock, so no write lands between the last catch-up and the swap
            await asyncio.to_thread(self.writer.swap_in, candidate, swap)
            log.info("swapped in %s (was %s)", candidate.version, old.version if old else None)
            return candidate, old

    async def rollback(self) -> tuple[Loaded, Loaded]:
        async with self.lock:
            if self.previous is None or self.current is None:
                raise ReloadRefused(409, "no previous artifact to roll back to")
            cur, prev = self.current, self.previous

            def swap() -> None:
                self.previous, self.current = cur, prev

            await asyncio.to_thread(self.writer.swap_in, prev, swap)  # prev missed the writes since
            return self.current, self.previous


async def swap_to(holder: IndexHolder, metrics: Metrics, name: str, source: str) -> tuple[Loaded, Loaded | None]:
    """`holder.reload(name)`, logged and counted: the one way the start-up load, the pointer
    watcher (`source` "watch") and POST /admin/reload swap artifacts. ReloadRefused if refused."""
    try:
        new, old = await holder.reload(name)
    except ReloadRefused as e:
        metrics.reloads.labels("refused").inc()
        log.warning("reload refused", extra={"source": source, "artifact": name, "reason": e.reason})
        raise
    metrics.reloads.labels("ok").inc()
    metrics.serving(new.version)
    log.info("reloaded", extra={"source": source, "version": new.version, "previous": old and old.version})
    return new, old
