"""CUDA: the same engine on the GPU agrees with the CPU. Skipped (not failed) without a GPU."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from index import TorchSearcher, exact_search, load_index, write_artifact

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine"),
]


@pytest.mark.parametrize("key", [("ip", 8, False), ("l2", 4, True), ("ip", 4, True)])
def test_cuda_search_matches_cpu(small_data, small_indexes, key):
    _, xq = small_data
    index = small_indexes[key]
    cpu = TorchSearcher(index, "cpu").search_rows(xq, 20, 4)
    gpu = TorchSearcher(index, "cuda").search_rows(xq, 20, 4)
    np.testing.assert_allclose(gpu[0], cpu[0], rtol=1e-4, atol=1e-3)
    assert (gpu[1] == cpu[1]).mean() > 0.99


def test_cuda_cells_strategy_matches_pairs(small_data, small_indexes):
    _, xq = small_data
    index = small_indexes["l2", 8, True]
    a = TorchSearcher(index, "cuda", "cells").search_rows(xq, 10, 4)
    b = TorchSearcher(index, "cuda", "pairs").search_rows(xq, 10, 4)
    np.testing.assert_allclose(a[0], b[0], rtol=1e-4, atol=1e-3)


def test_auto_device_loads_on_cuda(tmp_path, small_indexes, small_data):
    _, xq = small_data
    path = write_artifact(tmp_path / "a", small_indexes["ip", 8, False])
    idx = load_index(path, device="auto", backend="auto")
    assert idx.device.type == "cuda" and idx.backend == "torch"
    _, ids = idx.search(xq, k=5, nprobe=4)
    assert len(ids) == len(xq)


def test_cuda_exact_search_matches_cpu(small_data):
    xb, xq = small_data
    a = exact_search(xq, xb, 10, "l2", device="cpu")
    b = exact_search(xq, xb, 10, "l2", device="cuda")
    assert (a[1] == b[1]).mean() > 0.99


def test_cuda_live_index_matches_cpu(small_data, small_indexes):
    """Delta segment + tombstones on the GPU (torch base: the delta scans the base's probe, dead
    rows masked on the device) answer as the same writes on the CPU."""
    from index import Index
    from index.live import LiveIndex

    xb, xq = small_data
    index = small_indexes["ip", 8, False]
    new = xb[:50] + 0.01
    views = []
    for device in ("cpu", "cuda"):
        view = LiveIndex(Index.in_memory(index, device=device, backend="torch"))
        view = view.upsert([f"new-{i}" for i in range(50)], new)
        view, _ = view.delete([str(i) for i in index.ids[:20]] + ["new-3"])
        views.append(view)
    cpu, gpu = (v.search(xq, k=20, nprobe=4) for v in views)
    for a, b in zip(cpu[1], gpu[1], strict=True):
        assert len(set(a) & set(b)) >= 19
        assert "new-3" not in b and not set(b) & {str(i) for i in index.ids[:20]}
