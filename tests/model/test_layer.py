"""The indexing layer: straight-through gradients, Givens rotation, warm start, indexing."""

from __future__ import annotations

import numpy as np
import torch

from index import TorchSearcher
from model.layer import IndexingLayer
from tests.conftest import clustered


def _warm(d=16, nlist=8, M=4, nbits=8, n=3000, seed=0, **kw):
    layer = IndexingLayer(d, nlist, M, nbits, **kw)
    x = torch.from_numpy(clustered(n, d, seed=seed))
    layer.warm_start(x, niter=8)
    return layer, x


def test_straight_through_gradient_reaches_the_encoder_unchanged():
    torch.manual_seed(0)
    layer, x = _warm()
    encoder = torch.nn.Linear(16, 16)
    inp, target = x[:64], torch.randn(64, 16)
    out, distortion = layer(encoder(inp))
    assert not torch.allclose(out, encoder(inp))  # the forward really is quantized
    (out * target).sum().backward()
    quantized_grad = encoder.weight.grad.clone()
    encoder.zero_grad()
    (encoder(inp) * target).sum().backward()  # identity backward: same gradient as no layer
    torch.testing.assert_close(quantized_grad, encoder.weight.grad)
    assert quantized_grad.abs().sum() > 0 and distortion > 0


def test_distortion_trains_codebooks_and_commits_the_encoder():
    layer, x = _warm()
    x = x[:64].clone().requires_grad_(True)
    _, distortion = layer(x)
    distortion.backward()
    assert layer.codebooks.grad.abs().sum() > 0 and layer.centroids.grad.abs().sum() > 0
    assert x.grad.abs().sum() > 0  # commitment term


def test_rotation_stays_orthonormal_after_1000_updates():
    torch.manual_seed(0)
    layer, x = _warm(d=32, M=8)
    for step in range(1000):
        batch = x[(step * 37) % 2900 :][:64]
        _, distortion = layer(batch)
        distortion.backward()
        assert layer.rotation_step(lr=0.05) > 0
    R = layer.rotation
    assert R.dtype == torch.float64
    assert float((R @ R.T - torch.eye(32, dtype=torch.float64)).abs().max()) < 1e-5
    assert float((R - torch.eye(32, dtype=torch.float64)).abs().max()) > 1e-3  # it did move


def _train_distortion(rotation: bool) -> tuple[float, float]:
    """PQ distortion before and after 300 SGD steps on correlated data, Givens steps on or off."""
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(4000, 16, generator=gen) @ torch.randn(16, 16, generator=gen)  # correlated dims
    layer = IndexingLayer(16, 1, 4, 4, rotation=rotation)
    layer.warm_start(x, niter=10)

    def distortion():
        with torch.no_grad():
            xr = x @ layer.rotation.float().T
            return float(((layer.quantize(xr)[0] - xr) ** 2).sum(1).mean())

    before = distortion()
    opt = torch.optim.SGD(layer.parameters(), lr=0.05)
    for step in range(300):
        _, loss = layer(x[(step * 64) % 3936 :][:64])
        opt.zero_grad()
        loss.backward()
        opt.step()
        layer.rotation_step(lr=0.002)
    return before, distortion()


def test_givens_steps_lower_distortion_on_correlated_data():
    before, with_rotation = _train_distortion(True)
    _, without = _train_distortion(False)
    assert with_rotation < 0.95 * without < before


def test_warm_start_leaves_no_dead_codeword_on_10k_points():
    layer = IndexingLayer(32, 16, 8, 8)
    x = torch.from_numpy(clustered(10_000, 32, seed=4))
    layer.train()
    for s in range(0, 10_000, 500):  # the unquantized phase: the layer remembers what it saw
        out, loss = layer(x[s : s + 500])
        assert torch.equal(out, x[s : s + 500]) and float(loss) == 0
    layer.warm_start(niter=10)
    with torch.no_grad():
        _, cells, codes = layer.quantize(x @ layer.rotation.float().T)
    assert torch.bincount(cells, minlength=16).min() > 0
    for m in range(8):
        assert torch.bincount(codes[:, m], minlength=256).min() > 0, f"subspace {m} has a dead codeword"


def test_indexing_is_a_forward_pass_and_search_agrees_with_the_layer():
    for metric, nbits in (("ip", 8), ("l2", 4)):
        torch.manual_seed(0)
        layer, x = _warm(d=16, nlist=8, M=4, nbits=nbits, metric=metric)
        layer.rotation_step(0.0)  # no-op without gradients
        items = x[:1000]
        index = layer.to_ivfpq(items, [f"i{k}" for k in range(1000)])
        q = torch.from_numpy(clustered(5, 16, seed=7))
        scores, rows = TorchSearcher(index, "cpu").search_rows(q, 10, nprobe=8)
        layer.eval()
        with torch.no_grad():
            quantized, _ = layer(items)  # the model's own view of the items
        own = q @ quantized.T if metric == "ip" else torch.cdist(q, quantized) ** 2
        ids = index.ids[rows]
        got = own[torch.arange(5)[:, None], torch.tensor([[int(i[1:]) for i in r] for r in ids])]
        np.testing.assert_allclose(scores, got.numpy(), rtol=1e-4, atol=1e-3)
