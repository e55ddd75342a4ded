"""Retrieval losses.

* `contrastive`: in-batch softmax with optional extra (hard) negatives, the Poeem objective:
  each query's positive competes with every other item in the batch and the hard negatives.
* `lambda_pairwise`: JPQ's ranking loss: pairwise logistic loss over (positive, negative) pairs,
  each weighted LambdaRank-style by |1/rank(neg) - 1/rank(pos)| so swaps near the top count most.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F  # noqa: N812


def contrastive(
    q: torch.Tensor, pos: torch.Tensor, neg: torch.Tensor | None = None, temperature: float = 0.05
) -> torch.Tensor:
    """q (B, d), pos (B, d), neg (N, d) -> mean cross-entropy of picking pos[b] for q[b]."""
    items = pos if neg is None or len(neg) == 0 else torch.cat([pos, neg])
    logits = q @ items.T / temperature  # (B, B + N)
    return F.cross_entropy(logits, torch.arange(len(q), device=q.device))


def lambda_pairwise(
    pos_scores: torch.Tensor, neg_scores: torch.Tensor, pos_rank: torch.Tensor, neg_rank: torch.Tensor
) -> torch.Tensor:
    """pos_scores (B,), neg_scores (B, N), 1-based ranks of each in the current index ->
    mean over queries of the sum over its N negatives of |1/r_neg - 1/r_pos| * log(1 + exp(s_neg - s_pos))."""
    weight = (1.0 / neg_rank.float() - 1.0 / pos_rank.float()[:, None]).abs()  # (B, N)
    return (weight * F.softplus(neg_scores - pos_scores[:, None])).sum(1).mean()
