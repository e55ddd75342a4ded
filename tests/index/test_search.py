"""The torch engine: ADC scores are exact inner products / distances to the decoded items, both
strategies agree, the engine returns exactly what a brute-force numpy search over the probed cells
returns, and edge cases (few hits, bad input) behave as documented."""

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


def _decode_numpy(index) -> np.ndarray:
    """(n, d) float64 x_hat of every row, decoded from the raw code bytes in numpy rather than with
    the index's own helpers: x_hat = (C[cell] + concat_m P[m, code_m]) R, 4-bit codes low nibble first."""
    codes = index.codes.numpy()
    if index.nbits == 4:
        codes = np.stack([codes & 0x0F, codes >> 4], axis=2).reshape(len(codes), -1)
    cells = np.repeat(np.arange(index.nlist), np.diff(index.offsets.numpy()))
    parts = index.codebooks.double().numpy()[np.arange(index.M), codes.astype(np.int64)]  # (n, M, dsub)
    xr = index.centroids.double().numpy()[cells] + parts.reshape(len(codes), -1)
    return xr @ index.rotation.double().numpy()


def _probed_cells(index, queries, nprobe) -> np.ndarray:
    """(B, nprobe) cells whose centroid (in the original space) is best for each query: highest
    inner product for ip, nearest for l2."""
    q = np.asarray(queries, np.float64)
    c = index.centroids.double().numpy() @ index.rotation.double().numpy()
    coarse = -(q @ c.T) if index.metric == "ip" else ((q[:, None] - c[None]) ** 2).sum(-1)  # lower is better
    return np.argsort(coarse, axis=1, kind="stable")[:, : min(nprobe, index.nlist)]


def _brute_force(index, queries, k, nprobe):
    """Exhaustive numpy search over the items of the `nprobe` cells whose centroid is best for each
    query (highest inner product for ip, nearest for l2). Returns scores (B, k) and rows (B, k),
    best first, padded with row -1 and score -inf (ip) / +inf (l2), and every item's score (B, n)
    (NaN outside the probed cells)."""
    q = np.asarray(queries, np.float64)
    ip = index.metric == "ip"
    x = _decode_numpy(index)
    cells = np.repeat(np.arange(index.nlist), np.diff(index.offsets.numpy()))
    probe = _probed_cells(index, q, nprobe)
    every = q @ x.T if ip else ((q[:, None] - x[None]) ** 2).sum(-1)
    every[~(cells[None, None, :] == probe[:, :, None]).any(1)] = np.nan  # (B, n): not in a probed cell
    scores = np.full((len(q), k), -np.inf if ip else np.inf)
    rows = np.full((len(q), k), -1, np.int64)
    for b in range(len(q)):
        cand = np.flatnonzero(~np.isnan(every[b]))
        best = cand[np.argsort(-every[b, cand] if ip else every[b, cand], kind="stable")[:k]]
        scores[b, : len(best)], rows[b, : len(best)] = every[b, best], best
    return scores, rows, every


def _assert_matches_brute_force(index, queries, scores, rows, k, nprobe):
    """The engine's (scores, rows) are the brute-force top-k: same hit count and padding, same
    scores, same rows except where two items tie exactly at the k-th score."""
    ref_s, ref_r, every = _brute_force(index, queries, k, nprobe)
    valid = ref_r >= 0
    np.testing.assert_array_equal(rows >= 0, valid)  # as many hits as the probed cells hold, up to k
    np.testing.assert_array_equal(rows[~valid], -1)
    np.testing.assert_array_equal(scores[~valid], ref_s[~valid])  # -inf (ip) / +inf (l2) padding
    tol = 1e-5 * max(1.0, np.abs(ref_s[valid]).max(initial=0.0))
    np.testing.assert_allclose(scores[valid], ref_s[valid], rtol=0, atol=tol)
    for b in range(len(queries)):
        got, want = set(rows[b][valid[b]].tolist()), set(ref_r[b][valid[b]].tolist())
        assert len(got) == int(valid[b].sum()), f"query {b}: a row returned twice"
        if got != want:
            kth = ref_s[b, int(valid[b].sum()) - 1]
            for r in got ^ want:  # NaN (an unprobed item) fails this too
                assert abs(every[b, r] - kth) <= tol, (b, r, every[b, r], kth)
    return ref_s, ref_r


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
    # best first (whether they are the right items is test_search_equals_brute_force_over_probed_cells)
    order = np.diff(scores, axis=1)
    assert (order <= 1e-5).all() if metric == "ip" else (order >= -1e-5).all()


@pytest.mark.parametrize("strategy", ["cells", "pairs"])
@pytest.mark.parametrize("metric", ["ip", "l2"])
@pytest.mark.parametrize("nbits", [8, 4])
@pytest.mark.parametrize("opq", [False, True])
@pytest.mark.parametrize("nprobe", [1, 3, 16])  # 16 = every cell: the exhaustive search over x_hat
def test_search_equals_brute_force_over_probed_cells(small_data, small_indexes, strategy, metric, nbits, opq, nprobe):
    """Decode every item in numpy, score query . x_hat (ip) or ||query - x_hat||^2 (l2) over the
    items of the probed cells, take the top-k: the engine must return those ids and scores."""
    _, xq = small_data
    index = small_indexes[metric, nbits, opq]
    assert index.nlist == 16
    k = 10
    scores, rows = TorchSearcher(index, "cpu", strategy).search_rows(xq, k=k, nprobe=nprobe)
    ref_s, _ = _assert_matches_brute_force(index, xq, scores, rows, k, nprobe)
    assert (rows >= 0).all()  # every probed cell set here holds more than k items
    if nprobe == index.nlist:  # and probing every cell is the exhaustive search over all n items
        x = _decode_numpy(index)
        full = xq.astype(np.float64) @ x.T if metric == "ip" else ((xq[:, None] - x[None]) ** 2).sum(-1)
        best = -np.sort(-full, axis=1)[:, :k] if metric == "ip" else np.sort(full, axis=1)[:, :k]
        np.testing.assert_allclose(ref_s, best, rtol=1e-12)


@pytest.mark.parametrize("strategy", ["cells", "pairs"])
def test_brute_force_reference_catches_a_wrong_answer(small_data, small_indexes, strategy):
    """The comparison above can fail: a result with one hit replaced by the next-best item is refused."""
    _, xq = small_data
    index = small_indexes["ip", 8, False]
    scores, rows = TorchSearcher(index, "cpu", strategy).search_rows(xq[:3], k=10, nprobe=3)
    _, ref_r, _ = _brute_force(index, xq[:3], 11, 3)
    bad = rows.copy()
    bad[0, 0] = ref_r[0, 10]  # the 11th best instead of the best: score no longer matches, nor the set
    with pytest.raises(AssertionError):
        _assert_matches_brute_force(index, xq[:3], scores, bad, 10, 3)
    fewer = rows.copy()
    fewer[1, -1] = -1  # a dropped hit
    with pytest.raises(AssertionError):
        _assert_matches_brute_force(index, xq[:3], scores, fewer, 10, 3)


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
    expected = sizes.numpy()[_probed_cells(index, xq[:5], 1)[:, 0]]  # every item of the one probed cell
    assert ((expected > 0) & (expected < k)).all()
    np.testing.assert_array_equal((rows >= 0).sum(1), expected)
    _assert_matches_brute_force(index, xq[:5], scores, rows, k, 1)  # and they come first, then -1 / +inf
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


@pytest.mark.parametrize("strategy", ["cells", "pairs"])
def test_empty_and_small_cells_give_exactly_their_items(small_data, strategy):
    """Nine of 16 cells empty and the others holding 1-6 items: each query gets exactly the items
    of its 3 probed cells (up to k), best first, then row -1 / score -inf padding."""
    import dataclasses

    from index import build_ivfpq

    xb, xq = small_data
    index = build_ivfpq(xb[:400], nlist=16, M=8, nbits=4, metric="ip", niter=5)
    sizes = np.array([0, 3, 0, 4, 0, 0, 6, 0, 2, 0, 0, 0, 1, 0, 5, 0])
    n = int(sizes.sum())
    offsets = torch.from_numpy(np.concatenate([[0], np.cumsum(sizes)]))
    skew = dataclasses.replace(index, codes=index.codes[:n], offsets=offsets, ids=index.ids[:n])
    skew.check()
    k = 10
    scores, rows = TorchSearcher(skew, "cpu", strategy).search_rows(xq, k, 3)
    expected = np.minimum(k, sizes[_probed_cells(skew, xq, 3)].sum(1))
    assert (expected == 0).any() and ((expected > 0) & (expected < k)).any() and (expected == k).any()
    np.testing.assert_array_equal((rows >= 0).sum(1), expected)
    _assert_matches_brute_force(skew, xq, scores, rows, k, 3)


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
