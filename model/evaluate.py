"""Retrieval metrics over ranked id lists and qrels, and evaluation of an artifact through the
same search engine the service uses (`index.load_index`)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np


def metrics(ranked: Sequence[Sequence[str]], relevant: Sequence[dict[str, int]]) -> dict[str, float]:
    """Mean recall@10, recall@100, nDCG@10 and MRR@10 (binary or graded qrels, BEIR's definitions:
    recall over the relevant set, nDCG with gains = qrel score and the ideal from the qrels)."""
    r10, r100, ndcg, mrr = [], [], [], []
    for ids, rel in zip(ranked, relevant, strict=True):
        pos = {d for d, s in rel.items() if s > 0}
        if not pos:
            continue
        r10.append(len(pos & set(ids[:10])) / len(pos))
        r100.append(len(pos & set(ids[:100])) / len(pos))
        top = list(ids[:10])  # a repeated id keeps its slot but earns nothing the second time (nDCG <= 1)
        dcg = sum(rel.get(d, 0) / math.log2(i + 2) for i, d in enumerate(top) if d not in top[:i])
        ideal = sorted((s for s in rel.values() if s > 0), reverse=True)[:10]
        idcg = sum(s / math.log2(i + 2) for i, s in enumerate(ideal))
        ndcg.append(dcg / idcg)
        first = next((i for i, d in enumerate(ids[:10]) if d in pos), None)
        mrr.append(0.0 if first is None else 1.0 / (first + 1))
    return {"recall@10": _mean(r10), "recall@100": _mean(r100), "ndcg@10": _mean(ndcg), "mrr@10": _mean(mrr)}


def _mean(values: list[float]) -> float:
    return float(np.mean(values)) if values else 0.0


def evaluate(
    query_encoder, index, data, split: str = "test", nprobes: Sequence[int] = (1, 4, 16), k: int = 100
) -> list[dict]:
    """Encode the split's queries, search `index` (an `index.Index` or a searcher with
    `search_rows` over an IVFPQ given as `ids`) at each nprobe; one metrics row per nprobe."""
    qrels = data.qrels[split]
    qids = [q for q in data.queries if q in qrels]
    q_emb = query_encoder.encode([data.queries[q] for q in qids])
    ids = index.ids
    rows_out = []
    for nprobe in nprobes:
        _, rows = index.search_rows(q_emb, k, nprobe)
        ranked = [[ids[r] for r in row if r >= 0] for row in rows]
        rows_out.append({"nprobe": nprobe, **metrics(ranked, [qrels[q] for q in qids])})
    return rows_out
