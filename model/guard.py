"""Never ship an index worse than the two-step start.

Every mode holds aside part of its training queries (`hold_aside`), measures the two-step index
built from the same starting embeddings (OPQ + IVF-PQ, the recipe users would otherwise run) on
them, then each epoch; `Guard` keeps the best (early stopping after `patience` epochs without a
gain) and, when no epoch beats the start, the start itself is what ships. Labelled validation
scores nDCG@10 against the held-aside qrels; label-free validation scores overlap@10 with the
float model's top-10 (`teacher_relevance`). Both go through the product's own evaluation
(`model.evaluate.metrics` over the search engine's ranking at the service's nprobe).

Why it matters: with ~100 labelled queries, poeem fine-tuned the towers into an index clearly
worse than Faiss's two-step build and nothing stopped it (the training issue's table).
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

import numpy as np

from index import TorchSearcher
from index.ivfpq import IVFPQ

from .evaluate import metrics

T = TypeVar("T")


def hold_aside(items: Sequence[T], fraction: float, low: int, high: int, seed: int) -> tuple[list[T], list[T]]:
    """Seeded split of `items` into (train, validation): validation is `fraction` of them,
    clamped to [low, high] and to at most half (training keeps the majority)."""
    items = list(items)
    n_val = min(max(round(fraction * len(items)), low), high, len(items) // 2)
    order = list(range(len(items)))
    random.Random(seed ^ 0x5EED).shuffle(order)
    val = set(order[:n_val])
    return [x for i, x in enumerate(items) if i not in val], [x for i, x in enumerate(items) if i in val]


@dataclass
class Validation:
    """Held-aside queries, what counts as relevant for each, and how the score is read.

    texts (n,), relevant (n,) of {item id: grade}; `metric` is a key of `metrics()` (nDCG@10
    with labels; recall@10 against the teacher's top-10, i.e. overlap@10, without)."""

    texts: list[str]
    relevant: list[dict[str, int]]
    metric: str
    nprobe: int
    k: int = 100

    def score(self, query_encoder: Any, index: IVFPQ) -> float:
        """The product's evaluation of (query encoder, index) on these queries."""
        if not self.texts:
            return 0.0
        q = query_encoder.encode(self.texts)
        _, rows = TorchSearcher(index, "cpu").search_rows(q, self.k, min(self.nprobe, index.nlist))
        ranked = [[index.ids[r] for r in row if r >= 0] for row in rows]
        return metrics(ranked, self.relevant)[self.metric]


def teacher_relevance(rows: np.ndarray, ids: Sequence[str], k: int = 10) -> list[dict[str, int]]:
    """(n, >=k) teacher rows (exact float top-k) -> the relevance dicts label-free validation uses."""
    return [{ids[r]: 1 for r in row[:k] if r >= 0} for row in np.asarray(rows)]


@dataclass
class Guard(Generic[T]):
    """Keeps the best of the two-step start (epoch 0) and every epoch's snapshot; says when to stop.

    `offer(epoch, score, snapshot)` calls `snapshot()` only for a new best (copies cost); a
    trained epoch must beat the best so far strictly. `selected` is "two-step" or "trained"."""

    validation: Validation | None
    patience: int
    curve: list[dict[str, float]] = field(default_factory=list)
    best_score: float = float("-inf")
    best_epoch: int = -1
    best: T | None = None
    since_best: int = 0

    def start(self, score: float, snapshot: T) -> None:
        self.curve.append({"epoch": 0, "score": score})
        self.best_score, self.best_epoch, self.best = score, 0, snapshot

    def offer(self, epoch: int, score: float, snapshot: Callable[[], T]) -> bool:
        """Record an epoch; True when training should stop (no gain for `patience` epochs)."""
        self.curve.append({"epoch": epoch, "score": score})
        if score > self.best_score:
            self.best_score, self.best_epoch, self.best, self.since_best = score, epoch, snapshot(), 0
            return False
        self.since_best += 1
        return self.since_best >= self.patience

    @property
    def selected(self) -> str:
        return "two-step" if self.best_epoch == 0 else "trained"

    def record(self) -> dict[str, Any]:
        """The manifest's `training.validation`: metric, queries, the curve, what shipped."""
        v = self.validation
        return {
            "metric": v.metric if v else None,
            "nprobe": v.nprobe if v else None,
            "queries": len(v.texts) if v else 0,
            "curve": self.curve,
            "selected": self.selected,
            "selected_epoch": self.best_epoch,
            "start_score": self.curve[0]["score"] if self.curve else None,
            "best_score": self.best_score,
        }

    def message(self, mode: str) -> str:
        """The console line that says what ships and why."""
        if not self.curve:
            return f"{mode}: no validation (guard off): shipping the last epoch"
        v, start = self.validation, self.curve[0]["score"]
        what = f"{v.metric} on {len(v.texts)} held-aside queries, nprobe {v.nprobe}" if v else "validation"
        if self.selected == "two-step":
            trained = [c["score"] for c in self.curve[1:]]
            tried = f"best epoch {max(trained):.4f}" if trained else "no epoch validated"
            return (
                f"{mode}: no epoch beat the two-step start ({what}: start {start:.4f}, {tried}):"
                " shipping the two-step index (OPQ + IVF-PQ) and the untrained query encoder"
            )
        return f"{mode}: shipping epoch {self.best_epoch} ({what}: {self.best_score:.4f} vs two-step start {start:.4f})"
