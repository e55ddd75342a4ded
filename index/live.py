"""A served index that takes writes: the artifact's base lists + a delta segment + tombstones.

Users of vector services expect upsert and delete of single items at runtime (Milvus, Qdrant,
Vespa do it with a growing segment and delete bitmaps); retraining or rebuilding for each change
is not an option. Here:

* new and replaced items are quantized with the artifact's frozen quantizer (`index.encode`)
  and go to a **delta segment**: IVF-PQ with the base's rotation, centroids and codebooks, so it
  is scored with the same lookup tables, and scanned only in the cells the base's coarse probe
  picked for the query (torch: the base's `probe` is passed in; Faiss: the same quantizer and the
  same flat search pick the same cells);
* deleted and replaced items are **tombstones**: bool masks (base rows, delta rows) the searchers
  drop before their top-k (torch: masked scores; Faiss: an `IDSelectorBitmap`), so a query still
  gets its k best live items and a deleted id is never returned, at any k or nprobe;
* base and delta top-k are merged exactly (each is exact over what it scans).

`LiveIndex` is immutable: `upsert` / `delete` return a new one (copy-on-write of the small parts),
so a search that took one sees a write completely or not at all. The delta is append-only and
searched in two tiers: a `fresh` segment rebuilt on every write and a `sealed` one rebuilt only
when the fresh tier outgrows max(FRESH_MIN, sealed / FRESH_SHARE), so a write costs its own size
plus the fresh tier (amortised O(1) per item), not the whole delta: measured 2.4 ms for one item on
a 100k-item delta (bench/live.py), mostly the O(n) tensor concatenations. `compacted()` folds everything
into a plain `IVFPQ` (`jointpq compact`), which keeps search at the base's speed.

Row numbers returned by `search_rows` are base rows in [0, n_base) and delta rows from n_base
on; `ids_of(rows)` maps them with the same view.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from functools import cached_property
from typing import Any

import numpy as np
import torch

from .build import assemble
from .drift import DriftStats, cell_balance
from .encode import Quantizer
from .errors import SearchError
from .ivfpq import IVFPQ, pack_codes
from .loader import Index
from .search import Probe, TorchSearcher, check_k_nprobe, check_queries

FRESH_MIN = 2048  # the fresh tier is rebuilt on every write; folded into the sealed tier past this
FRESH_SHARE = 8  # ... or past 1/8 of the sealed tier: amortised O(1) rebuild work per written item


class RowMap(Mapping[str, int]):
    """Live delta id -> row: the map fixed when the delta was last sealed (`base`, shared by every
    later view), overlaid by a small map of the rows written since (`top`); a row the dead mask
    marks is not live. A write copies only `top`, so it costs O(batch + fresh tier) however large
    the delta (copying the whole 100k-entry map on each write cost ~2 ms of an 8 ms write)."""

    __slots__ = ("base", "dead", "size", "top")

    def __init__(self, base: dict[str, int], top: dict[str, int], dead: np.ndarray, size: int):
        self.base, self.top, self.dead, self.size = base, top, dead, size

    def __getitem__(self, key: str) -> int:
        r = self.top.get(key)
        if r is None:
            r = self.base.get(key)
        if r is None or self.dead[r]:
            raise KeyError(key)
        return r

    def __contains__(self, key: object) -> bool:
        try:
            self[key]  # type: ignore[index]
        except KeyError:
            return False
        return True

    def __len__(self) -> int:
        return self.size

    def __iter__(self) -> Iterator[str]:  # arrival order: sealed ids, then the ones written since
        for k, r in self.base.items():
            if k not in self.top and not self.dead[r]:
                yield k
        for k, r in self.top.items():
            if not self.dead[r]:
                yield k


def _no_rows() -> RowMap:
    return RowMap({}, {}, np.zeros(0, dtype=bool), 0)


@dataclass(frozen=True)
class Segment:
    """A searchable slice [start, end) of the delta's rows: an IVF-PQ of those rows sorted by cell
    (`order[i]` = the delta row at searcher row i) with the base's quantizer."""

    start: int
    end: int
    searcher: Any  # TorchSearcher (torch base: scans the base's probe) or FaissSearcher
    order: torch.Tensor  # (end - start,) int64


@dataclass(frozen=True)
class Delta:
    """New and replaced items, append-only: rows in arrival order with their cell (n,), unpacked
    codes (n, M), distortion (n,) for the drift report, and a `dead` mask for rows replaced or
    deleted since. `row` maps each live id to its row. Searched in two tiers so a write costs
    O(its size + the fresh tier), not O(delta): `sealed` covers the old rows and is rebuilt
    rarely (amortised), `fresh` the recent ones and is rebuilt on every write."""

    row_ids: tuple[str, ...] = ()
    cells: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.int64))
    codes: torch.Tensor | None = None
    err: torch.Tensor = field(default_factory=lambda: torch.zeros(0))
    dead: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.bool))
    row: RowMap = field(default_factory=_no_rows)  # live id -> row
    sealed: Segment | None = None
    fresh: Segment | None = None
    _masks: dict[int, torch.Tensor | None] = field(default_factory=dict)  # per segment, in its row order

    @property
    def n(self) -> int:
        """Live items in the delta."""
        return len(self.row)

    @property
    def ids(self) -> tuple[str, ...]:
        """Live ids, in arrival order."""
        return tuple(self.row)

    @property
    def alive(self) -> torch.Tensor:
        return ~self.dead

    def segments(self) -> list[Segment]:
        return [s for s in (self.sealed, self.fresh) if s is not None]

    def mask(self, seg: Segment) -> torch.Tensor | None:
        """The segment's dead rows in its searcher's row order (None: none dead), computed once."""
        if seg.start not in self._masks:
            d = self.dead[seg.start : seg.end][seg.order]
            self._masks[seg.start] = d if bool(d.any()) else None
        return self._masks[seg.start]


class LiveIndex:
    """Base `Index` + delta + tombstones, immutable; see the module docstring."""

    def __init__(
        self,
        base: Index,
        applied_seq: int = 0,
        *,
        dead: torch.Tensor | None = None,
        delta: Delta | None = None,
        shared: dict[str, Any] | None = None,
    ):
        self.base, self.applied_seq = base, applied_seq
        self.dead = dead  # (n_base,) bool or None when nothing was deleted
        self.delta = delta or Delta()
        # computed once per base and shared by every later view: id -> base row, base cells, quantizer
        self._shared = shared if shared is not None else {}

    # -- what the service reads like an `Index` ---------------------------------------------------
    @property
    def data(self) -> IVFPQ:
        return self.base.data

    @property
    def manifest(self):
        return self.base.manifest

    @property
    def version(self) -> str:
        return self.base.version

    @property
    def device(self) -> torch.device:
        return self.base.device

    @property
    def backend(self) -> str:
        return self.base.backend

    @property
    def quantizer(self) -> Quantizer:
        q = self._shared.get("quantizer")
        if q is None:
            q = self._shared["quantizer"] = Quantizer.of(self.base.data)
        return q

    @cached_property  # a view never changes; `changed` reads it on every search
    def n_dead(self) -> int:
        return int(self.dead.sum()) if self.dead is not None else 0

    @property
    def n_live(self) -> int:
        return self.base.data.n - self.n_dead + self.delta.n

    @property
    def changed(self) -> bool:
        return self.delta.n > 0 or self.n_dead > 0

    def _base_row(self) -> dict[str, int]:
        rows = self._shared.get("base_row")
        if rows is None:  # 1M ids: ~0.3 s, once per artifact, at its first write
            rows = self._shared["base_row"] = {str(i): r for r, i in enumerate(self.base.data.ids)}
        return rows

    def _base_cells(self) -> torch.Tensor:
        cells = self._shared.get("base_cells")
        if cells is None:
            cells = self._shared["base_cells"] = self.base.data.cells()
        return cells

    def contains(self, item_id: str) -> bool:
        """Whether `item_id` is a live item of this view."""
        if item_id in self.delta.row:
            return True
        r = self._base_row().get(item_id)
        return r is not None and not (self.dead is not None and bool(self.dead[r]))

    def contains_many(self, item_ids: Sequence[str]) -> list[bool]:
        """`contains` of each id (one call for a batch: a sharded view asks each shard once)."""
        return [self.contains(i) for i in item_ids]

    # -- writes: each returns a new view ----------------------------------------------------------
    def upsert(
        self, ids: Sequence[str], vectors: torch.Tensor | np.ndarray, applied_seq: int | None = None
    ) -> LiveIndex:
        """Insert or replace `ids` with (n, d) item embeddings (quantized here). Ids must be
        distinct (the caller validates a request before it is logged)."""
        x = torch.as_tensor(np.asarray(vectors, dtype=np.float32) if not isinstance(vectors, torch.Tensor) else vectors)
        if x.ndim != 2 or x.shape[0] != len(ids) or x.shape[1] != self.data.d:
            raise SearchError(f"upsert: expected ({len(ids)}, {self.data.d}) vectors, got {tuple(x.shape)}")
        return self.upsert_encoded(ids, *self.quantizer.encode_with_error(x.float()), applied_seq)

    def upsert_encoded(
        self,
        ids: Sequence[str],
        cells: torch.Tensor,
        codes: torch.Tensor,
        err: torch.Tensor,
        applied_seq: int | None = None,
    ) -> LiveIndex:
        """As `upsert`, for items already quantized with this quantizer (cells (n,), codes (n, M))."""
        if len(set(ids)) != len(ids):
            raise SearchError("upsert: the ids of one batch must be distinct")
        d = self.delta
        dead = self._killed(set(ids))
        n0 = len(d.row_ids)
        delta_dead = torch.cat([self._delta_dead_after(ids), torch.zeros(len(ids), dtype=torch.bool)])
        top = dict(d.row.top)
        top.update({i: n0 + j for j, i in enumerate(ids)})
        size = len(d.row) + len(ids) - sum(1 for i in ids if i in d.row)
        row = RowMap(d.row.base, top, delta_dead.numpy(), size)
        delta = self._tiers(
            Delta(
                d.row_ids + tuple(ids),
                torch.cat([d.cells, cells.cpu().long()]),
                torch.cat([self._delta_codes(), codes.cpu().to(torch.uint8)]),
                torch.cat([d.err, err.float().cpu()]),
                delta_dead,
                row,
                d.sealed,
                d.fresh,
            )
        )
        return self._next(dead, delta, applied_seq)

    def delete(self, ids: Sequence[str], applied_seq: int | None = None) -> tuple[LiveIndex, list[str]]:
        """Remove `ids`; returns (the new view, the ids that were not present: not an error).
        No segment is rebuilt: deleted delta rows are masked like base rows."""
        unknown = [i for i in dict.fromkeys(ids) if not self.contains(i)]
        dead = self._killed(set(ids))
        d = self.delta
        gone = [i for i in dict.fromkeys(ids) if i in d.row]
        delta = d
        if gone:
            delta_dead = self._delta_dead_after(gone)
            drop = set(gone)
            row = RowMap(d.row.base, {i: r for i, r in d.row.top.items() if i not in drop}, delta_dead.numpy(),
                         len(d.row) - len(drop))  # fmt: skip
            delta = Delta(d.row_ids, d.cells, d.codes, d.err, delta_dead, row, d.sealed, d.fresh)
        return self._next(dead, delta, applied_seq), unknown

    def _killed(self, ids: set[str]) -> torch.Tensor | None:
        """The base tombstone mask with the base rows of `ids` added (a copy; None if still empty)."""
        base_row = self._base_row()
        rows = [base_row[i] for i in ids if i in base_row]
        if not rows:
            return self.dead
        dead = self.dead.clone() if self.dead is not None else torch.zeros(self.data.n, dtype=torch.bool)
        dead[torch.tensor(rows, dtype=torch.int64)] = True
        return dead

    def _delta_dead_after(self, ids: Sequence[str]) -> torch.Tensor:
        """The delta's dead mask with the live rows of `ids` added (a copy when anything changes)."""
        rows = [self.delta.row[i] for i in ids if i in self.delta.row]
        if not rows:
            return self.delta.dead
        dead = self.delta.dead.clone()
        dead[torch.tensor(rows, dtype=torch.int64)] = True
        return dead

    def _delta_codes(self) -> torch.Tensor:
        return self.delta.codes if self.delta.codes is not None else torch.zeros(0, self.data.M, dtype=torch.uint8)

    def _tiers(self, d: Delta) -> Delta:
        """`d` with its search tiers brought up to its rows: the fresh tier rebuilt over the rows
        after the sealed tier, or, once it outgrows FRESH_MIN and 1/FRESH_SHARE of the sealed tier,
        everything sealed into one segment (the amortised O(delta) step)."""
        n = len(d.row_ids)
        sealed_end = d.sealed.end if d.sealed is not None else 0
        if n - sealed_end > max(FRESH_MIN, sealed_end // FRESH_SHARE):
            row = RowMap(dict(d.row.items()), {}, d.row.dead, len(d.row))  # the amortised O(delta) step
            return replace(d, row=row, sealed=self._segment(d, 0, n), fresh=None, _masks={})
        return replace(d, fresh=self._segment(d, sealed_end, n) if n > sealed_end else None, _masks={})

    def _segment(self, d: Delta, start: int, end: int) -> Segment:
        b = self.data
        cells = d.cells[start:end]
        order = torch.argsort(cells, stable=True)
        offsets = torch.zeros(b.nlist + 1, dtype=torch.int64)
        offsets[1:] = torch.cumsum(torch.bincount(cells, minlength=b.nlist), 0)
        ids = np.empty(end - start, dtype=object)  # the searchers never read ids: rows map through `order`
        seg = IVFPQ(b.metric, b.rotation, b.centroids, b.codebooks, pack_codes(d.codes[start:end][order], b.nbits),
                    offsets, ids, b.nbits)  # fmt: skip
        searcher: Any
        if self.backend == "faiss":
            # Faiss scans the delta as it scans the base: the same quantizer (same centroids, same
            # flat search) picks the same cells for a query, deterministically; ~20x less overhead
            # per call than the torch path on a small segment (measured, bench/live.py)
            from .faiss_interop import FaissSearcher

            searcher = FaissSearcher(seg, fast_scan=False)
        else:  # flat candidate lists: a delta has few items per cell, the per-cell loop would dominate
            searcher = TorchSearcher(seg, device=self.device, strategy="pairs")
        return Segment(start, end, searcher, order)

    def _next(self, dead: torch.Tensor | None, delta: Delta, applied_seq: int | None) -> LiveIndex:
        seq = self.applied_seq if applied_seq is None else applied_seq
        return LiveIndex(self.base, seq, dead=dead, delta=delta, shared=self._shared)

    def with_seq(self, applied_seq: int) -> LiveIndex:
        """The same items, recorded as having applied the log up to `applied_seq`."""
        return self._next(self.dead, self.delta, applied_seq)

    # -- search -------------------------------------------------------------------------------------
    def search_rows(
        self, queries, k: int = 10, nprobe: int | None = None, probe: Probe | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """(B, d) queries -> scores (B, k) and rows (B, k) (base rows, then delta rows from
        n_base; -1 where no hit), best first; deleted items never appear. `probe`: the cells
        to scan, computed once elsewhere (a shard's router, `index.shard`), instead of here."""
        from .loader import DEFAULT_NPROBE

        nprobe = DEFAULT_NPROBE if nprobe is None else nprobe
        if not self.changed and probe is None:
            return self.base.search_rows(queries, k, nprobe)
        queries = check_queries(queries, self.data.d)
        check_k_nprobe(k, nprobe)
        searcher = self.base.searcher
        if probe is not None:
            nprobe = probe.nprobe
        s_b, r_b = searcher.search_rows(queries, k, nprobe, dead=self.dead, probe=probe)  # type: ignore[call-arg]
        segments = self.delta.segments()
        if not segments or len(queries) == 0:
            return s_b, r_b
        parts_s, parts_r = [s_b], [r_b]
        cells = probe.cells if probe is not None else None
        for seg in segments:
            dead = self.delta.mask(seg)
            if isinstance(seg.searcher, TorchSearcher):  # exactly the cells the base scanned
                cells = cells if cells is not None else searcher.probe(queries, nprobe)  # type: ignore[attr-defined]
                s_d, r_d = seg.searcher.search_rows(queries, k, nprobe, dead=dead, probe=cells)
            else:
                s_d, r_d = seg.searcher.search_rows(queries, k, nprobe, dead=dead, probe=probe)
            rows = seg.order.numpy()[np.clip(r_d, 0, None)] + seg.start + self.data.n
            parts_s.append(s_d)
            parts_r.append(np.where(r_d >= 0, rows, -1))
        s, r = np.concatenate(parts_s, 1), np.concatenate(parts_r, 1)
        key = -s if self.data.metric == "ip" else s  # ascending sort key, ties: base first
        order = np.argsort(key, axis=1, kind="stable")[:, :k]
        return np.take_along_axis(s, order, 1), np.take_along_axis(r, order, 1)

    def ids_of(self, rows: np.ndarray) -> np.ndarray:
        """Item ids of non-negative `rows` from `search_rows` of this same view."""
        rows = np.asarray(rows)
        n = self.data.n
        high = rows >= n
        if not high.any():
            return self.base.data.ids[rows]
        out = np.empty(rows.shape, dtype=object)
        out[~high] = self.base.data.ids[rows[~high]]
        out[high] = [self.delta.row_ids[r - n] for r in rows[high].tolist()]
        return out

    def search(
        self, queries, k: int = 10, nprobe: int | None = None, probe: Probe | None = None
    ) -> tuple[list[np.ndarray], list[list[str]]]:
        """As `Index.search`: per query the scores and ids of its hits, best first."""
        scores, rows = self.search_rows(queries, k, nprobe, probe)
        out_s, out_i = [], []
        for s, r in zip(scores, rows, strict=True):
            v = r >= 0
            out_s.append(s[v])
            out_i.append(self.ids_of(r[v]).tolist())
        return out_s, out_i

    # -- reports and compaction ---------------------------------------------------------------------
    def cell_sizes(self) -> torch.Tensor:
        """(nlist,) live items per cell: base minus tombstones plus delta."""
        sizes = self.data.list_sizes().clone()
        if self.dead is not None:
            sizes -= torch.bincount(self._base_cells()[self.dead], minlength=self.data.nlist)
        if self.delta.n:
            sizes += torch.bincount(self.delta.cells[self.delta.alive], minlength=self.data.nlist)
        return sizes

    def drift_stats(self) -> DriftStats:
        stats = DriftStats()
        stats.add(self.delta.err[self.delta.alive])
        return stats

    def stats(self) -> dict[str, Any]:
        return {
            "base_items": self.data.n,
            "deleted_base_items": self.n_dead,
            "delta_items": self.delta.n,
            "live_items": self.n_live,
            "applied_seq": self.applied_seq,
            "cells": cell_balance(self.cell_sizes()),
        }

    def compacted(self) -> IVFPQ:
        """Base minus tombstones plus delta as one plain `IVFPQ` (what `jointpq compact` writes);
        searching it gives the same results as searching this view."""
        b = self.data
        alive = ~self.dead if self.dead is not None else torch.ones(b.n, dtype=torch.bool)
        keep = self.delta.alive
        cells = torch.cat([self._base_cells()[alive], self.delta.cells[keep]])
        codes = torch.cat([b.unpacked_codes()[alive], self._delta_codes()[keep]])
        ids = [str(i) for i in b.ids[alive.numpy()]]
        ids += [i for i, k in zip(self.delta.row_ids, keep.tolist(), strict=True) if k]
        return assemble(b.metric, b.rotation, b.centroids, b.codebooks, cells, codes, ids, b.nbits)


def live(base: Index, applied_seq: int = 0) -> LiveIndex:
    """A `LiveIndex` over a loaded artifact with nothing changed yet."""
    return LiveIndex(base, applied_seq)


def replay(
    view: LiveIndex,
    entries: Sequence[Any],
    encode_texts: Callable[[list[str]], np.ndarray] | None = None,
    tower: str | None = None,
) -> LiveIndex:
    """Apply write-ahead-log entries (`index.wal.Entry`, in sequence order) to `view`.

    An upsert record keeps each item's vector, and its text when it came as text, with the
    fingerprint of the item tower that encoded it. Replayed onto a version whose tower differs
    (a retrained model), texts are encoded again with `encode_texts` (this version's item tower)
    so they land where this model puts them; vectors given by the client are taken as they are."""
    from .wal import decode_vector

    d = view.data.d
    for e in entries:
        if e.seq <= view.applied_seq:
            continue
        if e.op == "delete":
            view, _ = view.delete([str(i) for i in e.body.get("ids", [])], applied_seq=e.seq)
        elif e.op == "upsert":
            items = e.body.get("items", [])
            x = np.stack([decode_vector(it["vector"], d) for it in items]) if items else np.zeros((0, d), np.float32)
            stale = [j for j, it in enumerate(items) if it.get("text") is not None and e.body.get("tower") != tower]
            if stale and encode_texts is not None:
                x[stale] = encode_texts([items[j]["text"] for j in stale])
            view = view.upsert([str(it["id"]) for it in items], x, applied_seq=e.seq) if items else view.with_seq(e.seq)
        else:
            view = view.with_seq(e.seq)
    return view
