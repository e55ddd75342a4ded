"""The torch engine: ADC scores are exact inner products / distances to the decoded items, both
strategies agree, and edge cases (few hits, bad input) behave as documented."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from index import DimensionMismatch, SearchError, TorchSearcher, make_searcher


def _reference(index, queries, rows):
    """Score of each (query, row) from the decoded vectors, in the original space."""
    x = index.decode(torch.as_tensor(rows.ravel().clip(min=0))).numpy().reshape(*rows.shape, -1)
    q = queries[:, None, :]
    if index.metric == "ip":
        return (q * x).sum(-1)
    return ((q - x) ** 2).sum(-1)


@pytest.mark.parametrize("strategy", ["cells", "pairs"])
@pytest.mark.parametrize("metric", ["ip", "l2"])
@pytest.mark.parametrize("nbits", [8, 4])
@pytest.mark.parametrize("opq", [False, True])
def test_adc_scores_equal_scores_of_decoded_items(small_data, small_indexes, strategy, metric, nbits, opq):
    _, xq = small_data
    index = small_indexes[metric, nbits, opq]
    scores, rows = TorchSearcher(index, "cpu", strategy).search_rows(xq, k=20, nprobe=4)
    assert (rows >= 0).all()
    ref = _reference(index, xq, rows)
    np.testing.assert_allclose(scores, ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())
    # best first, and the top-k of everything probed: brute force over the probed cells agrees
    order = np.diff(scores, axis=1)
    assert (order <= 1e-5).all() if metric == "ip" else (order >= -1e-5).all()


@pytest.mark.parametrize("metric", ["ip", "l2"])
def test_search_over_all_cells_matches_brute_force_over_decoded_items(small_data, small_indexes, metric):
    _, xq = small_data
    index = small_indexes[metric, 8, True]
    scores, _ = TorchSearcher(index, "cpu").search_rows(xq, k=10, nprobe=index.nlist)
    x = index.decode().numpy()
    full = xq @ x.T if metric == "ip" else ((xq[:, None] - x[None]) ** 2).sum(-1)
    best = np.sort(full, axis=1)[:, ::-1][:, :10] if metric == "ip" else np.sort(full, axis=1)[:, :10]
    np.testing.assert_allclose(scores, best, rtol=1e-4, atol=1e-3)


def test_strategies_return_the_same_rows(small_data, small_indexes):
    _, xq = small_data
    index = small_indexes["ip", 8, False]
    a = TorchSearcher(index, "cpu", "cells").search_rows(xq, 15, 5)
    b = TorchSearcher(index, "cpu", "pairs").search_rows(xq, 15, 5)
    np.testing.assert_allclose(a[0], b[0], rtol=1e-5)
    assert (a[1] == b[1]).mean() > 0.99  # ties may swap places


@pytest.mark.parametrize("strategy", ["cells", "pairs"])
def test_k_beyond_probed_items_returns_fewer_hits(small_data, small_indexes, strategy):
    _, xq = small_data
    index = small_indexes["l2", 8, False]
    sizes = index.list_sizes()
    k = int(sizes.max()) + 50  # one cell never holds this many
    scores, rows = TorchSearcher(index, "cpu", strategy).search_rows(xq[:5], k=k, nprobe=1)
    for s, r in zip(scores, rows, strict=True):
        hits = int((r >= 0).sum())
        assert 0 < hits < k
        assert (r[hits:] == -1).all() and np.isinf(s[hits:]).all() and np.isfinite(s[:hits]).all()
    searcher = make_searcher(index, "cpu", "torch")
    from index.loader import Index

    idx = Index(path=None, manifest=None, data=index, searcher=searcher)
    s_list, id_list = idx.search(xq[:5], k=k, nprobe=1)
    for s, ids, r in zip(s_list, id_list, rows, strict=True):
        assert len(ids) == len(s) == int((r >= 0).sum())
        assert all(i.startswith("doc-") for i in ids)


def test_nprobe_larger_than_nlist_is_clamped(small_data, small_indexes):
    _, xq = small_data
    index = small_indexes["ip", 8, False]
    s = TorchSearcher(index, "cpu")
    a = s.search_rows(xq, 10, index.nlist)
    b = s.search_rows(xq, 10, 10 * index.nlist)
    np.testing.assert_array_equal(a[1], b[1])


def test_one_dimensional_query_is_one_query(small_data, small_indexes):
    _, xq = small_data
    s = TorchSearcher(small_indexes["ip", 8, False], "cpu")
    a = s.search_rows(xq[0], 5, 4)
    b = s.search_rows(xq[:1], 5, 4)
    np.testing.assert_array_equal(a[1], b[1])


@pytest.mark.parametrize(
    ("queries", "k", "nprobe", "error", "message"),
    [
        (np.zeros((2, 7), np.float32), 5, 4, DimensionMismatch, "queries have 7 dims, index expects 32"),
        (np.full((1, 32), np.nan, np.float32), 5, 4, SearchError, "NaN or infinite"),
        (np.zeros((1, 32), np.float32), 0, 4, SearchError, "k must be a positive integer"),
        (np.zeros((1, 32), np.float32), 5, 0, SearchError, "nprobe must be a positive integer"),
        (np.zeros((1, 32), np.float32), 2.5, 4, SearchError, "k must be a positive integer"),
        (np.array([["a"] * 32]), 5, 4, SearchError, "real numbers"),
        (np.zeros((1, 2, 32), np.float32), 5, 4, SearchError, "must be (B, d)"),
    ],
)
def test_bad_search_arguments_are_refused_with_a_clear_message(small_indexes, queries, k, nprobe, error, message):
    for backend in ("torch", "faiss"):
        searcher = make_searcher(small_indexes["ip", 8, False], "cpu", backend)
        with pytest.raises(error, match=message.replace("(", r"\(").replace(")", r"\)")):
            searcher.search_rows(queries, k, nprobe)


def test_torch_tensor_queries_are_accepted(small_data, small_indexes):
    _, xq = small_data
    s = TorchSearcher(small_indexes["ip", 8, False], "cpu")
    a = s.search_rows(torch.from_numpy(xq), 5, 4)
    b = s.search_rows(xq.astype(np.float64), 5, 4)
    np.testing.assert_array_equal(a[1], b[1])


def test_empty_cells_are_skipped(small_data):
    from index import build_ivfpq

    xb, xq = small_data
    index = build_ivfpq(xb[:400], nlist=16, M=8, nbits=4, metric="ip", niter=5)
    # force most cells empty by re-pointing all offsets to one cell
    import dataclasses

    offsets = torch.zeros_like(index.offsets)
    offsets[5:] = index.n
    skew = dataclasses.replace(index, offsets=offsets)
    for strategy in ("cells", "pairs"):
        _, rows = TorchSearcher(skew, "cpu", strategy).search_rows(xq, 10, 3)
        assert ((rows >= 0).sum(1) <= 10).all()


def test_cells_split_across_threads_match_pairs(small_data):
    """Many probed cells: `cells` fans them out to a thread pool; results must not change."""
    from index import build_ivfpq

    xb, xq = small_data
    index = build_ivfpq(xb, nlist=128, M=8, nbits=8, metric="l2", niter=5)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        a = TorchSearcher(index, "cpu", "cells").search_rows(xq, 10, 64)
    finally:
        torch.set_num_threads(before)
    b = TorchSearcher(index, "cpu", "pairs").search_rows(xq, 10, 64)
    np.testing.assert_allclose(a[0], b[0], rtol=1e-5, atol=1e-4)
    assert (a[1] == b[1]).mean() > 0.99


def test_queries_whose_probed_cells_are_all_empty_get_no_hits(small_data, small_indexes):
    import dataclasses

    _, xq = small_data
    index = small_indexes["ip", 8, False]
    offsets = torch.full_like(index.offsets, index.n)
    offsets[0] = 0
    offsets[1] = index.n  # everything in cell 0; probe only the others
    skew = dataclasses.replace(index, offsets=offsets)
    searcher = TorchSearcher(skew, "cpu")
    rank = torch.from_numpy(xq) @ skew.centroids.T
    far = [q for q in range(len(xq)) if int(rank[q].argmax()) != 0]
    scores, rows = searcher.search_rows(xq[far], 5, 1)
    assert (rows == -1).all() and np.isneginf(scores).all()
