"""Faiss interop: export an artifact's index to Faiss, import a Faiss IVF-PQ back, and a search
backend that serves our artifact through Faiss on CPU.

Faiss is optional (the ``faiss`` extra); every function here imports it lazily and raises a
clear ImportError when it is missing. Faiss labels are our row numbers, so ids map back exactly
and a ``-1`` label (fewer hits than k) is never looked up as an id.
"""

from __future__ import annotations

import numpy as np
import torch

from .errors import SearchError
from .ivfpq import IVFPQ, unpack_codes
from .search import Probe, check_k_nprobe, check_queries


def _faiss():
    try:
        import faiss
    except ImportError as e:  # pragma: no cover - exercised only without the extra
        raise ImportError("faiss is not installed: pip install 'jointpq[faiss]' (faiss-cpu)") from e
    return faiss


def available() -> bool:
    try:
        _faiss()
    except ImportError:
        return False
    return True


def to_faiss_ivfpq(index: IVFPQ, fast_scan: bool = False):
    """The IVF part of `index` as a Faiss IndexIVFPQ (or IndexIVFPQFastScan for 4-bit codes),
    expecting already-rotated queries. Codes are copied as they are: no re-encoding."""
    faiss = _faiss()
    metric = faiss.METRIC_INNER_PRODUCT if index.metric == "ip" else faiss.METRIC_L2
    quantizer = faiss.IndexFlatIP(index.d) if index.metric == "ip" else faiss.IndexFlatL2(index.d)
    quantizer.add(index.centroids.numpy())
    ivf = faiss.IndexIVFPQ(quantizer, index.d, index.nlist, index.M, index.nbits, metric)
    ivf.own_fields = True
    quantizer.this.disown()
    faiss.copy_array_to_vector(index.codebooks.numpy().ravel(), ivf.pq.centroids)
    ivf.is_trained = True
    ivf.precompute_table()
    codes = index.codes.numpy()
    rows = np.arange(index.n, dtype=np.int64)
    offs = index.offsets.tolist()
    for c in range(index.nlist):
        a, b = offs[c], offs[c + 1]
        if b > a:
            ivf.invlists.add_entries(
                c, b - a, faiss.swig_ptr(rows[a:b]), faiss.swig_ptr(np.ascontiguousarray(codes[a:b]))
            )
    ivf.ntotal = index.n
    if fast_scan:
        if index.nbits != 4:
            raise ValueError("Faiss fast-scan serves 4-bit codes only")
        fast = faiss.IndexIVFPQFastScan(ivf)  # repacks the codes into SIMD blocks
        ivf.own_fields, fast.own_fields = False, True  # the quantizer now belongs to `fast`
        return fast
    return ivf


def to_faiss(index: IVFPQ, fast_scan: bool = False):
    """A standalone Faiss index equivalent to `index`: rotation (if any) + IVF-PQ. Its labels are
    row numbers; map them through ``index.ids``."""
    faiss = _faiss()
    ivf = to_faiss_ivfpq(index, fast_scan)
    if torch.equal(index.rotation, torch.eye(index.d)):
        return ivf
    lt = faiss.LinearTransform(index.d, index.d, False)
    faiss.copy_array_to_vector(index.rotation.numpy().ravel(), lt.A)
    lt.is_trained = True
    lt.is_orthonormal = True
    pre = faiss.IndexPreTransform(lt, ivf)
    pre.own_fields = True
    ivf.this.disown()
    lt.this.disown()
    return pre


def from_faiss(findex, ids=None) -> IVFPQ:
    """Import a Faiss IndexIVFPQ (optionally inside an IndexPreTransform with one orthonormal
    linear transform, e.g. OPQ) as an `IVFPQ`. Faiss labels become item ids unless `ids`
    (indexed by label) is given."""
    faiss = _faiss()
    from .build import assemble

    keep = findex  # noqa: F841 - a downcast wrapper does not own the object: keep it alive
    findex = faiss.downcast_index(findex)
    d = findex.d
    R = np.eye(d, dtype=np.float32)
    if isinstance(findex, faiss.IndexPreTransform):
        if findex.chain.size() != 1:
            raise ValueError(f"only one pre-transform is supported, got {findex.chain.size()}")
        lt = faiss.downcast_VectorTransform(findex.chain.at(0))
        if not isinstance(lt, faiss.LinearTransform) or lt.d_in != lt.d_out:
            raise ValueError("the pre-transform must be a square linear transform (OPQ or a rotation)")
        if lt.have_bias and np.abs(faiss.vector_to_array(lt.b)).max() > 0:
            raise ValueError("the pre-transform has a bias; only rotations are supported")
        R = faiss.vector_to_array(lt.A).reshape(d, d).astype(np.float32)
        inner = findex.index
        findex = faiss.downcast_index(inner)
    if not isinstance(findex, faiss.IndexIVFPQ) or isinstance(findex, faiss.IndexIVFPQR):
        raise ValueError(f"expected an IndexIVFPQ, got {type(findex).__name__}")
    if not findex.by_residual:
        raise ValueError("only residual IVF-PQ (by_residual=True) is supported")
    if findex.pq.nbits not in (4, 8):
        raise ValueError(f"nbits {findex.pq.nbits} is not supported (4 or 8)")
    metric = {faiss.METRIC_INNER_PRODUCT: "ip", faiss.METRIC_L2: "l2"}.get(findex.metric_type)
    if metric is None:
        raise ValueError(f"metric type {findex.metric_type} is not supported")
    nlist, M, nbits = findex.nlist, findex.pq.M, findex.pq.nbits
    C = findex.quantizer.reconstruct_n(0, nlist)
    P = faiss.vector_to_array(findex.pq.centroids).reshape(M, 1 << nbits, d // M)
    inv = findex.invlists
    cells, codes, labels = [], [], []
    for c in range(nlist):
        s = inv.list_size(c)
        if s:
            codes.append(faiss.rev_swig_ptr(inv.get_codes(c), s * inv.code_size).copy().reshape(s, inv.code_size))
            labels.append(faiss.rev_swig_ptr(inv.get_ids(c), s).copy())
            cells.append(np.full(s, c, dtype=np.int64))
    codes_np = np.concatenate(codes) if codes else np.zeros((0, inv.code_size), np.uint8)
    labels_np = np.concatenate(labels) if labels else np.zeros(0, np.int64)
    item_ids = [str(i) for i in labels_np] if ids is None else [str(ids[i]) for i in labels_np]
    unpacked = unpack_codes(torch.from_numpy(codes_np), nbits)
    return assemble(
        metric,
        torch.from_numpy(R),
        torch.from_numpy(C),
        torch.from_numpy(P),
        torch.from_numpy(np.concatenate(cells) if cells else np.zeros(0, np.int64)),
        unpacked,
        item_ids,
        nbits,
    )


class FaissSearcher:
    """Serves an `IVFPQ` through Faiss on CPU; the rotation is applied here so the Faiss index is
    a bare IVF and per-call nprobe goes through SearchParameters (thread-safe, no shared state)."""

    name = "faiss"

    def __init__(self, index: IVFPQ, fast_scan: bool | None = None):
        self.faiss = _faiss()
        self.d, self.nlist, self.metric = index.d, index.nlist, index.metric
        fast = index.nbits == 4 if fast_scan is None else fast_scan
        self.ivf = to_faiss_ivfpq(index, fast_scan=fast)
        eye = torch.equal(index.rotation, torch.eye(index.d))
        self.rotation_t = None if eye else np.ascontiguousarray(index.rotation.numpy().T)
        self.device = torch.device("cpu")
        self._by_nprobe: dict[int, object] = {}
        self._sel_cache: tuple | None = None  # (dead mask, selector, bitmap, {nprobe: params})

    def _filtered(self, nprobe: int, dead: torch.Tensor):
        """SearchParametersIVF selecting the live rows of the (n,) `dead` mask. A mask is never
        mutated once made (`index.live` copies on write), so the packed bitmap (125 KB for 1M
        rows) is built once per mask and kept with it; the selector holds a raw pointer, so the
        bitmap lives on the params object as long as Faiss may read it."""
        cached = self._sel_cache
        if cached is None or cached[0] is not dead:
            alive = np.packbits(~dead.cpu().numpy().astype(bool), bitorder="little")
            sel = self.faiss.IDSelectorBitmap(len(alive), self.faiss.swig_ptr(alive))  # n: bitmap bytes
            cached = self._sel_cache = (dead, sel, alive, {})
        _, sel, alive, by_nprobe = cached
        params = by_nprobe.get(nprobe)
        if params is None:
            params = by_nprobe[nprobe] = self.faiss.SearchParametersIVF(nprobe=nprobe, sel=sel)
            params._keep = (alive, sel)  # lifetime of the buffers Faiss points into
        return params

    def _params(self, nprobe: int):
        """One SearchParametersIVF per nprobe, kept: Faiss only reads it, so threads can share it."""
        p = self._by_nprobe.get(nprobe)
        if p is None:
            p = self._by_nprobe[nprobe] = self.faiss.SearchParametersIVF(nprobe=nprobe)
        return p

    def _preassigned(self, xq: np.ndarray, k: int, probe: Probe, params) -> tuple[np.ndarray, np.ndarray]:
        """Faiss's C++ `search_preassigned` with per-call parameters: the Python wrapper refuses
        `params` and reads the index-wide nprobe, which concurrent searches must not touch."""
        n = xq.shape[0]
        cells = np.ascontiguousarray(probe.cells.numpy(), dtype=np.int64)
        dist = np.ascontiguousarray(probe.dist, dtype=np.float32)
        if cells.shape != (n, params.nprobe) or dist.shape != cells.shape:
            raise SearchError(f"probe: expected ({n}, {params.nprobe}) cells and distances, got {cells.shape}")
        D = np.empty((n, k), dtype=np.float32)
        I = np.empty((n, k), dtype=np.int64)  # noqa: E741
        sp = self.faiss.swig_ptr
        self.ivf.search_preassigned_c(n, sp(xq), k, sp(cells), sp(dist), sp(D), sp(I), False, params)
        return D, I

    def _rotated(self, queries) -> np.ndarray:
        xq = queries.detach().cpu().numpy() if isinstance(queries, torch.Tensor) else queries
        xq = np.ascontiguousarray(xq, dtype=np.float32)
        return xq @ self.rotation_t if self.rotation_t is not None else xq

    def probe(self, queries, nprobe: int) -> torch.Tensor:
        """(B, d) checked queries -> (B, nprobe) int64 cells Faiss scans for them, best first:
        its own quantizer's answer, so a delta segment scans exactly the cells this index does."""
        _, cells = self.ivf.quantizer.search(self._rotated(queries), min(int(nprobe), self.nlist))
        return torch.from_numpy(cells.astype(np.int64))

    def coarse(self, queries, nprobe: int) -> Probe:
        """(B, d) checked queries -> their `Probe`: Faiss's quantizer's cells and distances."""
        dist, cells = self.ivf.quantizer.search(self._rotated(queries), min(int(nprobe), self.nlist))
        return Probe(torch.from_numpy(cells.astype(np.int64)), dist.astype(np.float32))

    def search_rows(
        self, queries, k: int, nprobe: int, dead: torch.Tensor | None = None, probe: Probe | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """As `TorchSearcher.search_rows`; `dead` rows (tombstones) are skipped inside the scan
        by an `IDSelectorBitmap` of the live rows, so they never take a top-k slot. `probe`: the
        cells and coarse distances computed elsewhere (a shard's router): Faiss scans them as
        given (`search_preassigned`), exactly what its own probe would have led to."""
        queries = check_queries(queries, self.d)
        check_k_nprobe(k, nprobe)
        xq = self._rotated(queries)
        nprobe = min(int(nprobe), self.nlist) if probe is None else probe.nprobe
        params = self._params(nprobe) if dead is None else self._filtered(nprobe, dead)
        if probe is None:
            D, I = self.ivf.search(xq, int(k), params=params)  # noqa: E741 - Faiss's names
        else:
            D, I = self._preassigned(xq, int(k), probe, params)  # noqa: E741
        pad = -np.inf if self.metric == "ip" else np.inf
        D = np.where(I < 0, pad, D).astype(np.float32)
        return D, I.astype(np.int64)
