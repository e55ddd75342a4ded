"""Where label-free training gets its queries, in order of preference:

1. `--queries FILE`: the user's query log, one text a line, or JSONL objects with a "text" field
   (`read_query_file`; errors name the file and line);
2. the data set's own queries.jsonl, minus the queries judged in a test split (those stay unseen:
   they are what the user will evaluate on);
3. pseudo-queries cut from the corpus (`pseudo_queries`): one sentence of a random document each,
   offline, no model to download. Measured on a collection kept aside (`../shared/docs/anchors.md`):
   2,000 such sentences taught the index better than 47 real query texts.
"""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

from .data import DataError, RetrievalData, _lines

_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z0-9\"'(\[])")
_WORD = re.compile(r"\w+")


def read_query_file(path: str | Path) -> list[str]:
    """Query texts from a plain-text file (a line each) or JSONL ({"text": ...} a line; chosen by
    the first non-empty line starting with "{"); blank lines skipped, exact repeats kept once."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such queries file")
    texts: list[str] = []
    jsonl: bool | None = None
    for n, line in _lines(path):
        where = f"{path.name}:{n}"
        if jsonl is None:
            jsonl = line.lstrip().startswith("{")
        if not jsonl:
            texts.append(line.strip())
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(
                f"{where}: not valid JSON ({e.msg}); a JSONL queries file needs one object a line"
            ) from None
        if not isinstance(obj, dict) or not isinstance(obj.get("text"), str) or not obj["text"].strip():
            raise DataError(f"{where}: expected an object with a non-empty string 'text'")
        texts.append(obj["text"].strip())
    texts = list(dict.fromkeys(texts))
    if not texts:
        raise DataError(f"{path}: holds no query")
    return texts


def sentences(text: str, min_words: int = 5, max_words: int = 48) -> list[str]:
    """The sentences of `text` with between `min_words` and `max_words` words (a query's size)."""
    out = []
    for s in _SENTENCE_END.split(text):
        n = len(_WORD.findall(s))
        if min_words <= n <= max_words:
            out.append(s.strip())
    return out


def pseudo_queries(corpus: dict[str, str], n: int, seed: int = 0, max_words: int = 48) -> list[str]:
    """`n` distinct pseudo-queries: a random sentence of a random document each, cut to a random
    window of `max_words` words when longer (documents without a query-sized sentence give their
    first 32 words). Seeded; no model needed."""
    rng = random.Random(seed)
    docs = [t for t in corpus.values() if t.strip()]
    if not docs:
        raise DataError("pseudo-queries need a corpus with text: every document is empty")
    out: dict[str, None] = {}
    tries = 0
    while len(out) < n and tries < 20 * n:
        tries += 1
        text = docs[rng.randrange(len(docs))]
        options = sentences(text) or [" ".join(text.split()[:32])]
        choice = options[rng.randrange(len(options))]
        words = choice.split()
        if len(_WORD.findall(choice)) > max_words and len(words) > max_words:  # sentences() counts \w+ words
            start = rng.randrange(len(words) - max_words + 1)
            choice = " ".join(words[start : start + max_words])
        if choice:
            out.setdefault(choice, None)
    return list(out)


def training_queries(
    data: RetrievalData, query_file: str | Path | None, n_pseudo: int, seed: int = 0
) -> tuple[list[str], str]:
    """(texts, source) for a label-free run; `source` is what the manifest records."""
    if query_file is not None:
        return read_query_file(query_file), f"file:{query_file}"
    held_out = {q for split, judged in data.qrels.items() if split != "train" for q in judged}
    own = list(dict.fromkeys(t for q, t in data.queries.items() if q not in held_out and t.strip()))
    if own:
        return own, f"queries.jsonl ({len(held_out)} judged test queries left out)"
    return pseudo_queries(data.corpus, n_pseudo, seed), "pseudo-queries (corpus sentences)"
