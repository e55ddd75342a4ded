"""Shards: the merge of S shard searches equals the unsharded search exactly (ids and scores), for
both metrics, both code sizes, both backends and S in {1, 2, 3, 7}; shard sets on disk are
complete artifacts that say what they are; live writes reach the shard that owns the id."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
import torch

from index import ArtifactError, build_ivfpq, load_index, read_manifest, write_artifact
from index.faiss_interop import available as faiss_available
from index.live import live
from index.loader import Index, make_searcher
from index.shard import (
    HASH,
    SHARDS,
    entries_for,
    merge,
    quantizer_only,
    read_shard_set,
    shard_artifact,
    shard_of,
    split,
)
from index.wal import Entry
from tests.conftest import clustered

BACKENDS = ["torch", *(["faiss"] if faiss_available() else [])]


@pytest.fixture(scope="module")
def indexes():
    xb = clustered(2500, 32, seed=3)
    ids = [f"doc-{i}" for i in range(len(xb))]
    out = {}
    for metric in ("ip", "l2"):
        for nbits, M in ((8, 8), (4, 16)):
            # a rotation on one metric (a random orthonormal one: OPQ's training is slow), the identity on the other
            rot = torch.linalg.qr(torch.randn(32, 32, generator=torch.Generator().manual_seed(2)))[0]
            x = xb @ rot.numpy().T if metric == "ip" else xb
            built = build_ivfpq(x, nlist=24, M=M, nbits=nbits, metric=metric, ids=ids, seed=1)
            out[metric, nbits] = replace(built, rotation=rot.contiguous()) if metric == "ip" else built
    return out


def canonical(scores, ids, metric):
    """Results in the documented order: score, then id (the unsharded engines order ties arbitrarily)."""
    sign = -1 if metric == "ip" else 1
    out_s, out_i = [], []
    for s, i in zip(scores, ids, strict=True):
        order = sorted(range(len(i)), key=lambda j: (sign * float(s[j]), i[j]))
        out_s.append(np.asarray([s[j] for j in order], dtype=np.float32))
        out_i.append([i[j] for j in order])
    return out_s, out_i


def sharded_search(data, shards, queries, k, nprobe, backend):
    """What the cluster does: the probe once (router), every shard scans it, the router merges."""
    prober = make_searcher(quantizer_only(data), "cpu", backend)
    probe = prober.coarse(queries, nprobe)
    views = [live(Index.in_memory(part, "cpu", backend)) for part in split(data, shards)]
    parts = [v.search(queries, k, probe=probe) for v in views]
    return merge(parts, k, data.metric)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("metric", ["ip", "l2"])
@pytest.mark.parametrize("nbits", [8, 4])
def test_merge_of_shards_equals_the_unsharded_search_exactly(indexes, backend, metric, nbits):
    data = indexes[metric, nbits]
    queries = clustered(30, 32, seed=4)
    k, nprobe = 10, 5
    whole = Index.in_memory(data, "cpu", backend)
    all_s, all_i = canonical(*whole.search(queries, 4 * k, nprobe), metric)  # room for a tie group at the k-th place
    for shards in (1, 2, 3, 7):
        got_s, got_i = sharded_search(data, shards, queries, k, nprobe, backend)
        for q in range(len(queries)):
            np.testing.assert_array_equal(got_s[q], all_s[q][:k])  # bit for bit, not approximately
            tied = all_s[q] == all_s[q][k - 1] if len(all_s[q]) >= k else np.zeros(len(all_s[q]), bool)
            if len(all_s[q]) <= k or all_s[q][k] != all_s[q][k - 1]:
                assert got_i[q] == all_i[q][:k], (shards, q)  # no tie across the k-th place: the same ids
            else:  # equal scores straddle the cut (Faiss's 4-bit fast scan scores in coarse steps):
                first = int(np.argmax(tied))  # the same ids before the tie group, and members of it after
                assert got_i[q][:first] == all_i[q][:first]
                assert set(got_i[q][first:]) <= {i for i, t in zip(all_i[q], tied, strict=True) if t}


def test_ties_are_ordered_by_id_whatever_the_sharding():
    """Duplicated vectors under different ids score the same: the merged order is by id, for any S."""
    base = clustered(300, 16, seed=5)
    x = np.concatenate([base, base[:20], base[:20]])  # 3 copies of the first 20 items
    ids = [f"id-{i:04d}" for i in range(len(x))][::-1]  # ids not in row order
    data = build_ivfpq(x, nlist=8, M=4, nbits=8, metric="ip", ids=ids, seed=0)
    q = base[:5] * 3
    seen = []
    for shards in (1, 2, 3, 7):
        s, i = sharded_search(data, shards, q, 9, 8, "torch")
        for row_s, row_i in zip(s, i, strict=True):
            for a in range(len(row_i) - 1):
                assert row_s[a] > row_s[a + 1] or (row_s[a] == row_s[a + 1] and row_i[a] < row_i[a + 1])
        seen.append(i)
    assert all(r == seen[0] for r in seen)
    assert any(len(set(np.round(s, 6))) < len(s) for s in sharded_search(data, 2, q, 9, 8, "torch")[0])  # ties exist


def test_shard_of_is_stable_and_spreads_ids():
    ids = [f"item-{i}" for i in range(20000)]
    a, b = shard_of(ids, 7), shard_of(list(reversed(ids)), 7)[::-1]
    np.testing.assert_array_equal(a, b)
    assert shard_of(["item-0", "item-1", "ünïcode-✓"], 7).tolist() == [4, 3, 2]  # fixed forever: ids route by it
    counts = np.bincount(a, minlength=7)
    assert counts.min() > 0.9 * len(ids) / 7 and counts.max() < 1.1 * len(ids) / 7
    with pytest.raises(ValueError, match="shards"):
        shard_of(ids, 0)


def test_shard_artifact_writes_complete_artifacts_that_say_what_they_are(indexes, tmp_path):
    data = indexes["ip", 8]
    parent = write_artifact(tmp_path / "v1", data, training={"mode": "two-step"},
                            extra_files={"encoder/encoder.json": b'{"kind": "x"}'})  # fmt: skip
    shards = shard_artifact(parent, 3, tmp_path / "v1-s3")
    assert shards.count == 3 and shards.parent == "v1" and shards.n_items == data.n
    seen = set()
    for i in range(3):
        m = read_manifest(shards.member(i))
        assert m.shard == {"index": i, "count": 3, "parent": "v1", "hash": HASH, "parent_items": data.n}
        assert (shards.member(i) / "encoder" / "encoder.json").read_bytes() == b'{"kind": "x"}'  # the full model
        idx = load_index(shards.member(i), device="cpu", backend="torch")
        assert torch_equal(idx.data.centroids, data.centroids) and torch_equal(idx.data.rotation, data.rotation)
        ids = set(idx.ids.tolist())
        assert all(s == i for s in shard_of(sorted(ids), 3))
        seen |= ids
    assert seen == set(data.ids.tolist())
    with pytest.raises(ArtifactError, match="already exists"):
        shard_artifact(parent, 3, tmp_path / "v1-s3")
    with pytest.raises(ArtifactError, match="is itself a shard"):
        shard_artifact(shards.member(0), 2, tmp_path / "again")
    # a member swapped for another is refused by the set's record of its manifest
    doc = json.loads((shards.path / SHARDS).read_text())
    doc["members"][0], doc["members"][1] = doc["members"][1], doc["members"][0]
    (shards.path / SHARDS).write_text(json.dumps(doc))
    with pytest.raises(ArtifactError, match=r"sha256|shard 0"):
        read_shard_set(shards.path)


def test_a_shard_set_can_be_published_for_the_sharded_service(indexes, tmp_path):
    from index.pointer import publish, read_pointer

    write_artifact(tmp_path / "v1", indexes["ip", 8])
    shard_artifact(tmp_path / "v1", 2, tmp_path / "v1-s2")
    publish(tmp_path, "v1-s2")
    assert read_pointer(tmp_path) == "v1-s2"
    (tmp_path / "empty").mkdir()
    with pytest.raises(ArtifactError, match="nor a shard set"):
        publish(tmp_path, "empty")


def torch_equal(a, b) -> bool:
    return bool(torch.equal(a, b))


def test_the_cli_shards_an_artifact(indexes, tmp_path, capsys):
    from service.cli import main

    write_artifact(tmp_path / "v1", indexes["l2", 4])
    assert main(["shard", "--artifact", str(tmp_path / "v1"), "--shards", "2", "--out", str(tmp_path / "s2")]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["shards"] == 2 and sum(out["items_per_shard"]) == indexes["l2", 4].n
    assert main(["shard", "--artifact", str(tmp_path / "v1"), "--shards", "0", "--out", str(tmp_path / "s0")]) == 2
    assert "shards must be an integer" in capsys.readouterr().err


def test_live_writes_go_to_the_shard_that_owns_the_id(indexes):
    data = indexes["ip", 8]
    d = data.d
    rng = np.random.default_rng(0)
    new = [f"new-{i}" for i in range(40)]
    vec = rng.standard_normal((40, d)).astype(np.float32)
    from index.wal import encode_vector

    log = [
        Entry(1, "upsert", {"items": [{"id": i, "vector": encode_vector(v)} for i, v in zip(new, vec, strict=True)]}),
        Entry(2, "delete", {"ids": [str(data.ids[0]), str(data.ids[1]), "new-3"]}),
    ]
    from index.live import replay

    whole = replay(live(Index.in_memory(data, "cpu", "torch")), log)
    parts = [
        replay(live(Index.in_memory(p, "cpu", "torch")), entries_for(log, s, 3)) for s, p in enumerate(split(data, 3))
    ]
    assert all(p.applied_seq == 2 for p in parts)  # every shard advanced, with or without ids of its own
    assert sum(p.n_live for p in parts) == whole.n_live
    for s, p in enumerate(parts):
        for i in new:
            assert p.contains(i) == (i != "new-3" and shard_of([i], 3)[0] == s)
    # and the merged search over the live shards equals the live unsharded search
    q = vec[:6]
    prober = make_searcher(quantizer_only(data), "cpu", "torch")
    probe = prober.coarse(q, 6)
    got = merge([p.search(q, 8, probe=probe) for p in parts], 8, "ip")
    want = canonical(*whole.search(q, 8, 6), "ip")
    assert got[1] == want[1]
