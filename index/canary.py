"""Canary queries stored inside an artifact: the quality gate a service applies before it swaps
a new artifact in (checksums prove the files are intact, canaries prove the index still finds
what it should).

``canary.json``::

    {"k": 100, "nprobe": 16, "min_recall": 0.6, "measured_recall": 0.81,
     "queries": [{"text": "...", "vector": [...], "expected": ["doc-1", ...]}, ...]}

Each canary has the query vector the trainer's encoder produced (so a reader without the
encoder can still check the index) and, optionally, its text (so a service that encodes text
checks the shipped encoder too). `expected` are relevant item ids (e.g. qrels positives);
recall is the mean over canaries of |top-k ∩ expected| / |expected|.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .errors import ArtifactError

CANARY = "canary.json"


@dataclass(frozen=True)
class Canary:
    expected: tuple[str, ...]
    vector: tuple[float, ...] = ()
    text: str | None = None


@dataclass(frozen=True)
class CanarySet:
    queries: tuple[Canary, ...]
    k: int = 100
    nprobe: int = 16
    min_recall: float = 0.0
    measured_recall: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "k": self.k,
            "nprobe": self.nprobe,
            "min_recall": self.min_recall,
            "measured_recall": self.measured_recall,
            **self.extra,
            "queries": [{"text": c.text, "vector": list(c.vector), "expected": list(c.expected)} for c in self.queries],
        }

    def dumps(self) -> bytes:
        return json.dumps(self.to_json(), ensure_ascii=False).encode()


def recall(retrieved: Sequence[Sequence[str]], expected: Sequence[Sequence[str]]) -> float:
    """Mean over queries of the share of its expected ids found in its retrieved list."""
    if not expected:
        return 0.0
    return float(np.mean([len(set(r) & set(e)) / len(e) for r, e in zip(retrieved, expected, strict=True)]))


def make_canaries(
    vectors: np.ndarray,
    expected: Sequence[Sequence[str]],
    search: Callable[[np.ndarray, int, int], list[list[str]]],
    texts: Sequence[str | None] | None = None,
    k: int = 100,
    nprobe: int = 16,
    margin: float = 0.8,
) -> CanarySet:
    """Canaries from query vectors and their relevant ids; `min_recall` is `margin` times the
    recall the index reaches on them now, so a later artifact may be a little worse, not broken."""
    vectors = np.asarray(vectors, dtype=np.float32)
    got = search(vectors, k, nprobe)
    measured = recall(got, expected)
    texts = list(texts) if texts is not None else [None] * len(vectors)
    qs = tuple(
        Canary(tuple(str(e) for e in exp), tuple(float(x) for x in vec), t)
        for vec, exp, t in zip(vectors, expected, texts, strict=True)
    )
    return CanarySet(qs, k, nprobe, round(margin * measured, 6), measured)


def read_canaries(artifact: str | Path) -> CanarySet | None:
    """The artifact's canaries, or None when it has none. Raises `ArtifactError` if malformed."""
    path = Path(artifact) / CANARY
    if not path.is_file():
        return None
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
        queries = tuple(
            Canary(
                tuple(str(e) for e in q["expected"]),
                tuple(float(x) for x in q.get("vector") or ()),
                q.get("text"),
            )
            for q in raw["queries"]
        )
        k, nprobe, min_recall = int(raw.get("k", 100)), int(raw.get("nprobe", 16)), float(raw.get("min_recall", 0))
    except (ValueError, KeyError, TypeError) as e:
        raise ArtifactError(f"{path}: malformed canary file ({type(e).__name__}: {e})") from e
    if k < 1 or nprobe < 1 or not 0 <= min_recall <= 1 or any(not q.expected for q in queries):
        raise ArtifactError(f"{path}: k and nprobe must be >= 1, min_recall in [0, 1], every canary needs ids")
    measured = raw.get("measured_recall")
    return CanarySet(queries, k, nprobe, min_recall, None if measured is None else float(measured))
