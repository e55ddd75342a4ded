"""The two-step builder: IVF-PQ from fixed embeddings, the classic (Faiss) way, in torch.

    1. optional OPQ rotation R (Ge et al. 2013, non-parametric: alternate PQ k-means and the
       orthogonal Procrustes solution for R), trained on the raw vectors;
    2. k-means coarse quantizer on R x (assignment by max inner product for metric "ip", as Faiss);
    3. PQ k-means on the residuals R x - C[cell], one codebook per subspace;
    4. encode every item, sort rows by cell (CSR offsets).

It is the baseline the jointly trained index must beat, and the warm start of joint training.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from .encode import assign_cells, encode_pq
from .ivfpq import IVFPQ, METRICS, NBITS, pack_codes
from .kmeans import assign, kmeans

__all__ = ["assemble", "assign_cells", "build_ivfpq", "encode_pq", "train_opq"]  # encode_*: index.encode


def train_opq(
    x: torch.Tensor,
    M: int,
    nbits: int = 8,
    *,
    niter: int = 25,
    niter_pq: int = 4,
    seed: int = 0,
    max_points: int = 65536,
) -> torch.Tensor:
    """(n, d) vectors -> (d, d) orthonormal R minimising the PQ distortion of R x."""
    n, d = x.shape
    gen = torch.Generator().manual_seed(seed)
    if n > max_points:
        x = x[torch.randperm(n, generator=gen)[:max_points].to(x.device)]
    x = x.float()
    K = 1 << nbits
    R = torch.linalg.qr(torch.randn(d, d, generator=gen, dtype=torch.float64))[0].float().to(x.device)
    P = None
    for it in range(niter):
        xr = x @ R.T
        sub = xr.view(-1, M, d // M).transpose(0, 1)  # (M, n, dsub)
        P = kmeans(sub, K, niter=40 if it == 0 else niter_pq, seed=seed + it, init=P)
        codes = assign(sub, P)  # (M, n)
        y = torch.gather(P, 1, codes[..., None].expand(-1, -1, d // M)).transpose(0, 1).reshape(-1, d)
        # Procrustes: R = argmin ||R x - y|| over orthonormal R; X^T Y = U S V^T -> R = V U^T
        U, _, Vt = torch.linalg.svd((x.T @ y).double())
        R = (Vt.T @ U.T).float()
    return R


def assemble(metric: str, rotation, centroids, codebooks, cells, codes, ids, nbits: int) -> IVFPQ:
    """Sort encoded items by cell into the CSR layout and wrap them as an `IVFPQ`."""
    order = torch.argsort(cells, stable=True)
    nlist = centroids.shape[0]
    offsets = torch.zeros(nlist + 1, dtype=torch.int64)
    offsets[1:] = torch.cumsum(torch.bincount(cells.cpu(), minlength=nlist), 0)
    ids_arr = np.empty(len(ids), dtype=object)
    ids_arr[:] = [str(i) for i in ids]
    # copies, never views: a trainer passes its live parameters, and a kept snapshot must not
    # change when training goes on
    index = IVFPQ(
        metric=metric,
        rotation=rotation.detach().float().cpu().clone().contiguous(),
        centroids=centroids.detach().float().cpu().clone().contiguous(),
        codebooks=codebooks.detach().float().cpu().clone().contiguous(),
        codes=pack_codes(codes[order].cpu(), nbits),
        offsets=offsets,
        ids=ids_arr[order.cpu().numpy()],
        nbits=nbits,
    )
    index.check()
    return index


def build_ivfpq(
    x,
    *,
    nlist: int,
    M: int,
    nbits: int = 8,
    metric: str = "ip",
    opq: bool = False,
    ids: Sequence[str] | None = None,
    seed: int = 0,
    niter: int | None = None,
    device: str | torch.device = "cpu",
) -> IVFPQ:
    """Train and fill an IVF-PQ index from (n, d) vectors; item ids default to row numbers.

    `niter` overrides both k-means iteration counts (default: 10 coarse, 25 PQ, as Faiss)."""
    if metric not in METRICS:
        raise ValueError(f"metric {metric!r} is not one of {METRICS}")
    if nbits not in NBITS:
        raise ValueError(f"nbits {nbits} is not one of {NBITS}")
    x = torch.as_tensor(np.asarray(x, dtype=np.float32) if not isinstance(x, torch.Tensor) else x).float()
    n, d = x.shape
    if d % M or (nbits == 4 and M % 2):
        raise ValueError(f"dim {d} must be divisible by M={M} (and M even for 4-bit codes)")
    if ids is not None and len(ids) != n:
        raise ValueError(f"{len(ids)} ids for {n} vectors")
    K = 1 << nbits
    if n < max(nlist, K):
        raise ValueError(f"need at least max(nlist, K) = {max(nlist, K)} vectors to train, got {n}")
    dev = torch.device(device)
    x = x.to(dev)
    R = train_opq(x, M, nbits, seed=seed) if opq else torch.eye(d, device=dev)
    xr = x @ R.T
    # Faiss's defaults: 10 k-means iterations for the coarse quantizer, 25 for PQ codebooks
    C = kmeans(xr, nlist, niter=niter or 10, seed=seed, metric="ip" if metric == "ip" else "l2")
    cells = assign_cells(xr, C, metric)
    res = xr - C[cells]
    sub = res.view(n, M, d // M).transpose(0, 1)  # (M, n, dsub)
    P = kmeans(sub, K, niter=niter or 25, seed=seed + 1)
    codes = encode_pq(res, P)  # what Quantizer(metric, R, C, P).encode(x) gives: index.encode
    return assemble(metric, R, C, P, cells, codes, ids if ids is not None else [str(i) for i in range(n)], nbits)
