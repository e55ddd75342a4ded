"""The guard: seeded hold-aside splits, best-epoch selection against the two-step start, and
validation scored through the search engine."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from index import TorchSearcher, build_ivfpq, exact_search
from model.evaluate import metrics
from model.guard import Guard, Validation, hold_aside, teacher_relevance


@pytest.mark.parametrize(
    ("n", "fraction", "low", "high", "n_val"),
    [
        (100, 0.15, 5, 500, 15),  # the fraction
        (100, 0.15, 20, 500, 20),  # raised to low
        (1000, 0.15, 20, 50, 50),  # cut to high
        (30, 0.15, 20, 500, 15),  # low would take 20 of 30: cut to half
        (7, 0.5, 1, 10, 3),  # half of an odd count rounds down
        (1, 0.5, 1, 10, 0),  # one item: nothing held aside
        (0, 0.5, 1, 10, 0),
    ],
)
def test_hold_aside_sizes(n, fraction, low, high, n_val):
    items = [f"q{i}" for i in range(n)]
    train, val = hold_aside(items, fraction, low, high, seed=0)
    assert len(val) == n_val and len(train) == n - n_val


def test_hold_aside_deterministic_disjoint_and_covering():
    items = [f"q{i}" for i in range(200)]
    train, val = hold_aside(items, 0.2, 10, 100, seed=7)
    assert (train, val) == hold_aside(items, 0.2, 10, 100, seed=7)
    assert hold_aside(items, 0.2, 10, 100, seed=8)[1] != val
    assert not set(train) & set(val)
    assert sorted(train + val) == sorted(items)
    # both parts keep the input's order
    assert train == [x for x in items if x in set(train)] and val == [x for x in items if x in set(val)]


def test_hold_aside_accepts_any_sequence():
    train, val = hold_aside(tuple(range(10)), 0.3, 1, 10, seed=0)
    assert len(val) == 3 and sorted(train + val) == list(range(10))


class Snap:
    """A snapshot callable that counts its calls."""

    def __init__(self, value):
        self.value, self.calls = value, 0

    def __call__(self):
        self.calls += 1
        return self.value


def _validation(n=4):
    return Validation([f"t{i}" for i in range(n)], [{"d": 1}] * n, "ndcg@10", nprobe=8)


def test_guard_keeps_the_best_and_stops_after_patience():
    g = Guard(_validation(), patience=2)
    g.start(0.5, "start")
    s1, s2, s3, s4 = Snap("e1"), Snap("e2"), Snap("e3"), Snap("e4")
    assert g.offer(1, 0.6, s1) is False
    assert g.best == "e1" and g.best_epoch == 1 and s1.calls == 1
    assert g.offer(2, 0.6, s2) is False  # a tie is no gain
    assert s2.calls == 0 and g.best == "e1" and g.since_best == 1
    assert g.offer(3, 0.55, s3) is True  # second epoch without gain: stop
    assert s3.calls == 0
    assert g.selected == "trained" and g.best_score == 0.6
    assert [c["epoch"] for c in g.curve] == [0, 1, 2, 3]
    assert g.offer(4, 0.7, s4) is False and g.since_best == 0 and s4.calls == 1  # a gain resets the count


def test_guard_patience_counts_from_the_last_gain():
    g = Guard(None, patience=3)
    g.start(0.1, "s")
    stops = [g.offer(e, score, Snap(e)) for e, score in enumerate([0.2, 0.1, 0.1, 0.3, 0.2, 0.2, 0.2], 1)]
    assert stops == [False, False, False, False, False, False, True]
    assert g.best_epoch == 4


def test_guard_ships_the_two_step_start_when_nothing_beats_it():
    v = _validation(5)
    g = Guard(v, patience=5)
    g.start(0.8, ("untrained", "two-step index"))
    for epoch, score in enumerate([0.7, 0.8, 0.75], 1):
        snap = Snap(f"e{epoch}")
        g.offer(epoch, score, snap)
        assert snap.calls == 0
    assert g.selected == "two-step" and g.best == ("untrained", "two-step index") and g.best_epoch == 0
    rec = g.record()
    assert rec == {
        "metric": "ndcg@10",
        "nprobe": 8,
        "queries": 5,
        "curve": [{"epoch": 0, "score": 0.8}, {"epoch": 1, "score": 0.7}, {"epoch": 2, "score": 0.8},
                  {"epoch": 3, "score": 0.75}],
        "selected": "two-step",
        "selected_epoch": 0,
        "start_score": 0.8,
        "best_score": 0.8,
    }  # fmt: skip
    msg = g.message("poeem")
    assert msg.startswith("poeem: no epoch beat the two-step start")
    assert "two-step" in msg and "start 0.8000" in msg and "best epoch 0.8000" in msg
    assert "ndcg@10 on 5 held-aside queries, nprobe 8" in msg


def test_guard_record_and_message_when_trained_wins():
    g = Guard(_validation(3), patience=2)
    g.start(0.25, "s")
    g.offer(1, 0.5, Snap("e1"))
    rec = g.record()
    assert rec["selected"] == "trained" and rec["selected_epoch"] == 1
    assert rec["start_score"] == 0.25 and rec["best_score"] == 0.5 and rec["queries"] == 3
    assert g.message("jpq") == (
        "jpq: shipping epoch 1 (ndcg@10 on 3 held-aside queries, nprobe 8: 0.5000 vs two-step start 0.2500)"
    )


def test_guard_off_records_nothing():
    g = Guard(None, patience=3)
    rec = g.record()
    assert rec["metric"] is None and rec["queries"] == 0 and rec["curve"] == [] and rec["start_score"] is None
    assert "guard off" in g.message("distill")


@pytest.fixture(scope="module")
def tiny_index():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((300, 16)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    ids = [f"doc{i}" for i in range(300)]
    index = build_ivfpq(x, nlist=4, M=4, nbits=8, metric="ip", ids=ids, seed=0, niter=5)
    q = rng.standard_normal((12, 16)).astype(np.float32)
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    return x, ids, index, torch.from_numpy(q)


class FixedEncoder:
    """Maps each known text to a fixed vector."""

    def __init__(self, texts, vectors):
        self.row = {t: i for i, t in enumerate(texts)}
        self.vectors = vectors
        self.seen = []

    def encode(self, texts):
        self.seen.append(list(texts))
        return self.vectors[[self.row[t] for t in texts]]


def test_validation_scores_through_the_search_engine(tiny_index):
    x, ids, index, q = tiny_index
    texts = [f"query {i}" for i in range(len(q))]
    _, exact_rows = exact_search(q, x, 10, "ip", device="cpu")
    relevant = teacher_relevance(exact_rows, ids)
    assert all(len(r) == 10 for r in relevant)
    enc = FixedEncoder(texts, q)
    v = Validation(texts, relevant, "recall@10", nprobe=99)  # clamped to the 4 cells
    got = v.score(enc, index)
    _, rows = TorchSearcher(index, "cpu").search_rows(q, 100, 4)
    ranked = [[str(index.ids[r]) for r in row if r >= 0] for row in rows]  # rows are in the index's (cell) order
    expected = metrics(ranked, relevant)["recall@10"]
    assert got == pytest.approx(expected)
    assert 0.3 < got < 1.0  # PQ at 4 bytes finds most, not all, of the exact top-10
    assert enc.seen == [texts]


def test_validation_against_the_index_own_ranking_is_perfect(tiny_index):
    *_, index, q = tiny_index
    ids = [str(i) for i in index.ids]
    texts = [f"query {i}" for i in range(len(q))]
    _, rows = TorchSearcher(index, "cpu").search_rows(q, 10, 1)
    assert (rows >= 0).all()
    relevant = [{ids[r]: 1 for r in row} for row in rows]
    enc = FixedEncoder(texts, q)
    assert Validation(texts, relevant, "ndcg@10", nprobe=1).score(enc, index) == pytest.approx(1.0)
    assert Validation(texts, relevant, "recall@10", nprobe=1).score(enc, index) == pytest.approx(1.0)
    # the one item each query ranks last in its top-10, alone relevant: found at rank 10
    last = [{ids[row[9]]: 1} for row in rows]
    assert Validation(texts, last, "mrr@10", nprobe=1).score(enc, index) == pytest.approx(0.1)
    assert Validation(texts, last, "ndcg@10", nprobe=1).score(enc, index) == pytest.approx(1 / math.log2(11))


def test_validation_with_no_queries_scores_zero(tiny_index):
    *_, index, _ = tiny_index
    assert Validation([], [], "ndcg@10", nprobe=4).score(None, index) == 0.0


def test_teacher_relevance():
    rows = np.array([[2, 0, 1], [1, -1, -1]])
    ids = ["a", "b", "c"]
    assert teacher_relevance(rows, ids, k=2) == [{"c": 1, "a": 1}, {"b": 1}]
    assert teacher_relevance(rows, ids) == [{"c": 1, "a": 1, "b": 1}, {"b": 1}]
    assert teacher_relevance([[0, 1]], ids, k=1) == [{"a": 1}]
