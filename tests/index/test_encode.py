"""The one encode / decode path (`index.encode.Quantizer`): it gives exactly the cells and codes
the two-step builder and the trainable layer store, decodes like `IVFPQ.decode`, reports the
distortion ||R x - x_hat'||^2, and does not depend on how the rows are chunked."""

from __future__ import annotations

import functools
from collections.abc import Callable

import numpy as np
import pytest
import torch

from index import IVFPQ, build_ivfpq
from index.encode import Quantizer
from index.ivfpq import pack_codes, unpack_codes
from model.layer import IndexingLayer
from tests.conftest import clustered

# (metric, nbits, opq): OPQ only for 4-bit, where it trains in well under a second
CASES = [("ip", 8, False), ("l2", 8, False), ("ip", 4, True), ("l2", 4, True)]
N, D, M, NLIST = 1200, 16, 8, 16


@pytest.fixture(scope="module")
def data() -> np.ndarray:
    return clustered(N, D, seed=4)


@pytest.fixture(scope="module")
def built(data: np.ndarray) -> Callable[[str, int, bool], IVFPQ]:
    """(metric, nbits, opq) -> build_ivfpq over `data` with ids v0.., each built once."""

    @functools.cache
    def build(metric: str, nbits: int, opq: bool) -> IVFPQ:
        ids = [f"v{i}" for i in range(N)]
        return build_ivfpq(data, nlist=NLIST, M=M, nbits=nbits, metric=metric, opq=opq, niter=8, seed=1, ids=ids)

    return build


def _rows_of(index: IVFPQ, ids: list[str]) -> torch.Tensor:
    """Row of each id in `index` (ids in the caller's order)."""
    row = {str(i): r for r, i in enumerate(index.ids)}
    return torch.tensor([row[i] for i in ids], dtype=torch.int64)


def _assert_stored_as_encoded(index: IVFPQ, ids: list[str], cells: torch.Tensor, codes: torch.Tensor) -> None:
    """`index` holds, for each id, exactly the given cell and (unpacked) codes, and its packed
    code bytes are `pack_codes` of them."""
    rows = _rows_of(index, ids)
    assert cells.dtype == torch.int64 and codes.dtype == torch.uint8 and codes.shape == (len(ids), index.M)
    assert torch.equal(index.cells()[rows], cells)
    assert torch.equal(index.unpacked_codes(rows), codes)
    assert torch.equal(index.codes[rows], pack_codes(codes, index.nbits))


@pytest.mark.parametrize(("metric", "nbits", "opq"), CASES)
def test_encode_gives_the_cells_and_codes_the_builder_stored(built, data, metric, nbits, opq) -> None:
    """Quantizer.of(index).encode(x) == what build_ivfpq stored for x, bit for bit, per id."""
    index = built(metric, nbits, opq)
    assert torch.equal(index.rotation, torch.eye(D)) != opq
    q = Quantizer.of(index)
    cells, codes = q.encode(torch.from_numpy(data))
    _assert_stored_as_encoded(index, [f"v{i}" for i in range(N)], cells, codes)
    assert int(codes.max()) < (1 << nbits)
    assert len(torch.unique(cells)) > NLIST // 2  # a real spread over cells, not a degenerate case
    if nbits == 4:
        assert torch.equal(unpack_codes(pack_codes(codes, 4), 4), codes)
        assert index.codes.shape[1] == M // 2


@pytest.mark.parametrize(("metric", "nbits", "opq"), CASES)
def test_decode_equals_ivfpq_decode(built, data, metric, nbits, opq) -> None:
    """Quantizer.decode(cells, codes) of an item == IVFPQ.decode of its row (rotated space too)."""
    index = built(metric, nbits, opq)
    q = Quantizer.of(index)
    ids = [f"v{i}" for i in range(0, N, 3)]
    rows = _rows_of(index, ids)
    cells, codes = index.cells()[rows], index.unpacked_codes(rows)
    assert torch.equal(q.decode_rotated(cells, codes), index.decode(rows, rotated=True))
    torch.testing.assert_close(q.decode(cells, codes), index.decode(rows), rtol=1e-6, atol=1e-6)
    # and x_hat is near x: the decode is of the right item, not just self-consistent
    x = torch.from_numpy(data[::3])
    err = ((q.decode(cells, codes) - x) ** 2).sum(1)
    assert float(err.mean()) < 0.5 * float((x**2).sum(1).mean())


@pytest.mark.parametrize(("metric", "nbits", "opq"), CASES)
def test_distortion_is_the_squared_error_computed_by_hand(built, data, metric, nbits, opq) -> None:
    """distortion(x) == ||R x - (C[cell] + concat_m P[m, code_m])||^2, in float64 numpy from
    the index's own stored cells and code bytes."""
    index = built(metric, nbits, opq)
    q = Quantizer.of(index)
    got = q.distortion(torch.from_numpy(data))
    assert got.shape == (N,) and got.dtype == torch.float32

    rows = _rows_of(index, [f"v{i}" for i in range(N)]).numpy()
    raw = index.codes.numpy()[rows]
    codes = np.stack([raw & 0x0F, raw >> 4], axis=2).reshape(N, -1) if nbits == 4 else raw
    cells = np.repeat(np.arange(index.nlist), np.diff(index.offsets.numpy()))[rows]
    P, C, R = (t.double().numpy() for t in (index.codebooks, index.centroids, index.rotation))
    x_hat = C[cells] + P[np.arange(M), codes.astype(np.int64)].reshape(N, -1)
    want = ((data.astype(np.float64) @ R.T - x_hat) ** 2).sum(1)
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-4, atol=1e-5 * want.mean())
    assert (want > 0).all()
    per_chunk = torch.cat([err for _, _, err in q.encode_chunks(torch.from_numpy(data), chunk=100)])
    torch.testing.assert_close(per_chunk, got)


@pytest.mark.parametrize(("metric", "nbits", "opq"), CASES)
def test_chunking_does_not_change_results(built, data, metric, nbits, opq) -> None:
    """encode / distortion with chunk=7 (a ragged last chunk) give what the default chunk gives."""
    q = Quantizer.of(built(metric, nbits, opq))
    x = torch.from_numpy(data[:300])
    c1, j1 = q.encode(x)
    c7, j7 = q.encode(x, chunk=7)
    assert torch.equal(c1, c7) and torch.equal(j1, j7)
    torch.testing.assert_close(q.distortion(x, chunk=7), q.distortion(x), rtol=1e-5, atol=1e-6)
    assert [len(c) for c, _, _ in q.encode_chunks(x[:20], chunk=7)] == [7, 7, 6]


def test_encode_of_nothing() -> None:
    """Zero rows encode to empty (0,) cells and (0, M) codes; zero distortions."""
    q = Quantizer("l2", torch.eye(8), torch.randn(4, 8), torch.randn(2, 16, 4))
    cells, codes = q.encode(torch.zeros(0, 8))
    assert cells.shape == (0,) and cells.dtype == torch.int64
    assert codes.shape == (0, 2) and codes.dtype == torch.uint8
    assert q.distortion(torch.zeros(0, 8)).shape == (0,)


def test_large_batch_path_agrees_with_small_chunks() -> None:
    """At >= 4096 rows of short 8-bit sub-vectors encode_pq switches to Faiss's encoder (when
    installed): the builder (one big batch) and the service's small batches (torch) must still
    store the same codes."""
    n = 4500
    x = clustered(n, D, seed=9)
    ids = [f"w{i}" for i in range(n)]
    index = build_ivfpq(x, nlist=NLIST, M=M, nbits=8, metric="l2", niter=5, seed=2, ids=ids)
    q = Quantizer.of(index)
    cells, codes = q.encode(torch.from_numpy(x), chunk=1000)  # < 4096 rows a call: torch
    _assert_stored_as_encoded(index, ids, cells, codes)
    c_big, j_big = q.encode(torch.from_numpy(x))
    assert torch.equal(c_big, cells) and torch.equal(j_big, codes)


@pytest.mark.parametrize(("metric", "nbits"), [("ip", 8), ("l2", 4)])
def test_layer_to_ivfpq_equals_quantizer_encode(metric: str, nbits: int) -> None:
    """IndexingLayer.to_ivfpq (after a warm start, with a non-trivial rotation) stores exactly
    Quantizer.encode of layer.quantizer() for each id, and ships that quantizer's tensors."""
    d, nlist, m = 16, 8, 4
    layer = IndexingLayer(d, nlist, m, nbits, metric=metric)
    gen = torch.Generator().manual_seed(5)
    layer.rotation.copy_(torch.linalg.qr(torch.randn(d, d, generator=gen, dtype=torch.float64))[0])
    layer.warm_start(torch.from_numpy(clustered(1000, d, seed=6)), niter=5)
    items = torch.from_numpy(clustered(700, d, seed=7))  # not the warm-start data
    ids = [f"item-{i}" for i in range(700)]
    index = layer.to_ivfpq(items, ids)

    q = layer.quantizer()
    assert torch.equal(index.rotation, q.rotation) and not torch.equal(index.rotation, torch.eye(d))
    assert torch.equal(index.centroids, q.centroids) and torch.equal(index.codebooks, q.codebooks)
    assert index.metric == metric and index.nbits == nbits and index.n == 700
    cells, codes = q.encode(items)
    _assert_stored_as_encoded(index, ids, cells, codes)
    # the layer's own forward quantizes the same way
    _, c_fwd, j_fwd = layer.quantize(q.rotate(items))
    assert torch.equal(c_fwd, cells) and torch.equal(j_fwd.to(torch.uint8), codes)
