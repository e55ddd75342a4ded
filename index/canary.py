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

from .artifact import read_json
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
    raw = read_json(path, CANARY)
    if not isinstance(raw, dict) or not isinstance(raw.get("queries"), list):
        raise ArtifactError(f"{CANARY}: expected an object with a 'queries' list")
    queries = tuple(_canary(i, q) for i, q in enumerate(raw["queries"]))
    k, nprobe = _number(raw, "k", int, 100), _number(raw, "nprobe", int, 16)
    min_recall = _number(raw, "min_recall", float, 0.0)
    if k < 1 or nprobe < 1 or not 0 <= min_recall <= 1:
        raise ArtifactError(f"{CANARY}: k and nprobe must be >= 1, min_recall in [0, 1]")
    measured = raw.get("measured_recall")
    measured = None if measured is None else _number(raw, "measured_recall", float, 0.0)
    return CanarySet(queries, k, nprobe, min_recall, measured)


def _number(raw: dict[str, Any], key: str, kind: type, default: float) -> Any:
    """raw[key] as `kind` (int accepts only integers; float also takes integers), else refuse."""
    v = raw.get(key, default)
    ok = isinstance(v, int) if kind is int else isinstance(v, (int, float))
    if not ok or isinstance(v, bool) or (kind is float and not np.isfinite(v)):
        raise ArtifactError(f"{CANARY}: field {key!r} must be a {kind.__name__}, got {type(v).__name__}")
    return kind(v)


def _canary(i: int, q: Any) -> Canary:
    """One canary entry, type-checked: `expected` a non-empty list of ids, `text` a string or
    null, `vector` a list of finite numbers. A wrong type is refused here with the entry named,
    not later inside an encoder or a search."""
    where = f"{CANARY}: queries[{i}]"
    if not isinstance(q, dict):
        raise ArtifactError(f"{where} must be an object")
    expected, text, vector = q.get("expected"), q.get("text"), q.get("vector") or []
    if not isinstance(expected, list) or not expected or not all(isinstance(e, (str, int)) for e in expected):
        raise ArtifactError(f"{where}.expected must be a non-empty list of ids")
    if text is not None and not isinstance(text, str):
        raise ArtifactError(f"{where}.text must be a string or null, got {type(text).__name__}")
    if not isinstance(vector, list) or not all(
        isinstance(x, (int, float)) and not isinstance(x, bool) and np.isfinite(x) for x in vector
    ):
        raise ArtifactError(f"{where}.vector must be a list of finite numbers")
    return Canary(tuple(str(e) for e in expected), tuple(float(x) for x in vector), text)
