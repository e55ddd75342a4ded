"""The two-step builder's parts: k-means uses every centroid, OPQ learns an orthonormal
rotation that lowers PQ distortion, and the built index is consistent."""

from __future__ import annotations

import pytest
import torch

from index import build_ivfpq, train_opq
from index.build import encode_pq
from index.kmeans import kmeans
from tests.conftest import clustered


def test_kmeans_leaves_no_empty_cluster():
    # heavy duplicates make empty clusters likely without the split repair
    x = torch.from_numpy(clustered(2000, 8, nclusters=4)).repeat(2, 1)
    c = kmeans(x, 64, niter=10)
    assign = torch.cdist(x, c).argmin(1)
    assert torch.bincount(assign, minlength=64).min() > 0


def test_kmeans_batched_equals_one_by_one():
    x = torch.from_numpy(clustered(1000, 4, seed=2)).view(1000, 2, 2).transpose(0, 1).contiguous()
    both = kmeans(x, 16, niter=5, seed=1, init=x[:, :16])
    for s in range(2):
        one = kmeans(x[s], 16, niter=5, seed=1, init=x[s, :16])
        torch.testing.assert_close(both[s], one)


def test_kmeans_needs_enough_points():
    with pytest.raises(ValueError, match="at least k=10 points, got 5"):
        kmeans(torch.zeros(5, 2), 10)


def test_opq_rotation_is_orthonormal_and_lowers_distortion():
    gen = torch.Generator().manual_seed(0)
    # correlated dims: PQ on the raw axes wastes bits, a rotation helps
    x = torch.randn(4000, 16, generator=gen) @ torch.randn(16, 16, generator=gen)
    R = train_opq(x, M=4, nbits=4, niter=8)
    assert torch.allclose(R @ R.T, torch.eye(16), atol=1e-5)

    def distortion(rot):
        xr = x @ rot.T
        P = kmeans(xr.view(-1, 4, 4).transpose(0, 1), 16, niter=10)
        codes = encode_pq(xr, P)
        rec = P[torch.arange(4), codes.long()].reshape(-1, 16)
        return float(((xr - rec) ** 2).sum(1).mean())

    assert distortion(R) < 0.9 * distortion(torch.eye(16))


def test_build_rejects_bad_shapes():
    x = clustered(500, 30)
    with pytest.raises(ValueError, match="divisible by M=8"):
        build_ivfpq(x, nlist=4, M=8)
    with pytest.raises(ValueError, match="at least max"):
        build_ivfpq(x[:100], nlist=4, M=6)
    with pytest.raises(ValueError, match="metric"):
        build_ivfpq(x, nlist=4, M=6, metric="cosine")


def test_built_index_puts_every_item_in_its_nearest_cell(small_indexes):
    index = small_indexes["l2", 8, True]
    cells = index.cells()
    xr = index.decode(rotated=True)  # decoded items sit near their own centroid
    nearest = torch.cdist(xr, index.centroids).argmin(1)
    assert (nearest == cells).float().mean() > 0.9
