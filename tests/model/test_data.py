"""BEIR reader: SciFact loads with BEIR's counts; each malformed line is named."""

from __future__ import annotations

import gzip
import json

import pytest

from model.data import DataError, load_beir
from tests.conftest import shared


def test_scifact_loads_with_beir_counts():
    data = load_beir(shared("scifact"))
    assert len(data.corpus) == 5183 and len(data.queries) == 1109
    assert len(data.qrels["train"]) == 809 and len(data.qrels["test"]) == 300
    assert sum(len(v) for v in data.qrels["test"].values()) == 339
    assert len(data.split_queries("test")) == 300
    doc = data.corpus["4983"]
    assert doc.startswith("Microstructural development of human newborn cerebral white matter") and "Alterations" in doc


def _write(tmp_path, corpus=None, queries=None, qrels=None, gz=False):
    corpus = corpus if corpus is not None else [json.dumps({"_id": "d1", "title": "T", "text": "doc one"})]
    queries = queries if queries is not None else [json.dumps({"_id": "q1", "text": "query one"})]
    qrels = qrels if qrels is not None else ["query-id\tcorpus-id\tscore", "q1\td1\t1"]
    text = "\n".join(corpus) + "\n"
    if gz:
        with gzip.open(tmp_path / "corpus.jsonl.gz", "wt", encoding="utf-8") as f:
            f.write(text)
    else:
        (tmp_path / "corpus.jsonl").write_text(text)
    (tmp_path / "queries.jsonl").write_text("\n".join(queries) + "\n")
    (tmp_path / "qrels").mkdir(exist_ok=True)
    (tmp_path / "qrels" / "test.tsv").write_text("\n".join(qrels) + "\n")
    return tmp_path


def test_small_valid_set_loads_plain_and_gzipped(tmp_path):
    for gz in (False, True):
        d = tmp_path / str(gz)
        d.mkdir()
        data = load_beir(_write(d, gz=gz), splits=("test",))
        assert data.corpus == {"d1": "T doc one"} and data.positives("test") == {"q1": ["d1"]}


@pytest.mark.parametrize(
    ("kind", "lines", "message"),
    [
        ("corpus", ['{"_id": "d1", "text": "a"}', "{oops"], r"corpus.jsonl:2: not valid JSON"),
        ("corpus", ['{"_id": "d1", "text": "a"}', '["list"]'], r"corpus.jsonl:2: expected a JSON object"),
        ("corpus", ['{"text": "a"}'], r"corpus.jsonl:1: '_id' must be a non-empty string, got None"),
        ("corpus", ['{"_id": 7, "text": "a"}'], r"corpus.jsonl:1: '_id' must be a non-empty string, got 7"),
        ("corpus", ['{"_id": "d1"}'], r"corpus.jsonl:1: 'text' must be a string, got None"),
        ("corpus", ['{"_id": "d1", "text": "a", "title": 3}'], r"corpus.jsonl:1: 'title' must be a string, got int"),
        ("corpus", ['{"_id": "d1", "text": "a"}', '{"_id": "d1", "text": "b"}'], r"corpus.jsonl:2: duplicate _id 'd1'"),
        ("queries", ['{"_id": "q1", "text": "a"}', "", "nope"], r"queries.jsonl:3: not valid JSON"),
        ("qrels", ["query-id\tcorpus-id\tscore", "q1\td1"], r"test.tsv:2: expected 3 tab-separated columns"),
        ("qrels", ["query-id\tcorpus-id\tscore", "q1\td1\thigh"], r"test.tsv:2: score 'high' is not an integer"),
        ("qrels", ["q9\td1\t1"], r"test.tsv:1: query-id 'q9' is not in the queries file"),
        ("qrels", ["q1\tdX\t1"], r"test.tsv:1: corpus-id 'dX' is not in the corpus"),
    ],
)
def test_malformed_lines_are_named(tmp_path, kind, lines, message):
    with pytest.raises(DataError, match=message):
        load_beir(_write(tmp_path, **{kind: lines}), splits=("test",))


def test_missing_files_are_named(tmp_path):
    with pytest.raises(DataError, match="not a directory"):
        load_beir(tmp_path / "nope")
    _write(tmp_path)
    (tmp_path / "queries.jsonl").unlink()
    with pytest.raises(DataError, match=r"no queries\.jsonl or queries\.jsonl\.gz"):
        load_beir(tmp_path, splits=("test",))
    _write(tmp_path)
    with pytest.raises(DataError, match=r"train.tsv: no such qrels file"):
        load_beir(tmp_path, splits=("train",))
