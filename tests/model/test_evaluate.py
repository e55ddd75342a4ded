"""model/evaluate.py `metrics` against values worked out by hand on small rankings (edge cases
included) and, for nDCG@10, against scikit-learn's independent implementation."""

from __future__ import annotations

import math

import numpy as np
import pytest

from model.evaluate import metrics

KEYS = {"recall@10", "recall@100", "ndcg@10", "mrr@10"}
ZERO = dict.fromkeys(KEYS, 0.0)


def one(ranked: list[str], rel: dict[str, int]) -> dict[str, float]:
    out = metrics([ranked], [rel])
    assert set(out) == KEYS
    return out


def test_single_relevant_at_rank_2():
    # DCG = 1 / log2(3), ideal 1 / log2(2) = 1; first hit at rank 2
    m = one(["a", "b", "c"], {"b": 1})
    assert m == pytest.approx({"recall@10": 1.0, "recall@100": 1.0, "ndcg@10": 0.6309297535714575, "mrr@10": 0.5})


def test_no_relevant_item_retrieved():
    assert one(["x", "y", "z"], {"a": 1, "b": 1}) == ZERO


def test_graded_relevance_gains_are_the_qrel_scores():
    # ranked d1 (1), d2 (judged 0), d3 (2); d4 (3) not retrieved
    # DCG = 1/log2(2) + 0 + 2/log2(4) = 2;  ideal = 3/log2(2) + 2/log2(3) + 1/log2(4) = 4.7618595
    m = one(["d1", "d2", "d3"], {"d1": 1, "d2": 0, "d3": 2, "d4": 3})
    assert m["ndcg@10"] == pytest.approx(0.42000399150792816, abs=1e-12)
    assert m["recall@10"] == pytest.approx(2 / 3)  # relevant = score > 0: d1, d3, d4
    assert m["mrr@10"] == 1.0


def test_fewer_than_k_results():
    # one result for two relevant docs: DCG 1, ideal 1 + 1/log2(3)
    m = one(["a"], {"a": 1, "b": 1})
    assert m == pytest.approx({"recall@10": 0.5, "recall@100": 0.5, "ndcg@10": 0.6131471927654584, "mrr@10": 1.0})
    assert one([], {"a": 1}) == ZERO


def test_cutoffs_are_ranks_10_and_100():
    ranked = [f"n{i}" for i in range(150)]
    ranked[10] = "r1"  # rank 11: outside every @10 metric, inside recall@100
    ranked[99] = "r2"  # rank 100: the last counted by recall@100
    ranked[100] = "r3"  # rank 101: counted nowhere
    m = one(ranked, {"r1": 1, "r2": 1, "r3": 1})
    assert m == {"recall@10": 0.0, "recall@100": pytest.approx(2 / 3), "ndcg@10": 0.0, "mrr@10": 0.0}
    ranked[9] = "r1"  # now rank 10: every @10 metric sees it
    m = one(ranked, {"r1": 1, "r2": 1, "r3": 1})
    ideal = 1 + 1 / math.log2(3) + 1 / math.log2(4)
    assert m == pytest.approx(
        {"recall@10": 1 / 3, "recall@100": 2 / 3, "ndcg@10": (1 / math.log2(11)) / ideal, "mrr@10": 0.1}
    )


def test_duplicate_ids_count_once():
    # a repeated id is worth nothing the second time: nDCG stays <= 1, recall <= 1
    m = one(["a", "a", "b"], {"a": 1})
    assert m == {"recall@10": 1.0, "recall@100": 1.0, "ndcg@10": 1.0, "mrr@10": 1.0}
    # and it keeps its slot: b stays at rank 3
    m = one(["a", "a", "b"], {"a": 1, "b": 1})
    assert m["ndcg@10"] == pytest.approx((1 + 1 / math.log2(4)) / (1 + 1 / math.log2(3)), abs=1e-12)
    assert one(["x", "b", "b", "b"], {"b": 2})["ndcg@10"] == pytest.approx(1 / math.log2(3), abs=1e-12)


def test_means_over_judged_queries_only():
    # the second query has no positive (only a 0 judgement): it is left out of every mean, not
    # counted as a zero
    a = (["a", "b"], {"b": 1})
    b = (["c", "d"], {"c": 1})
    unjudged = (["a"], {"z": 0})
    both = metrics([a[0], b[0]], [a[1], b[1]])
    assert both == pytest.approx({"recall@10": 1.0, "recall@100": 1.0, "ndcg@10": (0.6309297535714575 + 1) / 2,
                                  "mrr@10": 0.75})  # fmt: skip
    assert metrics([a[0], unjudged[0], b[0]], [a[1], unjudged[1], b[1]]) == both
    assert metrics([], []) == ZERO  # no judged query: zeros, not NaN
    with pytest.raises(ValueError, match="zip"):  # one ranking per qrels entry, or refused
        metrics([a[0]], [a[1], b[1]])


def test_ndcg_matches_scikit_learn_on_random_graded_rankings():
    """sklearn.metrics.ndcg_score with the same definition: linear gains, log2(rank + 1) discount,
    the ideal from every judged document. sklearn takes the ideal from the items it is given, so
    each query passes its ranking (padded with unjudged ids to 10) plus the judged documents it
    missed, those scored below every retrieved one; distinct scores, so no tie averaging."""
    sklearn_metrics = pytest.importorskip("sklearn.metrics", reason="scikit-learn not installed")
    rng = np.random.default_rng(0)
    ranked, relevant, expected = [], [], []
    for _ in range(200):
        pool = [f"d{i}" for i in range(40)]
        judged = rng.choice(40, size=rng.integers(1, 8), replace=False)
        rel = {pool[j]: int(rng.integers(0, 4)) for j in judged}
        if not any(s > 0 for s in rel.values()):
            rel[pool[int(judged[0])]] = 1
        ids = [pool[j] for j in rng.permutation(40)[: rng.integers(0, 25)]]
        ranked.append(ids)
        relevant.append(rel)
        items = ids + [f"pad{i}" for i in range(10 - len(ids))]
        items += [d for d in rel if d not in items]
        y_true = np.array([[rel.get(d, 0) for d in items]], dtype=float)
        y_score = np.array([[len(items) - i for i in range(len(items))]], dtype=float)
        expected.append(sklearn_metrics.ndcg_score(y_true, y_score, k=10))
        assert metrics([ids], [rel])["ndcg@10"] == pytest.approx(expected[-1], abs=1e-12)
    assert metrics(ranked, relevant)["ndcg@10"] == pytest.approx(float(np.mean(expected)), abs=1e-12)
    assert 0.1 < float(np.mean(expected)) < 0.9  # a mix of hits and misses, not a degenerate sample
