"""Training refuses inputs on which it would silently do nothing."""

from __future__ import annotations

from pathlib import Path

import pytest

from model.data import RetrievalData
from model.train import resolve_config, train


def test_fewer_pairs_than_a_batch_is_refused_not_zero_steps():
    corpus = {f"d{i}": f"document number {i} about topic {i % 3}" for i in range(40)}
    queries = {f"q{i}": f"topic {i}" for i in range(5)}
    qrels = {"train": {f"q{i}": {f"d{i}": 1} for i in range(5)}}
    data = RetrievalData(Path("."), corpus, queries, qrels)
    with pytest.raises(ValueError, match=r"5 training pairs in 'train', fewer than batch_size=32: no training step"):
        cfg = resolve_config("poeem", encoder="hashed", M=4, nlist=4, epochs=1, batch_size=32, seed=0, guard=False)
        train(data, cfg, progress=False)
