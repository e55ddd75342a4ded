"""Retrieval data in the BEIR layout, the de facto standard of the field.

    DIR/corpus.jsonl[.gz]   {"_id": str, "title": str (optional), "text": str} per line
    DIR/queries.jsonl[.gz]  {"_id": str, "text": str} per line
    DIR/qrels/SPLIT.tsv     header, then query-id <TAB> corpus-id <TAB> score (int)

Every problem is a `DataError` naming the file, the line number and what is wrong, because a
silently skipped line turns into a quietly wrong evaluation.
"""

from __future__ import annotations

import gzip
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from index.errors import JointPQError


class DataError(JointPQError, ValueError):
    """A data file is missing or malformed; the message names file and line."""


@dataclass
class RetrievalData:
    """A BEIR data set in memory; dicts keep the files' order."""

    path: Path
    corpus: dict[str, str]  # doc id -> "title text"
    queries: dict[str, str]  # query id -> text
    qrels: dict[str, dict[str, dict[str, int]]] = field(default_factory=dict)  # split -> qid -> docid -> score

    def split_queries(self, split: str) -> dict[str, str]:
        """The queries that have judgements in `split`, in queries-file order."""
        judged = self.qrels[split]
        return {q: t for q, t in self.queries.items() if q in judged}

    def subset(self, n_docs: int, seed: int = 0) -> RetrievalData:
        """A smaller corpus that keeps every judged document plus random others up to `n_docs`
        (so every qrel still points inside it): for quick runs and tests."""
        import random

        judged = {d for split in self.qrels.values() for docs in split.values() for d in docs}
        others = [d for d in self.corpus if d not in judged]
        keep = judged | set(random.Random(seed).sample(others, max(0, min(len(others), n_docs - len(judged)))))
        corpus = {d: t for d, t in self.corpus.items() if d in keep}
        return RetrievalData(self.path, corpus, dict(self.queries), {k: dict(v) for k, v in self.qrels.items()})

    def positives(self, split: str) -> dict[str, list[str]]:
        """qid -> relevant doc ids (score > 0) of `split`."""
        return {q: [d for d, s in docs.items() if s > 0] for q, docs in self.qrels[split].items()}


def _find(path: Path, stem: str) -> Path:
    for name in (f"{stem}.jsonl", f"{stem}.jsonl.gz"):
        if (path / name).is_file():
            return path / name
    raise DataError(f"{path}: no {stem}.jsonl or {stem}.jsonl.gz")


def _lines(path: Path) -> Iterator[tuple[int, str]]:
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rt", encoding="utf-8-sig") as f:  # a BOM (Windows tools) is not text
            for n, line in enumerate(f, 1):
                if line.strip():
                    yield n, line
    except (UnicodeDecodeError, OSError, EOFError) as e:
        raise DataError(f"{path.name}: unreadable ({e})") from None


def iter_jsonl(
    path: Path, text_fields: tuple[str, ...], id_keys: tuple[str, ...] = ("_id",)
) -> Iterator[tuple[str, str, str]]:
    """(where, id, the `text_fields` joined by a space) per line, streamed (a 1M-item catalog is
    never held whole); the id is the first of `id_keys` present."""
    for n, line in _lines(path):
        where = f"{path.name}:{n}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{where}: not valid JSON ({e.msg})") from None
        if not isinstance(obj, dict):
            raise DataError(f"{where}: expected a JSON object")
        key = next((k for k in id_keys if k in obj), id_keys[0])
        _id = obj.get(key)
        if not isinstance(_id, str) or not _id:
            raise DataError(f"{where}: {key!r} must be a non-empty string, got {_id!r}")
        if not isinstance(obj.get("text"), str):
            raise DataError(f"{where}: 'text' must be a string, got {obj.get('text')!r}")
        parts = []
        for field_name in text_fields:
            value = obj.get(field_name)
            if value is not None and not isinstance(value, str):
                raise DataError(f"{where}: {field_name!r} must be a string, got {type(value).__name__}")
            if value:
                parts.append(value)
        yield where, _id, " ".join(parts)


def read_jsonl(path: Path, text_fields: tuple[str, ...]) -> dict[str, str]:
    """id -> the `text_fields` joined by a space (missing optional fields skipped)."""
    out: dict[str, str] = {}
    for where, _id, text in iter_jsonl(path, text_fields):
        if _id in out:
            raise DataError(f"{where}: duplicate _id {_id!r}")
        out[_id] = text
    return out


def read_qrels(path: Path, queries: dict[str, str], corpus: dict[str, str]) -> dict[str, dict[str, int]]:
    """qid -> {docid: score}; every id must exist in the queries and the corpus."""
    if not path.is_file():
        raise DataError(f"{path}: no such qrels file")
    out: dict[str, dict[str, int]] = {}
    for n, line in _lines(path):
        cols = line.rstrip("\n").split("\t")
        if n == 1 and cols[0] == "query-id":
            continue
        where = f"{path.name}:{n}"
        if len(cols) != 3:
            raise DataError(f"{where}: expected 3 tab-separated columns (query-id, corpus-id, score), got {len(cols)}")
        qid, did, score = cols
        try:
            value = int(score)
        except ValueError:
            raise DataError(f"{where}: score {score!r} is not an integer") from None
        if qid not in queries:
            raise DataError(f"{where}: query-id {qid!r} is not in the queries file")
        if did not in corpus:
            raise DataError(f"{where}: corpus-id {did!r} is not in the corpus")
        out.setdefault(qid, {})[did] = value
    return out


def load_beir(path: str | Path, splits: tuple[str, ...] = ("train", "test"), optional: bool = False) -> RetrievalData:
    """Read a BEIR directory; `splits` names the qrels files to load (missing ones are an error,
    unless `optional`: then only the corpus must exist, as for label-free training)."""
    path = Path(path)
    if not path.is_dir():
        raise DataError(f"{path}: not a directory")
    corpus = read_jsonl(_find(path, "corpus"), ("title", "text"))
    try:
        queries = read_jsonl(_find(path, "queries"), ("text",))
    except DataError:
        if not optional:
            raise
        queries = {}
    data = RetrievalData(path, corpus, queries)
    for split in splits:
        qrels = path / "qrels" / f"{split}.tsv"
        if optional and not qrels.is_file():
            continue
        data.qrels[split] = read_qrels(qrels, queries, corpus)
    return data


def sample_labels(data: RetrievalData, split: str, n: int, seed: int = 0) -> RetrievalData:
    """`data` with only a seeded sample of `n` of `split`'s judged queries (the few-label regime,
    e.g. 100 of SciFact's 809); other splits untouched."""
    import random

    if split not in data.qrels:
        raise DataError(f"{data.path}: no qrels/{split}.tsv to sample labels from")
    qids = sorted(data.qrels[split])
    keep = set(random.Random(seed).sample(qids, min(n, len(qids))))
    qrels = {**data.qrels, split: {q: docs for q, docs in data.qrels[split].items() if q in keep}}
    return RetrievalData(data.path, data.corpus, data.queries, qrels)
