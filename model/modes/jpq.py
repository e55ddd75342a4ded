"""`jpq` (CIKM 2021): item embeddings fixed (the pretrained item encoder, computed once), the index
initialised by the two-step builder (OPQ + IVF-PQ); the query encoder and the PQ centroids (not
the assignments) learn with a LambdaRank-weighted pairwise loss on scores against PQ-reconstructed
items, hard negatives retrieved from the current PQ index each epoch (+ `distill_weight` x
ListNet against the frozen encoder's ranking). The two-step build is also the guard's start.
"""

from __future__ import annotations

import copy
import random
import time
from dataclasses import dataclass, replace
from typing import Any, ClassVar

import torch

from index import TorchSearcher, resolve_device
from index.ivfpq import IVFPQ

from ..config import option
from ..data import RetrievalData
from ..guard import Guard
from ..losses import lambda_pairwise
from .base import (
    DistillTerm,
    SupervisedConfig,
    TrainInputs,
    TrainResult,
    base_embeddings,
    labelled_validation,
    make_encoder,
    seed_everything,
    two_step_start,
)


@dataclass
class JpqConfig(SupervisedConfig):
    mode = "jpq"
    encoders = ("minilm", "minilm-head")
    by_encoder: ClassVar[dict[str, dict[str, Any]]] = {"minilm": {"lr": 5e-6}, "minilm-head": {"lr": 1e-3}}

    epochs: int = option(3, "each epoch re-mines negatives; the guard keeps the best (JPQ: a few epochs)")
    batch_size: int = option(32, "queries per step (a fine-tuned MiniLM step on a CPU costs ~0.3 s at 32)")
    codebook_lr: float = option(
        1e-4, "PQ centroids (JPQ: 5e-6 at M 16/24 up to 1e-4 at M >= 48; 1e-3 ends below its start)"
    )
    negatives: int = option(32, "hard negatives per query from the current index's top `hard_pool`")
    hard_pool: int = option(50, "mine among the top-`hard_pool` of the current index (JPQ: 200)")
    distill_top_k: int = option(100, "teacher candidates per query for the distillation term (cheap here)")

    def encoder_refusal(self) -> str:
        return (
            "jpq keeps a pretrained encoder's item embeddings fixed; the hashed encoder is untrained (use --mode poeem)"
        )


def train(data: RetrievalData, cfg: JpqConfig, inputs: TrainInputs, progress: bool = True) -> TrainResult:
    """`inputs.encoder` is the pretrained encoder (default: from `cfg.encoder`); `item_embeddings`
    (n, d) in corpus order skip encoding the corpus with it (e.g. a cache)."""
    from tqdm.auto import tqdm

    seed_everything(cfg.seed)
    dev = resolve_device(cfg.device)
    split = inputs.split
    item_enc = inputs.encoder if inputs.encoder is not None else make_encoder(cfg.encoder, memo=inputs.memo)
    query_enc = copy.deepcopy(item_enc).to(dev).train()
    doc_ids = list(data.corpus)
    t0 = time.perf_counter()
    item_embeddings = inputs.item_embeddings
    if item_embeddings is None:
        item_embeddings = item_enc.encode([data.corpus[d] for d in doc_ids], progress=progress, desc="encode items")
    if item_embeddings.shape != (len(doc_ids), item_enc.dim):
        raise ValueError(
            f"item embeddings are {tuple(item_embeddings.shape)}, expected ({len(doc_ids)}, {item_enc.dim})"
        )
    t1 = time.perf_counter()
    base = two_step_start(item_embeddings, doc_ids, cfg, inputs.start)
    build_seconds = time.perf_counter() - t1
    # fixed: rotation, centroids, assignments; trained: the codebooks and the query encoder
    R, C = base.rotation.to(dev), base.centroids.to(dev)
    codes, cells = base.unpacked_codes().long().to(dev), base.cells().to(dev)
    row_of = {d: r for r, d in enumerate(base.ids)}
    P = torch.nn.Parameter(base.codebooks.clone().to(dev))
    opt = torch.optim.AdamW([{"params": query_enc.parameters(), "lr": cfg.lr}, {"params": [P], "lr": cfg.codebook_lr}])
    positives = {q: set(docs) for q, docs in data.positives(split).items()}
    qids, validation = labelled_validation(data, split, cfg)
    rng = random.Random(cfg.seed)
    history: list[dict[str, float]] = []
    pool = cfg.hard_pool
    guard: Guard = Guard(validation, cfg.patience)
    if validation is not None:
        guard.start(validation.score(item_enc, base), (item_enc, base))
        if progress:
            print(f"jpq: two-step start nDCG@10 {guard.best_score:.4f} on {len(validation.texts)} held-aside queries")
    distill = None
    if cfg.distill_weight > 0:  # teacher rows in corpus order -> index rows for reconstruction
        texts = [data.queries[q] for q in qids]
        distill = DistillTerm.build(
            texts, base_embeddings(item_enc, inputs.memo, texts), item_embeddings.float(),
            cfg.distill_top_k, cfg.distill_temperature, cfg.seed,
        )  # fmt: skip
        index_row = torch.tensor([row_of[d] for d in doc_ids], device=dev)

    def current_index() -> IVFPQ:
        return replace(base, codebooks=P.detach().cpu().clone())

    def reconstruct(rows: torch.Tensor) -> torch.Tensor:  # (..., ) rows -> (..., d) x_hat' rotated
        parts = P[torch.arange(cfg.M, device=dev), codes[rows]]  # (..., M, dsub)
        return C[cells[rows]] + parts.reshape(*rows.shape, -1)

    t2 = time.perf_counter()
    stop = False
    for epoch in range(1, cfg.epochs + 1):
        q_emb = query_enc.encode([data.queries[q] for q in qids])
        _, ranked_rows = TorchSearcher(current_index(), "cpu").search_rows(q_emb, pool, cfg.nlist)
        cands = {}
        for q, rows in zip(qids, ranked_rows, strict=True):
            rows = [int(r) for r in rows if r >= 0]
            pos_rows = {row_of[d] for d in positives[q]}
            rank = {r: i + 1 for i, r in enumerate(rows)}
            negs = [r for r in rows if r not in pos_rows][: cfg.negatives]
            # sorted: a set's order follows the string hashes of the doc ids (PYTHONHASHSEED), and
            # rng.choice below picks by position, so an unsorted list made runs differ by process
            cands[q] = ([(r, rank.get(r, pool + 1)) for r in sorted(pos_rows)], [(r, rank[r]) for r in negs])
        order = list(qids)
        rng.shuffle(order)
        bar = tqdm(range(0, len(order), cfg.batch_size), desc=f"jpq epoch {epoch}", disable=not progress)
        for s in bar:
            batch = [q for q in order[s : s + cfg.batch_size] if cands[q][1]]
            if not batch:
                continue
            pos = [rng.choice(cands[q][0]) for q in batch]
            n_neg = min(len(cands[q][1]) for q in batch)
            negs = [cands[q][1][:n_neg] for q in batch]
            texts = [data.queries[q] for q in batch]
            qr = query_enc.embed(texts) @ R.T  # (B, d) rotated
            pos_rows = torch.tensor([r for r, _ in pos], device=dev)
            neg_rows = torch.tensor([[r for r, _ in n] for n in negs], device=dev)  # (B, N)
            s_pos = (qr * reconstruct(pos_rows)).sum(-1)
            s_neg = (qr[:, None, :] * reconstruct(neg_rows)).sum(-1)
            loss = lambda_pairwise(
                s_pos,
                s_neg,
                torch.tensor([k for _, k in pos], device=dev),
                torch.tensor([[k for _, k in n] for n in negs], device=dev),
            )
            row = {"step": len(history), "retrieval": loss.item(), "distortion": 0.0}
            if distill is not None:
                q_rows, cand = distill.candidates(texts)
                student = qr @ reconstruct(index_row[cand.to(dev)]).T
                loss_d = distill.loss(q_rows, cand, student)
                loss = loss + cfg.distill_weight * loss_d
                row["distill"] = loss_d.item()
            opt.zero_grad()
            loss.backward()
            opt.step()
            history.append(row | {"loss": loss.item()})
            bar.set_postfix(loss=f"{loss.item():.4f}")
            if cfg.max_seconds and time.perf_counter() - t2 > cfg.max_seconds:
                stop = True
                break
        if validation is not None:
            idx = current_index()
            score = validation.score(query_enc, idx)
            if progress:
                print(f"jpq: epoch {epoch} nDCG@10 {score:.4f}")
            if guard.offer(epoch, score, lambda idx=idx: (copy.deepcopy(query_enc).eval(), idx)):
                break
        if stop:
            break
    query_out, index = (query_enc, current_index()) if validation is None else guard.best
    if progress:
        print(guard.message("jpq"))
    timings = {
        "train_seconds": time.perf_counter() - t2,
        "encode_items_seconds": t1 - t0,
        "index_seconds": build_seconds,
    }
    return TrainResult(
        query_out.eval(),
        item_enc.eval(),
        index,
        history,
        timings,
        guard.record(),
        item_embeddings=item_embeddings,
        item_ids=doc_ids,
    )
