"""Label-free training queries: a user's file, the data set's own queries, or corpus sentences."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from model.data import DataError, RetrievalData
from model.queries import pseudo_queries, read_query_file, sentences, training_queries

WORDS = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta", "iota", "kappa", "lambda", "mu"]


def _corpus(n_docs=30):
    """Documents of three query-sized sentences each, all distinct."""
    corpus = {}
    for i in range(n_docs):
        parts = [f"Sentence {j} of document {i} mentions {WORDS[(i + j) % len(WORDS)]} here." for j in range(3)]
        corpus[f"d{i}"] = " ".join(parts)
    return corpus


def test_plain_text_skips_blanks_keeps_first_of_repeats_in_order(tmp_path):
    path = tmp_path / "log.txt"
    path.write_text("how do cells divide\n\n   \nwhat is a gene\nhow do cells divide\n  what is dna  \n")
    assert read_query_file(path) == ["how do cells divide", "what is a gene", "what is dna"]


def test_jsonl_reads_text_field_and_ignores_other_fields(tmp_path):
    path = tmp_path / "log.jsonl"
    lines = [{"text": "first query", "count": 3}, {"text": " second query "}, {"text": "first query", "_id": "x"}]
    path.write_text("\n".join(json.dumps(o) for o in lines) + "\n\n")
    assert read_query_file(path) == ["first query", "second query"]


def test_jsonl_chosen_by_first_non_empty_line(tmp_path):
    path = tmp_path / "q.jsonl"
    path.write_text('\n\n  {"text": "a query"}\n')
    assert read_query_file(str(path)) == ["a query"]


def test_missing_file(tmp_path):
    with pytest.raises(DataError, match=r"nope\.txt: no such queries file"):
        read_query_file(tmp_path / "nope.txt")


def test_a_directory_is_not_a_queries_file(tmp_path):
    with pytest.raises(DataError, match="no such queries file"):
        read_query_file(tmp_path)


def test_invalid_json_line_names_file_and_line(tmp_path):
    path = tmp_path / "name.jsonl"
    path.write_text('{"text": "ok"}\n{"text": "fine"}\n{"text": broken\n')
    with pytest.raises(DataError, match=r"^name\.jsonl:3: not valid JSON"):
        read_query_file(path)


def test_line_numbers_count_blank_lines(tmp_path):
    path = tmp_path / "name.jsonl"
    path.write_text('{"text": "ok"}\n\n\n{"text"\n')
    with pytest.raises(DataError, match=r"^name\.jsonl:4: "):
        read_query_file(path)


@pytest.mark.parametrize(
    "line",
    ['{"query": "no text key"}', '{"text": ""}', '{"text": "   "}', '{"text": 5}', '["a", "list"]', '"a string"'],
)
def test_object_without_usable_text_is_refused(tmp_path, line):
    path = tmp_path / "q.jsonl"
    path.write_text('{"text": "fine"}\n' + line + "\n")
    with pytest.raises(DataError, match=r"^q\.jsonl:2: expected an object with a non-empty string 'text'"):
        read_query_file(path)


@pytest.mark.parametrize("content", ["", "\n\n   \n"])
def test_empty_file_holds_no_query(tmp_path, content):
    path = tmp_path / "empty.txt"
    path.write_text(content)
    with pytest.raises(DataError, match=r"empty\.txt: holds no query"):
        read_query_file(path)


def test_sentences_keeps_query_sized_ones():
    text = "Too short. This sentence has exactly six words. Another one that is long enough here! Tiny? Yes."
    assert sentences(text) == ["This sentence has exactly six words.", "Another one that is long enough here!"]
    assert sentences("one two three four five") == ["one two three four five"]
    assert sentences("one two three four") == []
    assert sentences(" ".join(["w"] * 49) + ".") == []


def test_pseudo_queries_deterministic_distinct_and_from_the_corpus():
    corpus = _corpus()
    a = pseudo_queries(corpus, 40, seed=1)
    assert a == pseudo_queries(corpus, 40, seed=1)
    assert a != pseudo_queries(corpus, 40, seed=2)
    assert len(a) == 40 and len(set(a)) == 40
    all_sentences = {s for text in corpus.values() for s in sentences(text)}
    assert set(a) <= all_sentences


def test_pseudo_queries_fall_back_to_first_32_words():
    long_doc = " ".join(f"w{i}" for i in range(60))  # one 60-word "sentence": too long for a query
    corpus = {"a": long_doc, "b": "short"}
    out = pseudo_queries(corpus, 5, seed=0)
    assert set(out) == {" ".join(f"w{i}" for i in range(32)), "short"}


def test_pseudo_queries_stop_when_the_corpus_runs_out():
    corpus = {"a": "Only one sentence of six words."}
    assert pseudo_queries(corpus, 10, seed=0) == ["Only one sentence of six words."]


def _data(queries, qrels):
    return RetrievalData(Path("."), _corpus(10), queries, qrels)


def test_training_queries_file_wins(tmp_path):
    path = tmp_path / "log.txt"
    path.write_text("from the file\n")
    data = _data({"q1": "own query"}, {})
    texts, source = training_queries(data, path, 50)
    assert texts == ["from the file"] and source == f"file:{path}"


def test_training_queries_own_queries_minus_non_train_judged():
    queries = {"q1": "train query", "q2": "test query", "q3": "unjudged query", "q4": "dev query", "q5": "  "}
    qrels = {"train": {"q1": {"d0": 1}}, "test": {"q2": {"d1": 1}}, "dev": {"q4": {"d2": 0}}}
    texts, source = training_queries(_data(queries, qrels), None, 50)
    assert texts == ["train query", "unjudged query"]
    assert source.startswith("queries.jsonl") and "2 judged test queries left out" in source


def test_training_queries_repeated_texts_once():
    texts, _ = training_queries(_data({"q1": "same", "q2": "same", "q3": "other"}, {}), None, 50)
    assert texts == ["same", "other"]


def test_training_queries_fall_back_to_pseudo_queries():
    queries = {"q1": "a test query"}
    data = _data(queries, {"test": {"q1": {"d0": 1}}})
    texts, source = training_queries(data, None, 12, seed=3)
    assert source == "pseudo-queries (corpus sentences)"
    assert texts == pseudo_queries(data.corpus, 12, 3) and len(texts) == 12
    texts2, _ = training_queries(_data({}, {}), None, 12, seed=3)
    assert texts2 == texts
