"""`--mode auto` picks from the data; label sampling; corpus-only data sets."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from model.auto import MANY_LABELS, choose, labelled_queries
from model.config import ConfigError
from model.data import DataError, RetrievalData, load_beir, sample_labels
from model.train import resolve_config


def _data(n_train=0, n_test=3, zero_train=0):
    """n_train train queries judged relevant, zero_train judged with score 0 only, n_test test ones."""
    corpus = {f"d{i}": f"document {i}" for i in range(10)}
    n = n_train + zero_train + n_test
    queries = {f"q{i}": f"query {i}" for i in range(n)}
    train = {f"q{i}": {f"d{i % 10}": 1} for i in range(n_train)}
    train |= {f"q{i}": {"d0": 0} for i in range(n_train, n_train + zero_train)}
    test = {f"q{i}": {"d1": 1} for i in range(n_train + zero_train, n)}
    qrels = {"test": test} | ({"train": train} if train else {})
    return RetrievalData(Path("."), corpus, queries, qrels)


def test_labelled_queries_counts_queries_with_a_positive():
    assert labelled_queries(_data(0)) == 0
    assert labelled_queries(_data(5, zero_train=2)) == 5
    assert labelled_queries(_data(5), "test") == 3
    assert labelled_queries(_data(5), "dev") == 0


def test_no_train_labels_choose_distill():
    for data in (_data(0), _data(0, zero_train=4)):
        c = choose(data)
        assert c.mode == "distill" and c.values == {} and "no labelled queries" in c.reason
        assert resolve_config(c.mode, **c.values).mode == "distill"


def test_few_labels_choose_label_free_distill():
    """Measured: below MANY_LABELS the supervised modes do not beat their two-step start."""
    c = choose(_data(5))
    assert c.mode == "distill" and c.values == {}
    assert "5 labelled queries" in c.reason
    assert resolve_config(c.mode, **c.values).encoder == "minilm"


def test_many_labels_choose_poeem_without_distillation():
    assert choose(_data(MANY_LABELS - 1)).mode == "distill"
    c = choose(_data(MANY_LABELS))
    assert c.mode == "poeem" and c.values == {"encoder": "minilm-head"}
    assert resolve_config(c.mode, **c.values).distill_weight == 0.0


def test_without_minilm_labels_choose_poeem_hashed():
    c = choose(_data(5), minilm=False)
    assert c.mode == "poeem" and c.values == {"encoder": "hashed"} and "MiniLM not installed" in c.reason
    cfg = resolve_config(c.mode, **c.values)
    assert cfg.encoder == "hashed" and cfg.lr == 5e-3 and cfg.shared_towers is True


def test_without_minilm_or_labels_is_refused():
    with pytest.raises(ConfigError, match="no labelled queries and no pretrained encoder"):
        choose(_data(0), minilm=False)


def test_choose_reads_the_named_split():
    data = _data(0, n_test=MANY_LABELS)
    assert choose(data, split="test").mode == "poeem"
    assert choose(data, split="train").mode == "distill"


def test_sample_labels_keeps_n_of_the_split_seeded_others_untouched():
    data = _data(20, n_test=6)
    a = sample_labels(data, "train", 7, seed=1)
    assert len(a.qrels["train"]) == 7 and set(a.qrels["train"]) <= set(data.qrels["train"])
    for q, docs in a.qrels["train"].items():
        assert docs == data.qrels["train"][q]
    assert a.qrels["test"] == data.qrels["test"] and a.qrels["test"] is data.qrels["test"]
    assert a.corpus is data.corpus and a.queries is data.queries
    assert sample_labels(data, "train", 7, seed=1).qrels["train"] == a.qrels["train"]
    assert set(sample_labels(data, "train", 7, seed=2).qrels["train"]) != set(a.qrels["train"])
    assert len(data.qrels["train"]) == 20  # the input is not modified


def test_sample_labels_more_than_there_are_keeps_all():
    data = _data(4)
    assert sample_labels(data, "train", 100).qrels["train"] == data.qrels["train"]


def test_sample_labels_missing_split():
    with pytest.raises(DataError, match=r"no qrels/train\.tsv to sample labels from"):
        sample_labels(_data(0), "train", 5)


def _write_corpus(path):
    docs = [{"_id": "d1", "title": "T", "text": "one"}, {"_id": "d2", "text": "two"}]
    (path / "corpus.jsonl").write_text("\n".join(json.dumps(d) for d in docs) + "\n")


def test_load_beir_optional_reads_a_corpus_only_directory(tmp_path):
    _write_corpus(tmp_path)
    data = load_beir(tmp_path, optional=True)
    assert data.corpus == {"d1": "T one", "d2": "two"}
    assert data.queries == {} and data.qrels == {}
    assert choose(data).mode == "distill"


def test_load_beir_corpus_only_without_optional_is_refused(tmp_path):
    _write_corpus(tmp_path)
    with pytest.raises(DataError, match=r"no queries\.jsonl"):
        load_beir(tmp_path)


def test_load_beir_optional_loads_the_splits_present(tmp_path):
    _write_corpus(tmp_path)
    (tmp_path / "queries.jsonl").write_text(json.dumps({"_id": "q1", "text": "query"}) + "\n")
    (tmp_path / "qrels").mkdir()
    (tmp_path / "qrels" / "train.tsv").write_text("query-id\tcorpus-id\tscore\nq1\td2\t1\n")
    data = load_beir(tmp_path, optional=True)
    assert data.qrels == {"train": {"q1": {"d2": 1}}}
    with pytest.raises(DataError, match=r"test\.tsv: no such qrels file"):
        load_beir(tmp_path)


def test_load_beir_optional_still_needs_a_corpus(tmp_path):
    with pytest.raises(DataError, match=r"no corpus\.jsonl"):
        load_beir(tmp_path, optional=True)
