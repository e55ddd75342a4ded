"""Ray Data indexing equality (issue #14): `jointpq index --ray` runs the forward pass as Ray Data
`map_batches` on an actor pool and writes a shard set directly; every item gets the cell and
codes of the single-process `jointpq index`, bit for bit, in the shard `shard_of` names.

The artifact: 400 SciFact documents (title + text, as the catalog file holds them) embedded by a
small hashed item tower, an IVF-PQ built on those embeddings with the real builder, canaries
among them. No training; the two tests that run Ray (the shared local one, `ray_cluster`) are
`slow` only for the actor pool each run starts (seconds of process start-up and imports)."""

from __future__ import annotations

import gzip
import itertools
import json
import sys

import numpy as np
import pytest
import torch

from index import build_ivfpq, load_index, read_artifact, write_artifact
from index.artifact import IDS, TENSORS, read_manifest
from index.canary import CANARY, make_canaries, read_canaries
from index.shard import read_shard_set, shard_artifact, shard_of
from model.encoders import HashedNgramEncoder
from model.indexing import IndexingError, corpus_batches, index_catalog
from model.towers import tower_files
from service.cli import main
from tests.conftest import shared

N_DOCS = 400
DIM = 32


@pytest.fixture(scope="module")
def catalog(tmp_path_factory):
    """(the artifact, a catalog file of N_DOCS SciFact lines as they come: _id, title, text)."""
    root = tmp_path_factory.mktemp("ray-indexing")
    with gzip.open(shared("scifact") / "corpus.jsonl.gz", "rt", encoding="utf-8") as f:
        lines = list(itertools.islice(f, N_DOCS))
    corpus = root / "catalog.jsonl"
    corpus.write_text("".join(lines), encoding="utf-8")
    torch.manual_seed(0)
    tower = HashedNgramEncoder(dim=DIM, buckets=4096, hidden=64, emb=32)
    batch = next(corpus_batches(corpus))
    x = tower.encode(batch.texts)
    index = build_ivfpq(x, nlist=8, M=8, niter=5, seed=0, ids=batch.ids)
    files, description = tower_files(tower, tower)
    canary_ids = batch.ids[:: N_DOCS // 8]
    rows = [batch.ids.index(i) for i in canary_ids]
    from index import Index

    idx = Index.in_memory(index)
    canaries = make_canaries(x[rows].numpy(), [[i] for i in canary_ids], lambda q, k, n: idx.search(q, k, n)[1],
                             k=10, nprobe=2)  # fmt: skip
    files[CANARY] = canaries.dumps()
    training = {"mode": "two-step", "item_encoder": description}
    artifact = write_artifact(root / "v1", index, training=training, extra_files=files)
    return artifact, corpus


def by_id(index) -> dict[str, tuple[int, bytes]]:
    """id -> (cell, unpacked codes as bytes) of an IVFPQ."""
    cells, codes = index.cells(), index.unpacked_codes()
    return {str(i): (int(cells[r]), codes[r].numpy().tobytes()) for r, i in enumerate(index.ids)}


@pytest.mark.slow  # a Ray Data actor pool starts per run: 8-15 s on 2 busy cores (the local Ray: ~10 s more, once)
def test_ray_data_indexing_equals_the_single_process_run(tmp_path, catalog, ray_cluster):
    """The issue's test: same ids, same cell and codes per id, each in its shard; every shard
    loads (checksums verified) and the set reads back; each shard equals `jointpq shard` of the
    single-process artifact (rows, CSR offsets); the manifest says how it was made."""
    from cluster.indexing import index_with_ray

    artifact, corpus = catalog
    single, rec1 = index_catalog(artifact, tmp_path / "single", corpus=corpus, device="cpu", progress=False)
    S = 3
    # chunks of 64: 7 actor calls over 2 actors (index_catalog encoded the 400 in one chunk)
    shard_set, rec = index_with_ray(artifact, tmp_path / "ray-s3", corpus=corpus, shards=S, concurrency=2, chunk=64,
                                    progress=False)  # fmt: skip
    _, whole = read_artifact(single)
    want = by_id(whole)
    got: dict[str, tuple[int, bytes]] = {}
    assert read_shard_set(shard_set.path).count == S and shard_set.n_items == N_DOCS
    for s in range(S):
        member = shard_set.member(s)
        load_index(member, device="cpu")  # every file's sha256 against the manifest
        _, part = read_artifact(member)
        rows = by_id(part)
        assert (shard_of(list(rows), S) == s).all(), f"shard {s} holds an id another shard owns"
        assert not rows.keys() & got.keys()
        got |= rows
    assert got.keys() == want.keys()
    assert all(got[i] == want[i] for i in want), [i for i in want if got[i] != want[i]][:5]

    # the same slices `jointpq shard` cuts from the single-process artifact, row for row
    cut = shard_artifact(single, S, tmp_path / "cut-s3")
    for s in range(S):
        _, a = read_artifact(cut.member(s))
        _, b = read_artifact(shard_set.member(s))
        assert list(a.ids) == list(b.ids) and torch.equal(a.codes, b.codes) and torch.equal(a.offsets, b.offsets)

    m = read_manifest(shard_set.member(0))
    indexed = m.training["indexed"]
    assert indexed["indexed_with"] == "ray-data" and indexed["workers"] == 2 and indexed["ray_version"]
    assert (indexed["parent"], indexed["given"], indexed["items"], indexed["mode"]) == ("v1", N_DOCS, N_DOCS, "replace")
    assert sum(indexed["shard_items"]) == N_DOCS and m.shard["parent_items"] == N_DOCS
    # the drift report: the same distortion sum, the same cells as the whole index's
    assert m.training["drift"] == rec["drift"] == rec1["drift"]
    # the model files come along byte for byte; the canaries are re-measured over the shards merged
    files = read_manifest(single).files
    assert {n: f["sha256"] for n, f in m.files.items() if n not in (TENSORS, IDS)} == {
        n: f["sha256"] for n, f in files.items() if n not in (TENSORS, IDS)
    }
    assert read_canaries(shard_set.member(0)) == read_canaries(single)


@pytest.mark.slow  # as above
def test_cli_index_ray_add_vectors_matches_the_single_process_run(tmp_path, catalog, ray_cluster, capsys):
    """`jointpq index --ray --mode add --vectors --ids` (a present id replaced): the parent's items
    plus the new ones, each row as the single-process `jointpq index` puts it; one JSON line."""
    artifact, _ = catalog
    _, parent = read_artifact(artifact)
    x = np.random.default_rng(0).standard_normal((50, DIM)).astype(np.float32)
    ids = [f"new-{i}" for i in range(49)] + [str(parent.ids[3])]
    np.save(tmp_path / "x.npy", x)
    (tmp_path / "ids.json").write_text(json.dumps(ids))
    single, rec1 = index_catalog(artifact, tmp_path / "single", vectors=tmp_path / "x.npy", ids=tmp_path / "ids.json",
                                 mode="add", progress=False)  # fmt: skip
    out = tmp_path / "v2-s2"
    argv = ["index", "--artifact", str(artifact), "--vectors", str(tmp_path / "x.npy"), "--ids",
            str(tmp_path / "ids.json"), "--mode", "add", "--out", str(out), "--ray", "--shards", "2", "--ray-workers",
            "2", "--ray-chunk", "16"]  # fmt: skip
    assert main(argv) == 0
    rec = json.loads(capsys.readouterr().out)
    assert rec["shard_set"] == str(out) and rec["workers"] == 2 and rec["encoder"] == "vectors given"
    assert (rec["given"], rec["added"], rec["replaced"], rec["items"]) == (50, 49, 1, N_DOCS + 49)
    assert rec["drift"] == rec1["drift"]
    shard_set = read_shard_set(out)
    assert shard_set.n_items == N_DOCS + 49
    got: dict[str, tuple[int, bytes]] = {}
    for s in range(2):
        got |= by_id(read_artifact(shard_set.member(s))[1])
    assert got == by_id(read_artifact(single)[1])


@pytest.mark.slow  # as above
def test_a_workers_error_is_the_commands_one_line(tmp_path, catalog, ray_cluster, capsys):
    """What an actor raises loading the model (here: --encoder-runtime onnx, and the artifact has
    no ONNX graph) comes back whole: the same `error:` line as without Ray, exit 2, nothing written."""
    artifact, corpus = catalog
    out = tmp_path / "o"
    argv = ["index", "--artifact", str(artifact), "--corpus", str(corpus), "--out", str(out), "--ray", "--shards", "2",
            "--ray-workers", "1", "--encoder-runtime", "onnx"]  # fmt: skip
    assert main(argv) == 2
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("error: ")]
    assert err == ["error: encoder/ holds no fp32 ONNX graph (made before ONNX forms: `jointpq onnx` adds them)"]
    assert not out.exists() and not list(tmp_path.glob(".o.tmp-*"))


def test_cli_ray_flags_are_checked_in_one_line(tmp_path, catalog, capsys):
    """No Ray needed: the flags are refused before anything starts, each with one `error:` line."""
    artifact, corpus = catalog
    base = ["index", "--artifact", str(artifact), "--corpus", str(corpus), "--out", str(tmp_path / "o")]
    cases = [
        (["--ray"], "error: --ray needs --shards S: it writes S shard artifacts (a shard set) directly"),
        (["--shards", "2"], "error: --shards go with --ray (index into a shard set); to split an existing artifact:"
                            " jointpq shard"),
    ]  # fmt: skip
    for flags, message in cases:
        assert main([*base, *flags]) == 2, flags
        err = capsys.readouterr().err.strip()
        assert err.startswith(message) and "\n" not in err, err
    assert not (tmp_path / "o").exists()
    pytest.importorskip("ray", reason="the cluster extra is not installed")
    from cluster.indexing import index_with_ray

    with pytest.raises(IndexingError, match=r"--shards must be an integer in \[1, 4096\], got 0"):
        index_with_ray(artifact, tmp_path / "o", corpus=corpus, shards=0)
    with pytest.raises(IndexingError, match="exactly one of --corpus"):
        index_with_ray(artifact, tmp_path / "o", shards=2)


def test_without_the_cluster_extra_ray_is_one_clear_line(tmp_path, catalog, capsys, monkeypatch):
    """`--ray` on an install without Ray (the extra): the flags parse, the run exits 2 with one line."""
    artifact, corpus = catalog
    for name in [m for m in sys.modules if m == "ray" or m.startswith("ray.") or m == "cluster.indexing"]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray -> ModuleNotFoundError
    argv = ["index", "--artifact", str(artifact), "--corpus", str(corpus), "--out", str(tmp_path / "o"), "--ray",
            "--shards", "2"]  # fmt: skip
    assert main(argv) == 2
    assert capsys.readouterr().err.strip() == "error: --ray needs the cluster extra: pip install 'jointpq[cluster]'"
