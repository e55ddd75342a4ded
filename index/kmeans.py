"""Batched k-means in torch, the workhorse of the two-step builder and of warm starts.

One call clusters S independent problems of the same shape at once (the M PQ subspaces, or
S = 1 for the coarse quantizer) with batched matmuls, so PQ training is M times fewer Python
steps. Follows Faiss's Clustering where it matters for comparable results: random distinct
points as initial centroids, at most `max_points_per_centroid * k` training points (sampled),
and empty clusters repaired by splitting a large one.
"""

from __future__ import annotations

import torch

_ASSIGN_ELEMS = 1 << 22


def assign(x: torch.Tensor, c: torch.Tensor, metric: str = "l2") -> torch.Tensor:
    """(S, n, d) points, (S, k, d) centroids -> (S, n) index of the nearest (l2) or max-ip centroid."""
    S, n, _ = x.shape
    k = c.shape[1]
    out = torch.empty((S, n), dtype=torch.int64, device=x.device)
    # argmax of 2 x.c - ||c||^2 == argmin ||x - c||^2; one fused baddbmm per chunk
    bias = -(c**2).sum(-1)[:, None, :] if metric == "l2" else torch.zeros(S, 1, k, device=x.device)
    alpha = 2.0 if metric == "l2" else 1.0
    step = max(256, _ASSIGN_ELEMS // (S * k))  # keep the (S, step, k) score block cache-sized
    ct = c.transpose(1, 2)
    for s in range(0, n, step):
        xs = x[:, s : s + step]
        out[:, s : s + step] = torch.baddbmm(bias, xs, ct, alpha=alpha).argmax(-1)
    return out


def kmeans(
    x: torch.Tensor,
    k: int,
    *,
    niter: int = 25,
    seed: int = 0,
    metric: str = "l2",
    max_points_per_centroid: int = 256,
    init: torch.Tensor | None = None,
) -> torch.Tensor:
    """Cluster (S, n, d) (or (n, d)) points into k centroids each; returns (S, k, d) (or (k, d)).

    `metric="ip"` assigns by maximum inner product (as Faiss does for an inner-product IVF);
    centroids are always means. Raises ValueError when there are fewer points than centroids.
    """
    squeeze = x.ndim == 2
    x = x[None] if squeeze else x
    S, n, d = x.shape
    if n < k:
        raise ValueError(f"k-means needs at least k={k} points, got {n}")
    gen = torch.Generator().manual_seed(seed)
    if n > max_points_per_centroid * k:
        x = x[:, torch.randperm(n, generator=gen)[: max_points_per_centroid * k].to(x.device)]
        n = x.shape[1]
    x = x.float().contiguous()
    if init is not None:
        c = (init[None] if squeeze else init).to(x).clone()
    else:
        c = x[:, torch.randperm(n, generator=gen)[:k].to(x.device)].clone()
    flat_off = (torch.arange(S, device=x.device) * k)[:, None]
    for _ in range(niter):
        a = assign(x, c, metric)  # (S, n)
        sums = torch.zeros(S * k, d, device=x.device).index_add_(0, (a + flat_off).reshape(-1), x.reshape(-1, d))
        counts = torch.bincount((a + flat_off).reshape(-1), minlength=S * k).reshape(S, k)
        c = sums.reshape(S, k, d) / counts.clamp_min(1)[..., None]
        _split_empty(c, counts, gen)
    return c[0] if squeeze else c


def _split_empty(c: torch.Tensor, counts: torch.Tensor, gen: torch.Generator, eps: float = 1 / 1024) -> None:
    """Give each empty centroid half of a large cluster (Faiss: split_clusters), in place."""
    empty = (counts == 0).nonzero().tolist()
    for s, j in empty:
        sizes = counts[s].double()
        while True:  # pick a donor with probability ~ its size, as Faiss does
            donor = int(torch.multinomial((sizes - 1).clamp_min(0) + 1e-12, 1, generator=gen))
            if counts[s, donor] > 1:
                break
        sign = torch.where(torch.rand(c.shape[-1], generator=gen) < 0.5, -1.0, 1.0).to(c)
        c[s, j] = c[s, donor] * (1 + sign * eps)
        c[s, donor] = c[s, donor] * (1 - sign * eps)
        half = int(counts[s, donor]) // 2
        counts[s, j], counts[s, donor] = half, int(counts[s, donor]) - half
