"""Data-parallel training under torchrun (`model.distributed`): 2 CPU processes (gloo) train poeem
and distill along the same loss trajectory as one process with the same global batch and seed,
and end with bit-identical weights, rotation, centroids and codebooks on both ranks.

The 2-process runs are real: `torchrun --nproc_per_node 2` starts this file as a worker (the
`__main__` block below), which trains both modes in one process group and saves each rank's
history and final index. The one-process references train in the pytest process.

Small, fast cases on the shipped SciFact demo subset (no shared data, no transformer): a frozen
hashed n-gram encoder stands in for MiniLM under the trainable heads, as in tests/model/test_distill.py.

Tolerance. Both runs compute the same global loss and gradient, but not with the same float
operations: the ranks sum their halves of each gradient (all-reduce) where one process sums the
whole batch at once, the distill loss is a weighted sum of half-batch means, and a rank embeds
8 texts where one process embeds 16. These are float32 rounding differences, ~1e-7 relative.
Distill (fixed codes) carries them forward smoothly: measured worst 1.3e-7 over 18 steps, rtol
1e-5. Poeem goes through discontinuities, the nearest-codeword argmin of every item and the
greedy choice of Givens planes for the rotation: a near-tie that rounds the other way moves one
step's loss by ~1e-5 (measured worst 3.1e-5 over 20 steps, seeds 1-3: <= 6e-6), rtol 3e-4.
(At 10x the learning rate, 1e-2, such flips compound to 4e-2 by step 20: expected float
chaos, not a distribution error; rotation off, 5e-6.) Errors of the distribution itself show
up at once and far above this: a rank's half missing from the in-batch negatives or sampling
that differs by rank change the very first loss. Gradient scale errors (a factor N, a rank's
contribution missing) hide from loss curves under Adam, so the gradients of one global batch
are compared directly (`test_two_processes_compute_the_one_process_gradient`: measured 1e-7
relative; the two such errors tried give 0.5 and 1.0).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
DEMO = ROOT / "data" / "scifact-demo"
# relative tolerance on every logged loss term, per mode (see the module docstring)
RTOL = {"poeem": 3e-4, "distill": 1e-5}


def _frozen_hashed(dim: int = 64):
    from model.encoders import HashedNgramEncoder

    torch.manual_seed(0)
    enc = HashedNgramEncoder(dim=dim).eval()
    with torch.no_grad():  # random biases would dominate the tiny averaged n-gram vectors: all texts alike
        for layer in enc.mlp:
            if isinstance(layer, torch.nn.Linear):
                layer.bias.zero_()
    return enc.requires_grad_(False)


def poeem_case():
    """(data, cfg, inputs): 800 demo abstracts, 160 labelled queries; trainable heads on a frozen
    hashed base (two towers), hard negatives, warm start at step 4, catalog items, the
    distillation term and the guard (validation every epoch): every distributed path of poeem."""
    from model.data import load_beir, sample_labels
    from model.encoders import HeadEncoder
    from model.modes import TrainInputs
    from model.train import resolve_config

    data = sample_labels(load_beir(DEMO).subset(800, seed=0), "train", 160, seed=0)
    cfg = resolve_config(
        "poeem", encoder="minilm-head", M=8, nlist=16, epochs=2, batch_size=16, warmup_steps=4, catalog_items=8,
        distill_weight=0.5, distill_top_k=20, val_min=10, seed=0,
    )  # fmt: skip
    return data, cfg, TrainInputs(encoder=HeadEncoder(_frozen_hashed()))


def distill_case():
    """(data, cfg, inputs): 600 demo abstracts, no labels (pseudo-queries), a hashed teacher, the
    query tower on, 180 training queries in batches of 32 (the last one of 20: uneven shares)."""
    from model.data import RetrievalData, load_beir
    from model.modes import TrainInputs
    from model.modes.distill import DistillConfig

    full = load_beir(DEMO)
    data = RetrievalData(full.path, dict(list(full.corpus.items())[:600]), {}, {})
    cfg = DistillConfig(
        M=8, nlist=16, epochs=3, min_queries=200, top_k=50, random_items=64, val_min=20, patience=6, batch_size=32,
        lr=1e-3, seed=0, query_tower=True,
    )  # fmt: skip
    return data, cfg, TrainInputs(encoder=_frozen_hashed())


CASES = {"poeem": poeem_case, "distill": distill_case}


def _demo_texts() -> tuple[list[str], list[str]]:
    from model.data import load_beir

    data = load_beir(DEMO)
    return list(data.queries.values())[:40], list(data.corpus.values())[:400]


def poeem_gradients() -> dict[str, torch.Tensor]:
    """One global batch as poeem computes it: 12 queries, their 12 items + 5 negatives (17 items:
    shares of 9 and 8 on 2 ranks), gathered (`embed_sharded`) through a warm-started layer,
    in-batch softmax + distortion; after backward (and, under torchrun, `average_gradients`)
    the gradients of the head, centroids, codebooks and rotation."""
    from model import distributed
    from model.encoders import HeadEncoder
    from model.layer import IndexingLayer
    from model.losses import contrastive

    queries, docs = _demo_texts()
    enc = HeadEncoder(_frozen_hashed())
    with torch.no_grad():  # a non-identity head: its gradient is not the special zero case
        enc.head.weight.normal_(std=0.05, generator=torch.Generator().manual_seed(1))
    layer = IndexingLayer(64, 8, 8)
    layer.warm_start(enc.encode(docs), seed=0, niter=5)
    q = distributed.embed_sharded(enc, queries[:12])
    items, distortion = layer(distributed.embed_sharded(enc, docs[:12] + docs[100:105]))
    loss = contrastive(q, items[:12], items[12:], 0.05) + distortion
    loss.backward()
    learned = [*enc.head.parameters(), layer.centroids, layer.codebooks]
    if distributed.is_distributed():
        distributed.average_gradients([*learned, layer.rotation_leaf()])
    names = ("head.weight", "head.bias", "centroids", "codebooks")
    return {n: p.grad for n, p in zip(names, learned, strict=True)} | {"rotation": layer.rotation_leaf().grad}


def distill_gradients() -> dict[str, torch.Tensor]:
    """One global batch of 7 queries as distill computes it (under torchrun: shares of 4 and 3,
    `_distributed_step`): ListNet on full + coarse scores over 60 candidates; the gradients of the
    query head, centroids, codebooks and rotation."""
    from index import build_ivfpq
    from model import distributed
    from model.distillation import distill_loss
    from model.encoders import HeadEncoder
    from model.layer import IndexingLayer
    from model.modes.distill import DistillConfig, Student, _distributed_step

    queries, docs = _demo_texts()
    teacher = _frozen_hashed()
    xb, qt = teacher.encode(docs), teacher.encode(queries)
    start = build_ivfpq(xb, nlist=8, M=8, opq=True, seed=0, niter=5)
    layer = IndexingLayer(64, 8, 8)
    with torch.no_grad():
        layer.rotation.copy_(start.rotation.double())
        layer.centroids.copy_(start.centroids)
        layer.codebooks.copy_(start.codebooks)
        layer.initialized.fill_(True)
    perm = torch.tensor([int(i) for i in start.ids]).argsort()  # corpus row -> index row
    head = HeadEncoder(teacher)
    with torch.no_grad():
        head.head.weight.normal_(std=0.05, generator=torch.Generator().manual_seed(1))
    student = Student(layer, start.cells()[perm], start.unpacked_codes()[perm].long(), head)
    cfg = DistillConfig(M=8, nlist=8, coarse_weight=0.1)
    batch, cand = torch.arange(3, 10), torch.arange(0, 400, 7)[:60]
    learned = [*head.head.parameters(), layer.centroids, layer.codebooks]
    if distributed.is_distributed():
        _distributed_step(student, torch.optim.SGD(learned, lr=0.0), learned, batch, cand, qt, xb, cfg)
    else:
        qb = qt[batch]
        full, coarse = student.scores(qb, cand, cfg.metric)
        teacher_scores = qb @ xb[cand].T
        loss = distill_loss(cfg.loss, teacher_scores, full, cfg.temperature)
        (loss + cfg.coarse_weight * distill_loss(cfg.loss, teacher_scores, coarse, cfg.temperature)).backward()
    names = ("head.weight", "head.bias", "centroids", "codebooks")
    return {n: p.grad for n, p in zip(names, learned, strict=True)} | {"rotation": layer.rotation_leaf().grad}


GRADIENTS = {"poeem": poeem_gradients, "distill": distill_gradients}


def _summary(result) -> dict:
    idx = result.index
    return {
        "history": result.history,
        "distributed": result.distributed,
        "validation": result.validation,
        "index": {
            "rotation": idx.rotation,
            "centroids": idx.centroids,
            "codebooks": idx.codebooks,
            "codes": idx.codes,
            "ids": list(idx.ids),
        },
    }


def _worker(out: Path) -> None:
    """torchrun's entry: train every case in this rank, save its summary and timings."""
    from model import distributed
    from model.train import train

    distributed.init("cpu")
    for mode, grads in GRADIENTS.items():
        torch.save(grads(), out / f"grad-{mode}-rank{distributed.world()[0]}.pt")
    for mode, case in CASES.items():
        data, cfg, inputs = case()
        t0 = time.perf_counter()
        result = train(data, cfg, inputs, progress=False)
        summary = _summary(result) | {"seconds": time.perf_counter() - t0}
        torch.save(summary, out / f"{mode}-rank{distributed.world()[0]}.pt")
    distributed.shutdown()


def _torchrun(args: list[str], nproc: int = 2, timeout: float = 300) -> subprocess.CompletedProcess:
    """`torchrun --standalone` (a local rendezvous on a free loopback port: no port race) with
    one thread per rank, from the repository root."""
    env = os.environ | {"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc), *args]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"torchrun failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return proc


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    """Both cases trained by 2 processes: {mode: [rank 0 summary, rank 1 summary]}."""
    out = tmp_path_factory.mktemp("ddp")
    _torchrun([str(Path(__file__).resolve()), str(out)])
    runs = {mode: [torch.load(out / f"{mode}-rank{r}.pt", weights_only=False) for r in (0, 1)] for mode in CASES}
    grads = {f"grad-{m}": [torch.load(out / f"grad-{m}-rank{r}.pt") for r in (0, 1)] for m in GRADIENTS}
    return runs | grads


def _worst_relative(a: list[float], b: list[float]) -> float:
    return max(abs(x - y) / max(abs(y), 1e-12) for x, y in zip(a, b, strict=True))


@pytest.mark.slow
@pytest.mark.parametrize("mode", list(GRADIENTS))
def test_two_processes_compute_the_one_process_gradient(two_ranks, mode):
    """The scaling argument, checked: gathered embeddings + a loss every rank computes whole
    (poeem), or each rank's mean over its rows weighted by N x its share (distill), then the
    mean over ranks, is one process's gradient of the global batch (uneven shares included).
    With Adam a gradient off by a factor N would barely show in the losses: it is checked here."""
    want = GRADIENTS[mode]()
    got = [two_ranks[f"grad-{mode}"][r] for r in (0, 1)]
    for name, g in want.items():
        assert g is not None and g.abs().sum() > 0, name
        assert torch.equal(got[0][name], got[1][name]), name  # averaged: the same on both ranks
        torch.testing.assert_close(got[0][name], g, rtol=1e-5, atol=1e-7, msg=lambda m, n=name: f"{mode} {n}: {m}")


@pytest.mark.slow
@pytest.mark.parametrize("mode", list(CASES))
def test_two_processes_follow_the_one_process_trajectory(two_ranks, mode):
    from model.train import train

    data, cfg, inputs = CASES[mode]()
    one = _summary(train(data, cfg, inputs, progress=False))
    rank0, rank1 = two_ranks[mode]
    assert one["distributed"] is None  # one process: nothing distributed, nothing recorded
    assert len(rank0["history"]) == len(one["history"]) >= 15
    # every logged term of every step: the global batch's loss, as one process computes it
    for key in one["history"][0]:
        if key == "step":
            continue
        ours, ref = [h[key] for h in rank0["history"]], [h[key] for h in one["history"]]
        worst = _worst_relative(ours, ref)
        assert worst <= RTOL[mode], f"{mode} {key}: worst relative difference {worst:.2e} over {len(ref)} steps"
    assert rank1["history"] == rank0["history"]  # both ranks log the same (global) losses
    if mode == "poeem":
        assert any(h["distortion"] > 0 for h in one["history"])  # the quantized phase ran
        assert one["history"][0]["distortion"] == 0  # and the unquantized one before it
    # the guard saw the same validation scores and picked the same epoch
    assert [c["epoch"] for c in rank0["validation"]["curve"]] == [c["epoch"] for c in one["validation"]["curve"]]
    assert rank0["validation"]["selected_epoch"] == one["validation"]["selected_epoch"]
    torch.testing.assert_close(rank0["index"]["codebooks"], one["index"]["codebooks"], rtol=1e-3, atol=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize("mode", list(CASES))
def test_every_rank_ends_with_the_same_quantizer(two_ranks, mode):
    rank0, rank1 = two_ranks[mode]
    for name in ("rotation", "centroids", "codebooks", "codes"):
        assert torch.equal(rank0["index"][name], rank1["index"][name]), name
    assert rank0["index"]["ids"] == rank1["index"]["ids"]
    record = rank0["distributed"]
    assert record["world_size"] == 2 and record["backend"] == "gloo"
    assert record["batch_per_rank"] == (8 if mode == "poeem" else 16)
    digests = record["state_sha256"]  # each rank's own hash of its weights and quantizer
    assert len(digests) == 2 and digests[0] == digests[1]
    assert rank1["distributed"] == record


@pytest.mark.slow
def test_jointpq_train_under_torchrun_writes_one_artifact(tmp_path):
    """`torchrun --nproc_per_node 2 -m service.cli train`: both ranks train, rank 0 alone writes
    the artifact and the loss log and prints the summary; the manifest records the distribution.
    (The hashed encoder: no MiniLM needed; its 33M-weight table makes each step ~1 s on a CPU.)"""
    out, log = tmp_path / "art", tmp_path / "loss.jsonl"
    proc = _torchrun(
        ["-m", "service.cli", "train", "--mode", "poeem", "--data", str(DEMO), "--encoder", "hashed", "--preset",
         "smoke", "--max-docs", "600", "--label-sample", "40", "--batch-size", "16", "--epochs", "1",
         "--warmup-steps", "1", "--no-guard", "--out", str(out), "--loss-log", str(log)]
    )  # fmt: skip
    summaries = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert len(summaries) == 1, proc.stdout  # printed once, by rank 0
    summary = summaries[0]
    assert summary["world_size"] == 2 and summary["backend"] == "gloo" and summary["steps"] >= 2
    training = json.loads((out / "manifest.json").read_text())["training"]
    record = training["distributed"]
    assert record["world_size"] == 2 and record["backend"] == "gloo" and record["batch_per_rank"] == 8
    assert record["state_sha256"][0] == record["state_sha256"][1]
    assert training["config"]["batch_size"] == 16  # the global batch, as configured
    rows = [json.loads(line) for line in log.read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(summary["steps"]))
    assert rows[-1]["loss"] == training["final_loss"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["art", "loss.jsonl"]  # nothing else written


def test_one_process_helpers_are_no_ops():
    """Without torchrun nothing communicates and every helper hands its input back."""
    from model import distributed
    from model.encoders import HeadEncoder

    assert not distributed.launched() or os.environ.get("WORLD_SIZE") == "1"
    assert distributed.world() == (0, 1) and distributed.is_main() and distributed.record() is None
    assert distributed.init("cpu") == torch.device("cpu") and not distributed.is_distributed()
    assert distributed.shard(10) == (0, 10) and distributed.shard_sizes(10) == [10]
    x = torch.randn(3, 4, requires_grad=True)
    assert distributed.all_gather(x) is x
    assert distributed.from_main(lambda a, b: a + b, 1, b=2) == 3
    assert distributed.broadcast_object({"a": [1]}) == {"a": [1]} and distributed.agree(True)
    assert distributed.all_reduce_sum([1.5, 2.0]) == [1.5, 2.0]
    assert distributed.check_identical({"x": x}, "x") is None
    enc = HeadEncoder(_frozen_hashed())
    torch.testing.assert_close(distributed.embed_sharded(enc, ["a b c", "d e f"]), enc.embed(["a b c", "d e f"]))
    distributed.shutdown()  # nothing to leave


def test_shares_and_refusals_for_a_world_of_three(monkeypatch):
    """The global batch splits into contiguous shares (first ranks one more); a batch size that
    does not divide by the ranks, and a mode that does not train data-parallel, are refused."""
    from model import distributed
    from model.config import ConfigError
    from model.train import check_distributed, resolve_config

    monkeypatch.setattr(distributed, "world", lambda: (1, 3))
    assert distributed.shard_sizes(8) == [3, 3, 2] and distributed.shard(8) == (3, 6)
    assert distributed.shard_sizes(2) == [1, 1, 0]
    check_distributed(resolve_config("poeem", encoder="hashed", batch_size=30))
    with pytest.raises(ConfigError, match=r"--batch-size 32 must divide by the 3 processes"):
        check_distributed(resolve_config("poeem", encoder="hashed", batch_size=32))
    with pytest.raises(ConfigError, match=r"--mode jpq trains in one process"):
        check_distributed(resolve_config("jpq", batch_size=30))


if __name__ == "__main__":  # torchrun's worker: torchrun --standalone --nproc_per_node 2 test_distributed.py OUT
    torch.set_num_threads(1)
    _worker(Path(sys.argv[1]))
