"""Exact (flat) search: the reference every approximate result is measured against."""

from __future__ import annotations

import numpy as np
import torch

from .search import check_k_nprobe, check_queries, resolve_device


@torch.inference_mode()
def exact_search(
    queries, base, k: int, metric: str = "ip", device: str | torch.device = "auto", chunk: int = 1 << 16
) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k of (B, d) queries over (n, d) base vectors.

    Returns scores (B, k) float32 (ip descending, l2 squared distances ascending) and rows
    (B, k) int64; when k > n the tail is row -1. The base is scanned `chunk` rows at a time and
    partial top-k lists merged, so memory stays at B * (chunk + k) scores.
    """
    if metric not in ("ip", "l2"):
        raise ValueError(f"metric {metric!r} is not one of ('ip', 'l2')")
    dev = resolve_device(device)
    xb = torch.as_tensor(np.asarray(base, dtype=np.float32) if not isinstance(base, torch.Tensor) else base)
    xq = torch.as_tensor(check_queries(queries, xb.shape[1])).to(dev, torch.float32)
    check_k_nprobe(k, 1)
    B, n = xq.shape[0], xb.shape[0]
    best_s = torch.full((B, k), -float("inf"), device=dev)
    best_r = torch.full((B, k), -1, dtype=torch.int64, device=dev)
    for s in range(0, n, chunk):
        xc = xb[s : s + chunk].to(dev, torch.float32)
        sc = xq @ xc.T
        if metric == "l2":  # rank by -(||x||^2 - 2 q.x); ||q||^2 added back below
            sc = 2 * sc - (xc**2).sum(1)
        rc = torch.arange(s, s + xc.shape[0], device=dev).expand(B, -1)
        cat_s, cat_r = torch.cat([best_s, sc], 1), torch.cat([best_r, rc], 1)
        best_s, p = cat_s.topk(k, dim=1)
        best_r = cat_r.gather(1, p)
    if metric == "l2":
        best_s = (xq**2).sum(1, keepdim=True) - best_s
    return best_s.cpu().numpy(), best_r.cpu().numpy()
