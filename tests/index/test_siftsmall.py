"""Real data: siftsmall (10k SIFT vectors, official ground truth). Exact search reproduces the
ground truth; our two-step IVF-PQ matches a Faiss IndexIVFPQ of the same shape on recall."""

from __future__ import annotations

import numpy as np
import pytest

from index import build_ivfpq, exact_search, make_searcher
from tests.conftest import recall

faiss = pytest.importorskip("faiss")
NLIST, M = 64, 16


def test_exact_search_reproduces_the_official_ground_truth(siftsmall):
    xb, xq, gt = siftsmall
    _, rows = exact_search(xq, xb, 100, "l2", device="cpu")
    assert recall(rows, gt) == 1.0


@pytest.fixture(scope="module")
def ours_and_faiss(siftsmall):
    xb, _, _ = siftsmall
    ours = build_ivfpq(xb, nlist=NLIST, M=M, nbits=8, metric="l2", seed=0)
    ref = faiss.IndexIVFPQ(faiss.IndexFlatL2(xb.shape[1]), xb.shape[1], NLIST, M, 8)
    ref.cp.seed = ref.pq.cp.seed = 1234
    ref.train(xb)
    ref.add(xb)
    return ours, ref


@pytest.mark.parametrize("nprobe", [1, 4, 16, NLIST])
@pytest.mark.slow  # the module's `ours_and_faiss` builds two indexes of 10k SIFT vectors
def test_two_step_ivfpq_recall_matches_faiss(siftsmall, ours_and_faiss, nprobe):
    _, xq, gt = siftsmall
    ours, ref = ours_and_faiss
    _, rows = make_searcher(ours, "cpu", "torch").search_rows(xq, 100, nprobe)
    ours_ids = np.where(rows >= 0, ours.ids[rows.clip(0)].astype(np.int64), -1)
    _, ref_ids = ref.search(xq, 100, params=faiss.SearchParametersIVF(nprobe=nprobe))
    r_ours, r_ref = recall(ours_ids, gt), recall(ref_ids, gt)
    assert r_ours > 0.3  # a real index, not an empty one
    assert abs(r_ours - r_ref) <= 0.02, f"nprobe={nprobe}: ours {r_ours:.3f} vs faiss {r_ref:.3f}"


@pytest.mark.slow  # the module's `ours_and_faiss` builds two indexes of 10k SIFT vectors
def test_torch_and_faiss_backends_agree_on_the_same_artifact(siftsmall, ours_and_faiss):
    _, xq, _ = siftsmall
    ours, _ = ours_and_faiss
    for nprobe in (1, 8, NLIST):
        _, a = make_searcher(ours, "cpu", "torch").search_rows(xq, 10, nprobe)
        _, b = make_searcher(ours, "cpu", "faiss").search_rows(xq, 10, nprobe)
        overlap = np.mean([len(set(x) & set(y)) / 10 for x, y in zip(a, b, strict=True)])
        assert overlap >= 0.99, f"nprobe={nprobe}: overlap {overlap:.3f}"
