"""IVF-PQ search in torch: coarse probe, ADC lookup tables, top-k, on CPU or CUDA.

For a query q (rotated: q' = R q) and an item in cell c with codes (j_1..j_M), the score is
(design.md, "Search (ADC)")::

    ip:  s = q'.C[c] + sum_m LUT[m, j_m]                   LUT[m, j] = q'_m . P[m, j]
    l2:  ||q - x_hat||^2 = ||q||^2 - (2 q'.C[c] + 2 sum_m LUT[m, j_m] - ||x_hat||^2)

so one table per query serves every cell, and for L2 a per-item norm ||x_hat||^2 (computed once
at load time, 4 bytes an item) replaces Faiss's per-cell tables. Internally every score is
"higher is better"; L2 distances are restored at the end.

4-bit codes (K=16) are served by the same 8-bit kernel: a packed byte holds codes (a, b) of
subspaces (2j, 2j+1), so a combined 256-entry table LUT2[j, a + 16 b] = LUT[2j, a] + LUT[2j+1, b]
is indexed by the raw byte. Half the lookups, no unpacking.

Two strategies compute the sum_m LUT[m, j_m] part, chosen per call:

* ``cells`` (CPU, many queries per cell): pairs (query, cell) are grouped by cell; each cell's
  items are scored against all queries probing it with one `embedding_bag` call, whose weight is
  the (M*256, |Q_c|) table slice, so the per-item work is SIMD-wide over queries. Scores land in
  a per-query buffer and one `topk` finishes. A Python loop over the probed cells remains, so it
  pays off only when several queries share a cell.
* ``pairs`` (CUDA, or few queries per cell): every candidate of every query is laid out flat,
  scored with one dimension-1 `embedding_bag` into the flattened tables, then one `topk`. No
  Python loop; memory is bounded by chunking the queries.

Codes stay uint8 on the device; only a chunk's worth of int indices is ever made.
"""

from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F  # noqa: N812

from .errors import DimensionMismatch, SearchError
from .ivfpq import IVFPQ

STRATEGIES = ("auto", "cells", "pairs")
_BUF_ELEMS = 1 << 25  # per-chunk score buffer bound: 32M floats = 128 MB
_PAIR_ELEMS = 1 << 20  # per-chunk candidate bound for `pairs` (x M int32 indices)
_LUT_ELEMS = 1 << 24  # per-chunk lookup tables: 64 MB, and B * M * 256 stays far below 2**31
# Largest query norm searched: scores are sums of products of the (rotated) query with
# centroids and codewords in float32, so a finite query of norm ~1e38 still overflows to inf
# and ranks nothing. 1e18 leaves 1e20 of headroom for item norms; no embedding comes near it.
MAX_QUERY_NORM = 1e18


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """'auto' -> cuda when available, else cpu; anything else is passed to torch.device."""
    if isinstance(device, torch.device):
        return device
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise SearchError("device 'cuda' requested but CUDA is not available")
    return dev


def check_queries(queries, d: int) -> np.ndarray | torch.Tensor:
    """Validate a (B, d) query batch (numpy or torch); a 1-D vector is one query."""
    if not isinstance(queries, torch.Tensor):
        queries = np.asarray(queries)
        if not np.issubdtype(queries.dtype, np.number) or np.iscomplexobj(queries):
            raise SearchError(f"queries must be real numbers, got dtype {queries.dtype}")
    if queries.ndim == 1:
        queries = queries[None, :]
    if queries.ndim != 2:
        raise SearchError(f"queries must be (B, d), got shape {tuple(queries.shape)}")
    if queries.shape[1] != d:
        raise DimensionMismatch(f"queries have {queries.shape[1]} dims, index expects {d}")
    finite = torch.isfinite(queries).all() if isinstance(queries, torch.Tensor) else np.isfinite(queries).all()
    if not bool(finite):
        raise SearchError("queries contain NaN or infinite values")
    if len(queries):
        as64 = queries.double() if isinstance(queries, torch.Tensor) else np.asarray(queries, dtype=np.float64)
        top = float((as64**2).sum(1).max()) ** 0.5
        if top > MAX_QUERY_NORM:
            raise SearchError(f"a query vector has norm {top:.3g}, above {MAX_QUERY_NORM:.0e}: scores would overflow")
    return queries


@dataclass(frozen=True)
class Probe:
    """The coarse probe of a query batch, computed once and handed to every shard that scans for
    it (`index.shard`): the cells, best first, and the coarse quantizer's score of each, exactly as
    the backend computes them (Faiss's `search_preassigned` adds that score to each item's; the
    torch searcher recomputes it from its own centroids, which are the same on every shard)."""

    cells: torch.Tensor  # (B, nprobe) int64, on the CPU
    dist: np.ndarray  # (B, nprobe) float32: inner product (ip) or squared distance (l2) to each cell

    @property
    def nprobe(self) -> int:
        return int(self.cells.shape[1])


def check_k_nprobe(k: int, nprobe: int) -> None:
    for name, v in (("k", k), ("nprobe", nprobe)):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
            raise SearchError(f"{name} must be a positive integer, got {v!r}")


class TorchSearcher:
    """Searches an `IVFPQ` with torch on one device. Thread-safe: search never mutates state."""

    name = "torch"

    def __init__(self, index: IVFPQ, device: str | torch.device = "auto", strategy: str = "auto"):
        if strategy not in STRATEGIES:
            raise ValueError(f"strategy {strategy!r} is not one of {STRATEGIES}")
        dev = resolve_device(device)
        self.device, self.strategy = dev, strategy
        self.metric, self.d, self.nlist, self.n = index.metric, index.d, index.nlist, index.n
        eye = torch.eye(index.d)
        self.rotation = None if torch.equal(index.rotation, eye) else index.rotation.to(dev)
        self.centroids = index.centroids.to(dev)
        self.centroid_norms = (index.centroids**2).sum(1).to(dev)
        self.codebooks = _byte_codebooks(index.codebooks, index.nbits).to(dev)  # (Mv, 256, dv)
        self.Mv = int(self.codebooks.shape[0])
        self.codes = index.codes.to(dev)  # (n, Mv) uint8: one byte per virtual subspace
        self.offsets = index.offsets.to(dev)
        self.sizes = index.list_sizes().to(dev)
        self._offsets_list = index.offsets.tolist()
        self._max_list = int(index.list_sizes().max()) if index.nlist else 0
        self._arange = torch.arange(max(self._max_list, 1), device=dev)
        self._moff32 = (torch.arange(self.Mv, device=dev) * 256).to(torch.int32)
        # l2 needs ||x_hat'||^2 per item; computed here rather than stored, so it cannot disagree.
        self.norms = _item_norms(index).to(dev) if index.metric == "l2" else None

    @torch.inference_mode()
    def probe(self, queries, nprobe: int) -> torch.Tensor:
        """(B, d) checked queries -> (B, nprobe) int64 cells to scan, best first (on the CPU)."""
        xq = torch.as_tensor(queries).to(self.device, torch.float32)
        xr = xq @ self.rotation.T if self.rotation is not None else xq
        return self._probe(xr @ self.centroids.T, min(int(nprobe), self.nlist)).cpu()

    @torch.inference_mode()
    def coarse(self, queries, nprobe: int) -> Probe:
        """(B, d) checked queries -> their `Probe` (cells and coarse scores), for shards to reuse."""
        xq = torch.as_tensor(queries).to(self.device, torch.float32)
        xr = xq @ self.rotation.T if self.rotation is not None else xq
        coarse = xr @ self.centroids.T
        cells = self._probe(coarse, min(int(nprobe), self.nlist))
        dist = coarse.gather(1, cells)
        if self.metric == "l2":  # as Faiss reports it: ||q||^2 - 2 q.c + ||c||^2
            dist = (xr**2).sum(1, keepdim=True) - 2 * dist + self.centroid_norms[cells]
        return Probe(cells.cpu(), dist.float().cpu().numpy())

    def _probe(self, coarse: torch.Tensor, nprobe: int) -> torch.Tensor:
        rank = 2 * coarse - self.centroid_norms if self.metric == "l2" else coarse
        return rank.topk(nprobe, dim=1).indices  # (B, nprobe) best cell first

    @torch.inference_mode()
    def search_rows(
        self,
        queries,
        k: int,
        nprobe: int,
        dead: torch.Tensor | None = None,
        probe: torch.Tensor | Probe | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """(B, d) queries -> scores (B, k) float32 and rows (B, k) int64, best first.

        ip scores descend, l2 distances ascend. Where the probed cells hold fewer than k items
        the tail is padded with row -1 and score -inf (ip) or +inf (l2).
        `dead`: (n,) bool rows never returned (tombstones), dropped before the top-k, so a query
        still gets its k best live items. `probe`: (B, nprobe) cells to scan instead of this
        index's own coarse probe (a delta segment scans exactly the cells the base scanned; a
        shard scans the cells its router probed), a tensor or a `Probe`.
        """
        queries = check_queries(queries, self.d)
        check_k_nprobe(k, nprobe)
        xq = torch.as_tensor(queries).to(self.device, torch.float32)
        B = xq.shape[0]
        nprobe = min(int(nprobe), self.nlist)
        out_s = torch.full((B, k), -math.inf, device=self.device)
        out_r = torch.full((B, k), -1, dtype=torch.int64, device=self.device)
        if self.n == 0 or B == 0:
            return self._finish(xq, out_s, out_r)
        xr = xq @ self.rotation.T if self.rotation is not None else xq
        scale = 2.0 if self.metric == "l2" else 1.0  # l2 ranks by 2 q.x_hat - ||x_hat||^2
        coarse = xr @ self.centroids.T  # (B, nlist)
        if probe is None:
            probe = self._probe(coarse, nprobe)
        else:
            probe = (probe.cells if isinstance(probe, Probe) else probe).to(self.device)
            nprobe = probe.shape[1]
        cterm = scale * coarse.gather(1, probe)  # (B, nprobe) cell part of each item's score
        dead = dead.to(self.device) if dead is not None else None
        sizes = self.sizes[probe]  # (B, nprobe)
        totals = sizes.sum(1)
        tmax = int(totals.max())
        if tmax == 0:  # every probed cell is empty
            return self._finish(xq, out_s, out_r)
        strategy = self._pick_strategy(B, nprobe, probe)
        run = self._cells if strategy == "cells" else self._pairs
        budget = _BUF_ELEMS if strategy == "cells" else _PAIR_ELEMS
        # chunk the queries: bounded score buffer, bounded tables, int32 table indices in `pairs`
        step = max(1, min(budget // tmax, _LUT_ELEMS // (self.Mv * 256)))
        for s in range(0, B, step):
            e = min(B, s + step)
            v, r = run(scale * xr[s:e], probe[s:e], cterm[s:e], sizes[s:e], min(k, tmax), dead)
            out_s[s:e, : v.shape[1]] = v
            out_r[s:e, : r.shape[1]] = r
        return self._finish(xq, out_s, out_r)

    def _pick_strategy(self, B: int, nprobe: int, probe: torch.Tensor) -> str:
        if self.strategy != "auto":
            return self.strategy
        if self.device.type != "cpu":
            return "pairs"
        # cells amortises a Python step per probed cell over the queries sharing it.
        distinct = int(torch.unique(probe).numel())
        return "cells" if 2 * B * nprobe >= 3 * distinct else "pairs"

    def _finish(self, xq, s, r) -> tuple[np.ndarray, np.ndarray]:
        if self.metric == "l2":
            s = (xq**2).sum(1, keepdim=True) - s  # back to squared distances, ascending
            s = torch.where(r < 0, torch.full_like(s, math.inf), s)
        return s.cpu().numpy(), r.cpu().numpy()

    def _lut(self, xs: torch.Tensor) -> torch.Tensor:
        """(B, d) scaled rotated queries -> (B, Mv*256) tables, LUT[m, j] = q_m . P[m, j]."""
        B = xs.shape[0]
        xsub = xs.view(B, self.Mv, -1).transpose(0, 1)  # (Mv, B, dv)
        return torch.bmm(xsub, self.codebooks.transpose(1, 2)).transpose(0, 1).reshape(B, -1)

    def _pairs(self, xs, probe, cterm, sizes, k, dead=None):
        """Flat candidates of all queries; one gather-sum; one top-k."""
        B = probe.shape[0]
        lut = self._lut(xs).reshape(-1, 1)  # (B*Mv*256, 1)
        flat_sizes = sizes.reshape(-1)
        totals = sizes.sum(1)
        N = int(totals.sum())
        seg_start = torch.cumsum(flat_sizes, 0) - flat_sizes  # exclusive
        rows = torch.repeat_interleave(self.offsets[probe].reshape(-1) - seg_start, flat_sizes, output_size=N)
        rows += torch.arange(N, device=self.device)
        qidx = torch.repeat_interleave(torch.arange(B, device=self.device), totals, output_size=N)
        # flat table index of (query, subspace, code), int32 and in place: this is the hot loop
        idx = self.codes[rows].to(torch.int32)
        idx += (qidx * (self.Mv * 256)).to(torch.int32)[:, None]
        idx += self._moff32
        s = F.embedding_bag(idx, lut, mode="sum").squeeze(1)
        s += torch.repeat_interleave(cterm.reshape(-1), flat_sizes, output_size=N)
        if self.norms is not None:
            s -= self.norms[rows]
        if dead is not None:
            s.masked_fill_(dead[rows], -math.inf)
        qstart = torch.cumsum(totals, 0) - totals
        tmax = int(totals.max())
        buf = torch.full((B, tmax), -math.inf, device=self.device)
        buf[qidx, torch.arange(N, device=self.device) - qstart[qidx]] = s
        v, p = buf.topk(k, dim=1)
        r = rows[(qstart[:, None] + p).clamp_max(N - 1)]
        return v, torch.where(torch.isinf(v), torch.full_like(r, -1), r)

    def _cells(self, xs, probe, cterm, sizes, k, dead=None):
        """Group (query, cell) pairs by cell; score each cell's items for all its queries at once."""
        B, nprobe = probe.shape
        pos = torch.cumsum(sizes, 1) - sizes  # (B, nprobe) where each probed cell starts in the row
        tmax = int((pos[:, -1] + sizes[:, -1]).max())
        buf = torch.full((B * tmax,), -math.inf, device=self.device)
        base = (torch.arange(B, device=self.device)[:, None] * tmax + pos).reshape(-1)
        flat = probe.reshape(-1)
        order = torch.argsort(flat, stable=True)
        qs, base, cs = order // nprobe, base[order], cterm.reshape(-1)[order]
        counts = torch.bincount(flat, minlength=self.nlist).tolist()
        xsub = xs.view(B, self.Mv, -1)
        lut = self._lut(xs)  # (B, Mv*256), used as is by cells only one query probes
        offs, jobs, start = self._offsets_list, [], 0
        for c in torch.unique(flat).tolist():
            if offs[c + 1] > offs[c]:
                jobs.append((c, start, start + counts[c]))
            start += counts[c]

        @torch.inference_mode()  # thread-local: worker threads must enter it themselves
        def score(part: list[tuple[int, int, int]]) -> None:
            for c, start, end in part:
                a, b = offs[c], offs[c + 1]
                if end - start == 1:  # a lone query: its table row is already the weight
                    w = lut[qs[start]].view(-1, 1)
                else:  # (Mv, 256, dv) @ (Mv, dv, |Q_c|) -> (Mv*256, |Q_c|): this cell's tables, transposed
                    w = torch.bmm(self.codebooks, xsub[qs[start:end]].permute(1, 2, 0)).reshape(self.Mv * 256, -1)
                out = F.embedding_bag(self.codes[a:b].int() + self._moff32, w, mode="sum")  # (n_c, |Q_c|)
                out += cs[start:end]
                if self.norms is not None:
                    out -= self.norms[a:b, None]
                if dead is not None:
                    out.masked_fill_(dead[a:b, None], -math.inf)
                buf.put_(base[start:end] + self._arange[: b - a, None], out)  # disjoint slots per job

        # The per-cell ops are too small for torch's intra-op threads, so split the cells across
        # Python threads instead (torch releases the GIL inside each op).
        threads = min(torch.get_num_threads(), len(jobs) // 32) if self.device.type == "cpu" else 1
        if threads > 1:
            list(_pool(threads).map(score, [jobs[i::threads] for i in range(threads)]))
        else:
            score(jobs)
        v, p = buf.view(B, tmax).topk(k, dim=1)
        cum = pos + sizes
        slot = torch.searchsorted(cum, p, right=True).clamp_max(nprobe - 1)
        r = self.offsets[probe.gather(1, slot)] + p - pos.gather(1, slot)
        return v, torch.where(torch.isinf(v), torch.full_like(r, -1), r)


_POOLS: dict[int, ThreadPoolExecutor] = {}


def _pool(threads: int) -> ThreadPoolExecutor:
    if threads not in _POOLS:
        _POOLS[threads] = ThreadPoolExecutor(threads, thread_name_prefix="jointpq-cells")
    return _POOLS[threads]


def _byte_codebooks(codebooks: torch.Tensor, nbits: int) -> torch.Tensor:
    """Codebooks indexed by one code byte: (M, 256, dsub) as is for 8-bit; for 4-bit the
    (M/2, 256, 2*dsub) products of subspace pairs, entry a + 16 b = [P[2j, a], P[2j+1, b]]."""
    if nbits == 8:
        return codebooks.contiguous()
    byte = torch.arange(256)
    lo, hi = codebooks[0::2][:, byte % 16], codebooks[1::2][:, byte // 16]  # (M/2, 256, ds)
    return torch.cat([lo, hi], dim=2).contiguous()


def _item_norms(index: IVFPQ, chunk: int = 1 << 16) -> torch.Tensor:
    """(n,) ||x_hat'||^2 of every item, decoded a chunk at a time."""
    out = torch.empty(index.n)
    cells = index.cells()
    for s in range(0, index.n, chunk):
        rows = slice(s, min(index.n, s + chunk))
        out[rows] = (index.decode_rotated(index.unpacked_codes(rows), cells[rows]) ** 2).sum(1)
    return out
