"""`distill`: learn the index without labels, from the float model's own ranking (Distill-VQ,
SIGIR 2022; LibVQ). Needs a corpus; queries come from a log, the data set, or the corpus itself
(`model.queries`).

Start: the two-step build (OPQ + IVF-PQ) over the frozen encoder's item embeddings. Learned:
the PQ codebooks and coarse centroids (Adam), the rotation (Givens steps, `IndexingLayer`) and,
with `--query-tower`, a residual linear head on the frozen query encoder. Items keep the
cells and codes of the start (Distill-VQ and LibVQ fix assignments: the codebooks learn score
corrections for the codes they were trained with; `--reassign` re-encodes every epoch, measured
in docs/benchmarks.md). Loss per batch (`model.distillation`): ListNet between the teacher's
scores and the index's full (coarse + ADC) and coarse scores over the union of the batch's
teacher top-K, plus `random_items` drawn from the whole corpus.
"""

from __future__ import annotations

import copy
import random
import time
from dataclasses import dataclass, replace
from typing import Any, ClassVar

import torch

from index.build import assemble
from index.encode import decode_rotated

from .. import distributed as ddp
from ..config import CommonConfig, ConfigError, option
from ..data import RetrievalData
from ..distillation import LOSSES, batch_candidates, distill_loss, teacher_top
from ..encoders import HeadEncoder
from ..guard import Guard, Validation, hold_aside, teacher_relevance
from ..layer import IndexingLayer
from ..queries import pseudo_queries, training_queries
from .base import (
    TrainInputs,
    TrainResult,
    base_embeddings,
    make_encoder,
    seed_everything,
    student_scores,
    two_step_start,
)


@dataclass
class DistillConfig(CommonConfig):
    mode = "distill"
    encoders = ("minilm",)
    by_encoder: ClassVar[dict[str, dict[str, Any]]] = {"minilm": {"lr": 1e-3}}

    epochs: int = option(30, "upper bound; the guard keeps the best epoch (SciFact: still +0.002/epoch at 25)")
    patience: int = option(8, "epochs without gain before stopping: the first 3-5 epochs dip below the start")
    query_tower: bool = option(
        False, "--query-tower: also train a residual head on the query encoder (SciFact M=8: -0.007 nDCG@10)"
    )
    min_queries: int = option(2000, "pseudo-queries top up real ones to this many (809 SciFact texts: +0.009 nDCG@10)")
    top_k: int = option(200, "teacher candidates per query (Distill-VQ: the dense top-200)")
    random_items: int = option(256, "items drawn from the whole corpus per batch: the tail must stay down too")
    loss: str = option("listnet", "most robust of five in Distill-VQ; margin-mse here: -0.08 nDCG@10", choices=LOSSES)
    temperature: float = option(0.05, "softmax temperature on cosine scores (0.03: no epoch beat the start)")
    coarse_weight: float = option(
        0.1, "weight of the coarse-score term (1.0: -0.01 to -0.02 nDCG@10 at M=8; cells share one coarse score)"
    )
    warmup_steps: int = option(0, "linear learning-rate warm-up steps (100 measured: the early dip stays)")
    codebook_lr: float = option(1e-3, "Adam on PQ codewords: 1e-4 moved too little in 20 short epochs")
    centroid_lr: float = option(1e-3, "Adam on coarse centroids (LibVQ: 1e-3)")
    rotation: bool = option(True, "learn the rotation by Givens steps (--no-rotation keeps OPQ's; +-0.001 measured)")
    rotation_lr: float = option(1e-3, "angle in radians of the steepest plane per step")
    reassign: bool = option(False, "re-encode items every epoch with the trained codebooks (measured: -0.014 nDCG@10)")

    def encoder_refusal(self) -> str:
        return "distill learns from a pretrained teacher; the hashed encoder is untrained"

    def validate(self) -> None:
        super().validate()
        for name in ("top_k", "temperature", "codebook_lr", "centroid_lr"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"--{name.replace('_', '-')} must be > 0, got {getattr(self, name)}")


class Student(torch.nn.Module):
    """The index's scoring as a differentiable module: rotation (Givens, in `layer`), coarse
    centroids and PQ codebooks (`layer`), fixed cells (n,) and codes (n, M) per corpus row, and
    an optional residual head on the frozen query encoder's output."""

    def __init__(self, layer: IndexingLayer, cells: torch.Tensor, codes: torch.Tensor, head: HeadEncoder | None):
        super().__init__()
        self.layer, self.head = layer, head
        self.register_buffer("cells", cells)
        self.register_buffer("codes", codes)

    def scores(self, queries: torch.Tensor, rows: torch.Tensor, metric: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, d) frozen query embeddings, (U,) corpus rows -> (full, coarse) scores (B, U), as the
        search engine computes them: coarse <R q', C[cell]>, full = coarse + ADC of the codes."""
        q = self.head(queries) if self.head is not None else queries
        qr = q @ self.layer.rotation_leaf().T
        coarse = self.layer.centroids[self.cells[rows]]  # (U, d)
        recon = decode_rotated(self.layer.centroids, self.layer.codebooks, self.cells[rows], self.codes[rows])
        return student_scores(qr, recon, metric), student_scores(qr, coarse, metric)

    def reassign(self, items: torch.Tensor, metric: str) -> None:
        """Re-encode every item with the current rotation, centroids and codebooks."""
        cells, codes = self.layer.quantizer().encode(items)
        dev = self.layer.centroids.device
        self.cells, self.codes = cells.to(dev), codes.to(dev).long()


def gather_queries(data: RetrievalData, inputs: TrainInputs, cfg: DistillConfig) -> tuple[list[str], str]:
    """(distinct training query texts, where they came from): the caller's (a query log), else the
    data set's or pseudo-queries (`model.queries.training_queries`), topped up with pseudo-queries
    to `min_queries` (measured on SciFact: 809 real texts + 1,191 pseudo taught the index more than
    the real texts alone, docs/benchmarks.md)."""
    if inputs.queries is not None:
        texts, source = inputs.queries, inputs.query_source or "given"
    else:
        texts, source = training_queries(data, None, cfg.min_queries, cfg.seed)
    texts = list(dict.fromkeys(t for t in texts if t.strip()))
    if len(texts) < cfg.min_queries:
        have = set(texts)
        extra = [t for t in pseudo_queries(data.corpus, cfg.min_queries, cfg.seed) if t not in have]
        extra = extra[: cfg.min_queries - len(texts)]
        if extra:
            texts, source = texts + extra, f"{source} + {len(extra)} pseudo-queries"
    return texts, source


def train(data: RetrievalData, cfg: DistillConfig, inputs: TrainInputs, progress: bool = True) -> TrainResult:
    """Under torchrun (`model.distributed`): every rank draws the same global batch and the same
    candidates (the union of the batch's teacher top-K + random items: the global batch's), then
    scores only its 1/N of the batch's queries over them. Its loss, the mean over its rows, is
    weighted by N x its share of the batch, so averaging the gradients over ranks gives the
    gradient of the global batch's mean, as in one process. The teacher's embeddings and top-K,
    the two-step start (k-means, OPQ, item assignment), any reassignment and the guard's scores
    come from rank 0."""
    from tqdm.auto import tqdm

    seed_everything(cfg.seed)
    dev = ddp.device(cfg.device)
    progress = progress and ddp.is_main()
    t0 = time.perf_counter()
    base = inputs.encoder if inputs.encoder is not None else make_encoder("minilm")
    if isinstance(base, HeadEncoder):
        base = base.base
    memo = inputs.memo if inputs.memo is not None else {}  # shared: the caller keeps what was encoded
    doc_ids = list(data.corpus)
    if inputs.item_embeddings is not None:
        xb = inputs.item_embeddings.float()
    else:
        xb = ddp.from_main(
            base.encode, [data.corpus[d] for d in doc_ids], progress=progress, desc="teacher: encode items"
        )
    texts, source = gather_queries(data, inputs, cfg)
    train_texts, val_texts = hold_aside(texts, cfg.val_fraction, cfg.val_min, cfg.val_max, cfg.seed)
    if not cfg.guard:
        train_texts, val_texts = texts, []
    ddp.check_same((doc_ids, train_texts, val_texts), "training queries or corpus")
    qt = ddp.from_main(base_embeddings, base, memo, train_texts)  # (Nq, d) teacher queries
    qv = ddp.from_main(base_embeddings, base, memo, val_texts)
    encode_seconds = time.perf_counter() - t0

    t1 = time.perf_counter()
    start = ddp.from_main(two_step_start, xb, doc_ids, cfg, inputs.start)  # k-means + assignment: rank 0's
    build_seconds = time.perf_counter() - t1
    # corpus order -> index row: cells and codes kept per corpus row
    row_of = {d: r for r, d in enumerate(start.ids)}
    perm = torch.tensor([row_of[d] for d in doc_ids])
    cells = start.cells()[perm].to(dev)
    codes = start.unpacked_codes()[perm].long().to(dev)
    layer = IndexingLayer(start.d, cfg.nlist, cfg.M, cfg.nbits, cfg.metric, rotation=cfg.rotation).to(dev)
    with torch.no_grad():
        layer.rotation.copy_(start.rotation.double())
        layer.centroids.copy_(start.centroids)
        layer.codebooks.copy_(start.codebooks)
        layer.initialized.fill_(True)
    head = HeadEncoder(base, memo).to(dev) if cfg.query_tower else None
    groups = [
        {"params": [layer.codebooks], "lr": cfg.codebook_lr},
        {"params": [layer.centroids], "lr": cfg.centroid_lr},
    ]
    if head is not None:
        groups.append({"params": list(head.head.parameters()), "lr": cfg.lr})
    opt = torch.optim.Adam(groups)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: min(1.0, (step + 1) / max(1, cfg.warmup_steps)))

    top = ddp.from_main(teacher_top, qt, xb, cfg.top_k)  # (Nq, K)
    xb_dev, qt_dev = xb.to(dev), qt.to(dev)
    student = Student(layer, cells, codes, head)

    def query_encoder():
        return copy.deepcopy(head).eval() if head is not None else base

    def snapshot():
        R = layer.rotation.float().detach().cpu()
        idx = assemble(
            cfg.metric, R, layer.centroids.detach().cpu(), layer.codebooks.detach().cpu(), student.cells.cpu(),
            student.codes.to(torch.uint8).cpu(), doc_ids, cfg.nbits,
        )  # fmt: skip
        return query_encoder(), idx

    validation = None
    guard: Guard = Guard(None, cfg.patience)
    teacher_val = None
    if val_texts:
        teacher_val = teacher_relevance(ddp.from_main(teacher_top, qv, xb, 10).numpy(), doc_ids)
        validation = Validation(val_texts, teacher_val, "recall@10", cfg.val_nprobe)
        guard = Guard(validation, cfg.patience)
        guard.start(ddp.from_main(validation.score, base, start), (base, start))
        if progress:
            print(f"distill: two-step start overlap@10 {guard.best_score:.4f} on {len(val_texts)} held-aside queries")

    gen = torch.Generator().manual_seed(cfg.seed)
    rng = random.Random(cfg.seed)
    history: list[dict[str, float]] = []
    t2 = time.perf_counter()
    order = list(range(len(train_texts)))
    stop = False
    learned = [p for g in groups for p in g["params"]]
    ddp.broadcast_([*learned, *layer.buffers()])  # as DDP starts: every rank from rank 0's weights
    for epoch in range(1, cfg.epochs + 1):
        rng.shuffle(order)
        bar = tqdm(range(0, len(order), cfg.batch_size), desc=f"distill epoch {epoch}", disable=not progress)
        layer.train()
        for s in bar:
            batch = torch.tensor(order[s : s + cfg.batch_size])
            cand = batch_candidates(top, batch, len(doc_ids), cfg.random_items, gen).to(dev)
            if ddp.is_distributed():
                row = _distributed_step(student, opt, learned, batch, cand, qt_dev, xb_dev, cfg)
            else:
                qb = qt_dev[batch.to(dev)]
                with torch.no_grad():
                    teacher = qb @ xb_dev[cand].T  # (B, U)
                full, coarse = student.scores(qb, cand, cfg.metric)
                loss_full = distill_loss(cfg.loss, teacher, full, cfg.temperature)
                loss_coarse = distill_loss(cfg.loss, teacher, coarse, cfg.temperature)
                loss = loss_full + cfg.coarse_weight * loss_coarse
                opt.zero_grad()
                loss.backward()
                row = {"loss": loss.item(), "full": loss_full.item(), "coarse": loss_coarse.item()}
            opt.step()
            sched.step()
            layer.rotation_step(cfg.rotation_lr * min(1.0, (len(history) + 1) / max(1, cfg.warmup_steps)))
            history.append({"step": len(history), **row})
            bar.set_postfix(loss=f"{row['loss']:.4f}")
            if cfg.max_seconds and ddp.agree(time.perf_counter() - t2 > cfg.max_seconds):
                stop = True
                break
        if cfg.reassign:  # item assignment: rank 0's, so every rank scores the same codes
            if ddp.is_main():
                student.reassign(xb_dev, cfg.metric)
            ddp.broadcast_([student.cells, student.codes])
        if validation is not None:
            qe, idx = snapshot()
            score = ddp.from_main(validation.score, qe, idx)
            if progress:
                print(f"distill: epoch {epoch} overlap@10 {score:.4f}")
            if guard.offer(epoch, score, lambda qe=qe, idx=idx: (qe, idx)):
                break
        if stop:
            break
    train_seconds = time.perf_counter() - t2
    state = layer.state_tensors() | {"cells": student.cells, "codes": student.codes}
    if head is not None:
        state |= {f"head.{k}": p for k, p in head.head.named_parameters()}
    record = ddp.check_identical(state, "distill: the quantizer or the query head")
    if record is not None:
        record["batch_per_rank"] = cfg.batch_size // record["world_size"]
    query_enc, index = guard.best if validation is not None else snapshot()
    if progress:
        print(guard.message("distill"))
    validation_record = guard.record() | {"query_source": source, "train_queries": len(train_texts)}
    canary = {"texts": val_texts[:32], "expected": [sorted(r) for r in (teacher_val or [])[:32]]} if val_texts else None
    timings = {"train_seconds": train_seconds, "encode_items_seconds": encode_seconds, "index_seconds": build_seconds}
    return TrainResult(
        query_enc, base, replace(index), history, timings, validation_record, canary, item_embeddings=xb,
        item_ids=doc_ids, distributed=record,
    )  # fmt: skip


def _distributed_step(
    student: Student,
    opt: torch.optim.Optimizer,
    learned: list[torch.Tensor],
    batch: torch.Tensor,
    cand: torch.Tensor,
    qt: torch.Tensor,
    xb: torch.Tensor,
    cfg: DistillConfig,
) -> dict[str, float]:
    """One rank's part of a step under torchrun: its rows `shard(len(batch))` of the global batch
    scored over the global batch's candidates `cand` (U,); backward of (N x share) x its mean
    loss, gradients averaged over ranks (= the gradient of the global mean); returns the global
    batch's mean losses (per-rank means weighted by share, summed over ranks). A rank with no
    rows (a last batch smaller than N) still joins the averaging, with zero gradients."""
    _, size = ddp.world()
    lo, hi = ddp.shard(len(batch))
    share = (hi - lo) / len(batch)
    opt.zero_grad()
    values = [0.0, 0.0, 0.0]
    if hi > lo:
        qb = qt[batch[lo:hi].to(qt.device)]
        with torch.no_grad():
            teacher = qb @ xb[cand].T  # (B_r, U)
        full, coarse = student.scores(qb, cand, cfg.metric)
        loss_full = distill_loss(cfg.loss, teacher, full, cfg.temperature)
        loss_coarse = distill_loss(cfg.loss, teacher, coarse, cfg.temperature)
        loss = loss_full + cfg.coarse_weight * loss_coarse
        (loss * (size * share)).backward()
        values = [share * loss.item(), share * loss_full.item(), share * loss_coarse.item()]
    ddp.average_gradients([*learned, student.layer.rotation_leaf()])
    total, full_v, coarse_v = ddp.all_reduce_sum(values)
    return {"loss": total, "full": full_v, "coarse": coarse_v}
