"""Live item updates in a service worker: validate a batch, log it (fsync), then apply it.

The order is the durability contract: a batch is checked whole (ids, dims, NaN, encodable
texts) before anything is written, so a refused batch changes nothing; then it is appended to
the artifact root's write-ahead log and fsync'd (`index.wal`); then the served view is replaced
by one that includes it (`index.live`, copy-on-write, one reference assignment), and only then
does the route answer 200. So once a client has its 200, every later search on that worker sees
the change, a search sees a batch whole or not at all, and kill -9 at any moment loses nothing
acknowledged: the next start replays the log after the version's `applied_seq`.

Several workers (processes) share one root: appends are serialised by the log's file lock, and
an appender first applies what the others wrote (so each worker applies records in sequence
order). Writes another worker accepted reach this one within the watch interval (`catch_up`,
polled by the watch task) or at its own next write, whichever comes first.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from index.drift import DriftStats, report
from index.live import LiveIndex, replay
from index.wal import Entry, WalBehind, WriteAheadLog, encode_vector

log = logging.getLogger("jointpq.items")


class ItemError(ValueError):
    """A batch that cannot be applied; `field` names the offending part of the request."""

    def __init__(self, message: str, field: str | None = None, status: int = 422):
        super().__init__(message)
        self.field, self.status = field, status


_UNSET = object()


@dataclass
class LiveSlot:
    """The mutable part of a served artifact: its current `LiveIndex` view (replaced whole on
    every write; readers take `slot.view` once) and its item tower, loaded on first use."""

    view: LiveIndex
    tower: str | None = None  # fingerprint of the artifact's encoders (`model.towers.tower_fingerprint`)
    item_encoder: Any = _UNSET
    encoder_lock: threading.Lock = field(default_factory=threading.Lock)
    updates: int = 0  # batches applied since load (logged here or replayed)
    stale: bool = False  # the log was trimmed past this view: reload the compacted version

    def encoder_for_items(self, loaded: Any) -> Any | None:
        """The artifact's item tower (None when it has none: then only vectors are accepted)."""
        if self.item_encoder is _UNSET:
            with self.encoder_lock:
                if self.item_encoder is _UNSET:
                    from model.towers import NoItemTower, load_item_encoder

                    try:
                        # the runtime and threads the service asked for its query tower
                        asked = getattr(loaded.encoder, "runtime_info", None) or {}
                        enc = load_item_encoder(
                            loaded.path, query=loaded.encoder, device=loaded.index.device,
                            runtime=asked.get("requested", "torch"), threads=asked.get("threads"),
                        )  # fmt: skip
                        self.item_encoder = enc.eval()
                    except NoItemTower:
                        self.item_encoder = None
        return self.item_encoder


def new_slot(index: Any) -> LiveSlot:
    """A slot over a freshly loaded artifact (`index.Index`), at its manifest's `applied_seq`."""
    from model.towers import tower_fingerprint

    m = index.manifest
    seq = int((m.training or {}).get("applied_seq") or 0) if m else 0
    return LiveSlot(LiveIndex(index, seq), tower_fingerprint(m.files) if m else None)


@dataclass
class PreparedUpsert:
    ids: list[str]
    vectors: np.ndarray  # (n, d) float32
    texts: list[str | None]


class ItemWriter:
    """One per worker: the artifact root's log and the lock that orders this worker's writes."""

    def __init__(self, settings: Any, current: Any = None):
        self.settings = settings
        # the artifact served now (`holder.current`): a write that waited while a reload swapped
        # artifacts is applied to the new one, which every later search uses
        self.current = current or (lambda: None)
        self.wal = WriteAheadLog(settings.artifact_root, fsync=settings.wal_fsync)
        self.lock = threading.Lock()  # one write (append + apply) at a time in this process

    # -- validation and encoding (nothing written yet) --------------------------------------------
    def prepare_upsert(self, loaded: Any, items: list[Any]) -> PreparedUpsert:
        """Check the whole batch and embed it: texts through the item tower (batched by length),
        vectors as given. ItemError naming `items[i].<field>` for the first problem."""
        d = loaded.dim
        seen: dict[str, int] = {}
        for i, it in enumerate(items):
            if it.id in seen:
                raise ItemError(f"id {it.id[:80]!r} appears twice in this batch (items[{seen[it.id]}])",
                                f"items[{i}].id")  # fmt: skip
            seen[it.id] = i
        x = np.zeros((len(items), d), dtype=np.float32)
        text_rows = [i for i, it in enumerate(items) if it.text is not None]
        for i, it in enumerate(items):
            if it.vector is None:
                continue
            if len(it.vector) != d:
                raise ItemError(f"vector has {len(it.vector)} dims, the index has {d}", f"items[{i}].vector")
            v = np.asarray(it.vector, dtype=np.float64)
            if not np.isfinite(v).all():
                raise ItemError("vector contains NaN or infinite values", f"items[{i}].vector")
            if float(np.sqrt((v * v).sum())) > self.settings.max_vector_norm:
                raise ItemError(f"vector norm is above {self.settings.max_vector_norm:.0e}", f"items[{i}].vector")
            x[i] = v
        if text_rows:
            slot = loaded.live
            encoder = slot.encoder_for_items(loaded)
            if encoder is None:
                raise ItemError(
                    f"artifact {loaded.version} has no item tower (made before item towers shipped): send vectors",
                    f"items[{text_rows[0]}].text",
                )
            from .holder import encode_by_length

            x[text_rows] = encode_by_length(encoder, [items[i].text for i in text_rows])
        return PreparedUpsert([it.id for it in items], x, [it.text for it in items])

    # -- writes -------------------------------------------------------------------------------------
    def upsert(self, loaded: Any, items: list[Any]) -> dict[str, Any]:
        """Validate, log, apply; blocking (run it in the engine's thread pool)."""
        prepared = self.prepare_upsert(loaded, items)
        body = {
            "items": [
                {"id": i, "vector": encode_vector(v)} | ({"text": t} if t is not None else {})
                for i, v, t in zip(prepared.ids, prepared.vectors, prepared.texts, strict=True)
            ],
            "tower": loaded.live.tower,
        }
        entry, view = self._log_and_apply(loaded, "upsert", body)
        return {"upserted": len(prepared.ids), "seq": entry.seq, "version": view.version, "items": view.n_live}

    def delete(self, loaded: Any, ids: list[str]) -> dict[str, Any]:
        unique = list(dict.fromkeys(ids))
        unknown = [i for i, live in zip(unique, loaded.live.view.contains_many(unique), strict=True) if not live]
        entry, view = self._log_and_apply(loaded, "delete", {"ids": unique})
        return {
            "deleted": len(unique) - len(unknown),
            "unknown": unknown,
            "seq": entry.seq,
            "version": view.version,
            "items": view.n_live,
        }

    def _log_and_apply(self, loaded: Any, op: str, body: dict[str, Any]) -> tuple[Entry, LiveIndex]:
        with self.lock:  # swaps happen under this lock too (`swap_in`): `current()` is stable here
            # a reload may have swapped artifacts while this write was validated and encoded: it goes
            # to the one served now (texts encoded by another tower are encoded again by `replay`)
            current = self.current() or loaded
            if current.dim != loaded.dim:
                raise ItemError(f"the served artifact changed to {current.dim} dims while this write waited: retry",
                                status=409)  # fmt: skip
            loaded = current
            slot: LiveSlot = loaded.live
            t0 = time.perf_counter()
            try:
                missed, entry = self.wal.append(op, body, after=slot.view.applied_seq)
            except WalBehind:
                slot.stale = True  # follow_log reloads the compacted version on its next tick
                raise ItemError(
                    f"this worker serves {loaded.version}, older than a compaction another process made;"
                    " it is reloading the compacted version: retry in a moment",
                    status=503,
                ) from None
            view = self._apply(loaded, slot.view, [*missed, entry])
            slot.view = view  # the swap: searches from here on see the batch
            slot.updates += 1 + len(missed)
            log.debug("%s seq %d applied in %.1f ms", op, entry.seq, 1e3 * (time.perf_counter() - t0))
        return entry, view

    def _apply(self, loaded: Any, view: LiveIndex, entries: list[Entry]) -> LiveIndex:
        slot: LiveSlot = loaded.live

        def encode(texts: list[str]) -> np.ndarray:
            from .holder import encode_by_length

            enc = slot.encoder_for_items(loaded)
            if enc is None:
                raise ItemError("replaying texts logged by another model needs this artifact's item tower")
            return encode_by_length(enc, texts)

        return replay(view, entries, encode, slot.tower)

    # -- catching up: start-up, reload, other workers' writes ---------------------------------------
    def replay_all(self, loaded: Any) -> int:
        """Apply every logged record after the version's `applied_seq` (load time, in a worker
        thread, before the artifact is served). Returns how many were applied. A version older
        than the log's last trim (e.g. a model trained before a compaction) lacks the trimmed
        records: said in its checks and the log, and the newer records are applied."""
        slot: LiveSlot = loaded.live
        entries = self.wal.read_all(after=slot.view.applied_seq)
        if self.wal.trimmed_upto > slot.view.applied_seq:
            gap = (f"item-log records {slot.view.applied_seq + 1}..{self.wal.trimmed_upto} were folded into a"
                   " compacted version and are not in this one")  # fmt: skip
            loaded.checks["log_gap"] = gap
            log.warning("%s: %s", loaded.version, gap)
            slot.view = slot.view.with_seq(self.wal.trimmed_upto)
        if entries:
            slot.view = self._apply(loaded, slot.view, entries)
            slot.updates += len(entries)
            log.info("replayed %d logged item updates onto %s (now at seq %d)",
                     len(entries), loaded.version, slot.view.applied_seq)  # fmt: skip
        return len(entries)

    def catch_up(self, loaded: Any) -> int:
        """Apply records other workers appended since this one last read (cheap when none)."""
        slot: LiveSlot = loaded.live
        with self.lock:
            entries = self.wal.read_new(after=slot.view.applied_seq)
            if self.wal.trimmed_upto > slot.view.applied_seq:  # a gap: never apply past it
                slot.stale = True
                return 0
            if entries:
                slot.view = self._apply(loaded, slot.view, entries)
                slot.updates += len(entries)
        return len(entries)

    def swap_in(self, loaded: Any, swap: Any) -> int:
        """Catch `loaded` up with the log and call `swap()` under this worker's write lock, so
        no write lands between the catch-up and the swap (it would be missing from `loaded`).
        Returns the records applied here."""
        slot: LiveSlot = loaded.live
        with self.lock:
            entries = self.wal.read_new(after=slot.view.applied_seq)
            if entries:
                slot.view = self._apply(loaded, slot.view, entries)
                slot.updates += len(entries)
            swap()
        return len(entries)


def live_status(loaded: Any) -> dict[str, Any] | None:
    """{"live": view stats, "drift": report} of what is served (the /metrics gauges' source)."""
    if loaded is None or loaded.live is None:
        return None
    return {"live": loaded.live.view.stats(), "drift": drift_report(loaded)}


def drift_report(loaded: Any) -> dict[str, Any]:
    """The drift report of what this worker serves now (manifest baseline vs new items)."""
    view: LiveIndex = loaded.live.view
    training = (view.manifest.training if view.manifest else {}) or {}
    stats: DriftStats = view.drift_stats().merged((training.get("drift") or {}).get("new_items"))
    return report(training.get("drift_baseline"), stats, view.cell_sizes())


async def follow_log(settings: Any, holder: Any, swap: Any) -> None:
    """Every `watch_interval_s`: apply the records other workers appended (cheap: a stat and the
    new bytes). When the log was trimmed past what this worker applied (another worker
    compacted), the records are only in the compacted version: reload the pointer's version."""
    import asyncio

    from index.pointer import read_pointer

    while True:
        await asyncio.sleep(settings.watch_interval_s)
        cur = holder.current
        if cur is None:
            continue
        try:
            await asyncio.to_thread(holder.writer.catch_up, cur)
            if cur.live.stale:
                name = read_pointer(settings.artifact_root, settings.pointer_file)
                if name and name != cur.name:
                    await swap(name, "log")
        except asyncio.CancelledError:
            raise
        except Exception:  # the loop must live on; the next tick retries
            log.warning("following the item-update log failed", exc_info=True)
