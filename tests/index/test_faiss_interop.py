"""Faiss interop: our index exported to Faiss searches the same; a Faiss-built index imported
into our format searches the same in our torch engine."""

from __future__ import annotations

import numpy as np
import pytest

from index import TorchSearcher
from index.faiss_interop import from_faiss, to_faiss

faiss = pytest.importorskip("faiss")


def _overlap(a, b, k):
    return np.mean([len(set(x[:k]) & set(y[:k])) / k for x, y in zip(a, b, strict=True)])


@pytest.mark.parametrize("metric", ["ip", "l2"])
@pytest.mark.parametrize("nbits", [8, 4])
def test_exported_index_searches_like_ours(small_data, small_indexes, metric, nbits):
    _, xq = small_data
    index = small_indexes[metric, nbits, True]  # with an OPQ rotation: exported as IndexPreTransform
    f = to_faiss(index)
    assert isinstance(faiss.downcast_index(f), faiss.IndexPreTransform)
    D, I = f.search(xq, 10, params=faiss.SearchParametersPreTransform(index_params=faiss.SearchParametersIVF(nprobe=4)))  # noqa: E741
    s, r = TorchSearcher(index, "cpu").search_rows(xq, 10, 4)
    assert _overlap(I, r, 10) >= 0.99
    np.testing.assert_allclose(D, s, rtol=1e-4, atol=1e-3)


def test_fast_scan_export_serves_4bit_codes(small_data, small_indexes):
    _, xq = small_data
    index = small_indexes["ip", 4, False]
    f = to_faiss(index, fast_scan=True)
    assert isinstance(f, faiss.IndexIVFPQFastScan)
    _, I = f.search(xq, 10, params=faiss.SearchParametersIVF(nprobe=4))  # noqa: E741
    _, r = TorchSearcher(index, "cpu").search_rows(xq, 10, 4)
    assert _overlap(I, r, 10) >= 0.9  # fast-scan rounds its tables to 8 bits: near, not equal
    with pytest.raises(ValueError, match="4-bit codes only"):
        to_faiss(small_indexes["ip", 8, False], fast_scan=True)


@pytest.mark.parametrize(
    "spec",
    ["IVF16,PQ8", pytest.param("OPQ8,IVF16,PQ8", marks=pytest.mark.slow), "IVF16,PQ16x4"],  # OPQ: ~3 s
)
@pytest.mark.parametrize("metric", [faiss.METRIC_INNER_PRODUCT, faiss.METRIC_L2])
def test_faiss_index_imports_and_searches_the_same(small_data, spec, metric):
    xb, xq = small_data
    ref = faiss.index_factory(xb.shape[1], spec, metric)
    ivf = faiss.downcast_index(faiss.extract_index_ivf(ref))
    ivf.do_polysemous_training = False  # slow and irrelevant to ADC search
    ref.train(xb)
    ref.add_with_ids(xb, np.arange(len(xb), dtype=np.int64) * 7) if "OPQ" not in spec else ref.add(xb)
    params = faiss.SearchParametersIVF(nprobe=4)
    if "OPQ" in spec:
        params = faiss.SearchParametersPreTransform(index_params=params)
    D, I = ref.search(xq, 10, params=params)  # noqa: E741
    ours = from_faiss(ref)
    s, r = TorchSearcher(ours, "cpu").search_rows(xq, 10, 4)
    got = ours.ids[r].astype(np.int64)
    assert _overlap(I, got, 10) >= 0.99
    np.testing.assert_allclose(D, s, rtol=1e-4, atol=1e-3)


def test_unsupported_faiss_index_is_refused():
    with pytest.raises(ValueError, match="expected an IndexIVFPQ, got IndexFlat"):
        from_faiss(faiss.IndexFlatL2(8))
