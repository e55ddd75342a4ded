"""`poeem` (SIGIR 2021): query tower, item tower and the IndexingLayer trained end to end.

Items pass through the layer in the forward pass (straight-through); loss = in-batch softmax with
mined hard negatives + distortion (+ `distill_weight` x ListNet against the frozen base model's
ranking). The layer runs unquantized for `warmup_steps`, is then warm-started by k-means on item
embeddings, then quantizes; R takes a Givens step after every optimiser step. With the guard on
(default), every epoch's index is validated on held-aside labelled queries against the two-step
start (OPQ + IVF-PQ over the untrained towers' embeddings).
"""

from __future__ import annotations

import copy
import random
import time
from dataclasses import dataclass, replace
from typing import Any, ClassVar

import torch

from index import TorchSearcher, exact_search
from index.ivfpq import IVFPQ

from .. import distributed as ddp
from ..config import ConfigError, option
from ..data import RetrievalData
from ..encoders import HeadEncoder, TextEncoder
from ..guard import Guard
from ..layer import IndexingLayer
from ..losses import contrastive
from .base import (
    DistillTerm,
    SupervisedConfig,
    TrainInputs,
    TrainResult,
    base_embeddings,
    labelled_validation,
    make_encoder,
    seed_everything,
    snapshot_encoder,
    two_step_start,
)


@dataclass
class PoeemConfig(SupervisedConfig):
    mode = "poeem"
    encoders = ("minilm-head", "hashed", "minilm")
    by_encoder: ClassVar[dict[str, dict[str, Any]]] = {
        # catalog_items 64 measured with minilm-head only (bench/live.py, SciFact, 3 seeds; docs/benchmarks.md)
        "minilm-head": {"lr": 1e-3, "shared_towers": False, "warmup_steps": 30, "catalog_items": 64},
        "hashed": {"lr": 5e-3, "shared_towers": True, "warmup_steps": 40, "catalog_items": 0},
        "minilm": {"lr": 5e-6, "shared_towers": False, "warmup_steps": 30, "catalog_items": 0},
    }

    encoder: str = option(
        "minilm-head", "frozen MiniLM + trainable heads: end to end on a CPU (hashed: from scratch, minilm: full)",
        choices=("minilm-head", "hashed", "minilm"),
    )  # fmt: skip
    shared_towers: bool | None = option(None, "one encoder for queries and items (hashed: small data favours it)")
    dim: int = option(128, "hashed encoder output width (MiniLM: 384, fixed)")
    warmup_steps: int | None = option(None, "unquantized steps before the k-means warm start (Poeem: 1024)")
    warm_items: int = option(8192, "items encoded for the warm-start k-means (Poeem: 8192)")
    warm_start_iters: int = option(20, "k-means iterations of the warm start")
    warm_start: bool = option(True, "k-means warm start (ablation --no-warm-start: random codebooks, -0.29 nDCG@10)")
    quantize: bool = option(True, "--no-quantize: the two-step ablation (train unquantized, OPQ + IVF-PQ after)")
    rotation: bool = option(True, "learn R by Givens steps (ablation: --no-rotation)")
    rotation_lr: float = option(1e-3, "angle in radians of the steepest plane per step")
    refit: bool = option(
        True, "once the guard picks epoch e, retrain on every labelled query (held-aside too) for e epochs"
    )
    commitment: float = option(0.25, "beta of the distortion loss: the encoder commits to the codebooks (VQ-VAE)")
    distortion_weight: float = option(1.0, "weight of the distortion loss beside the retrieval loss")
    temperature: float = option(0.05, "in-batch softmax temperature on cosine scores")
    hard_negatives: int = option(1, "per query, mined from the current index each epoch")
    hard_pool: int = option(50, "mine among the top-`hard_pool` retrieved, positives excluded")
    catalog_items: int | None = option(
        None,
        "random corpus items per step in the distortion loss, so the quantizer fits the catalog and new items"
        " (0: only the batch's items, as Poeem; minilm-head: 64, measured +0.016 nDCG@10 at M 16)",
    )

    def encoder_refusal(self) -> str:
        return "unknown encoder"

    def validate(self) -> None:
        super().validate()
        if self.catalog_items is not None and self.catalog_items < 0:
            raise ConfigError(f"--catalog-items must be >= 0, got {self.catalog_items}")
        if self.distill_weight > 0 and self.encoder != "minilm-head":
            raise ConfigError(
                "--distill-weight needs --encoder minilm-head in poeem (a frozen pretrained teacher);"
                f" got {self.encoder}"
            )


def mine_hard_negatives(
    q_emb, index: IVFPQ | None, d_emb, qids, positives, doc_ids, pool: int, nprobe: int
) -> dict[str, list[str]]:
    """qid -> doc ids ranked in the top `pool` by the current index (or exact search before the
    warm start) that are not positives: the confusions the model must learn to separate."""
    if index is not None:
        _, rows = TorchSearcher(index, "cpu").search_rows(q_emb, pool, nprobe)
        ranked = [[index.ids[r] for r in row if r >= 0] for row in rows]
    else:
        _, rows = exact_search(q_emb, d_emb, pool, "ip", device="cpu")
        ranked = [[doc_ids[r] for r in row if r >= 0] for row in rows]
    return {q: [d for d in r if d not in positives[q]] for q, r in zip(qids, ranked, strict=True)}


def train(data: RetrievalData, cfg: PoeemConfig, inputs: TrainInputs, progress: bool = True) -> TrainResult:
    """Under torchrun (`model.distributed`): each rank embeds its 1/N of every global batch's
    queries, positives, negatives and catalog items; the embeddings are all-gathered, so every
    rank computes the loss of the whole global batch, as one process would; the gather hands each
    rank N x its rows' gradient and averaging over ranks divides by N: one process's gradient.
    Hard negatives, the k-means warm start, the two-step start and the guard's scores come from
    rank 0; corpus encoding and the final indexing run on every rank (deterministic, identical)."""
    from tqdm.auto import tqdm

    seed_everything(cfg.seed)
    dev = ddp.device(cfg.device)
    progress = progress and ddp.is_main()
    split = inputs.split
    item_enc = (inputs.encoder or make_encoder(cfg.encoder, cfg.dim, inputs.memo)).to(dev)
    if isinstance(item_enc, HeadEncoder) and inputs.memo:
        item_enc.memo.update(inputs.memo)
    if cfg.shared_towers:
        query_enc = item_enc
    elif isinstance(item_enc, HeadEncoder):  # share the frozen base (and its memo), not the head
        query_enc = HeadEncoder(item_enc.base, item_enc.memo).to(dev)
    else:
        query_enc = copy.deepcopy(item_enc)
    layer = IndexingLayer(
        item_enc.dim, cfg.nlist, cfg.M, cfg.nbits, cfg.metric, rotation=cfg.rotation, beta=cfg.commitment
    ).to(dev)
    params = list({id(p): p for p in [*item_enc.parameters(), *query_enc.parameters(), *layer.parameters()]}.values())
    trainable = [p for p in params if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=cfg.lr)
    ddp.broadcast_([*trainable, *layer.buffers()])  # as DDP starts: every rank from rank 0's weights
    doc_ids = list(data.corpus)
    doc_texts = [data.corpus[d] for d in doc_ids]
    positives = {q: set(docs) for q, docs in data.positives(split).items()}
    qids, validation = labelled_validation(data, split, cfg)
    train_set = set(qids)
    pairs = [(q, d) for q, docs in data.qrels[split].items() if q in train_set for d, s in docs.items() if s > 0]
    rng = random.Random(cfg.seed)
    ddp.check_same(pairs, "training pairs")
    if cfg.epochs and len(pairs) < cfg.batch_size:  # the loop below would run no step, silently
        raise ValueError(
            f"{len(pairs)} training pairs in {split!r}, fewer than batch_size={cfg.batch_size}: no training step"
            " would run; lower the batch size or give more labelled queries"
        )
    guard: Guard = Guard(validation, cfg.patience)
    t0 = time.perf_counter()
    d_emb = item_enc.encode(doc_texts, progress=progress, desc="encode items")
    if validation is not None:  # the two-step start: the untrained towers' embeddings, OPQ + IVF-PQ
        start = ddp.from_main(two_step_start, d_emb, doc_ids, cfg, inputs.start)
        guard.start(ddp.from_main(validation.score, query_enc, start), (*towers(query_enc, item_enc), start, d_emb))
        if progress:
            print(f"poeem: two-step start nDCG@10 {guard.best_score:.4f} on {len(validation.texts)} held-aside queries")
    distill = None
    if cfg.distill_weight > 0:
        texts = [data.queries[q] for q in qids]
        base = item_enc.base if isinstance(item_enc, HeadEncoder) else item_enc
        distill = DistillTerm.build(
            texts, base_embeddings(base, item_enc.memo, texts), base_embeddings(base, item_enc.memo, doc_texts),
            cfg.distill_top_k, cfg.distill_temperature, cfg.seed,
        )  # fmt: skip
        distill.top = ddp.from_main(lambda: distill.top)  # one teacher ranking steers every rank's candidates
    start_seconds = time.perf_counter() - t0
    history: list[dict[str, float]] = []
    step, hard, index = 0, {}, None
    t1 = time.perf_counter()
    stop, validated, epoch_run = False, True, 0
    for epoch in range(1, cfg.epochs + 1):
        epoch_run = epoch
        if cfg.hard_negatives:  # mine from the current model (index once quantized); on rank 0, broadcast
            if ddp.is_main():
                q_emb = query_enc.encode([data.queries[q] for q in qids])
                if index is None:
                    d_emb = item_enc.encode(doc_texts)
                    index = layer.to_ivfpq(d_emb, doc_ids) if bool(layer.initialized) else None
                hard = mine_hard_negatives(q_emb, index, d_emb, qids, positives, doc_ids, cfg.hard_pool, cfg.nlist)
            hard = ddp.broadcast_object(hard)
        rng.shuffle(pairs)
        bar = tqdm(
            range(0, len(pairs) - cfg.batch_size + 1, cfg.batch_size), desc=f"epoch {epoch}", disable=not progress
        )
        for s in bar:
            batch = pairs[s : s + cfg.batch_size]
            validated = False
            if cfg.quantize and not bool(layer.initialized) and step >= cfg.warmup_steps:
                _warm_start(layer, item_enc, doc_texts, cfg, rng)
            negs = [rng.choice(hard[q]) for q, _ in batch for _ in range(cfg.hard_negatives) if hard.get(q)]
            q_texts = [data.queries[qid] for qid, _ in batch]
            # (one process: plain `embed`; torchrun: this rank's share, the global batch gathered)
            q = ddp.embed_sharded(query_enc, q_texts)
            items, distortion = layer(
                ddp.embed_sharded(item_enc, [data.corpus[d] for _, d in batch] + [data.corpus[d] for d in negs])
            )
            loss_r = contrastive(q, items[: len(batch)], items[len(batch) :], cfg.temperature)
            if cfg.catalog_items and bool(layer.initialized):  # the quantizer fits the catalog, not only positives
                _, catalog_distortion = layer(
                    ddp.embed_sharded(item_enc, rng.sample(doc_texts, min(cfg.catalog_items, len(doc_texts))))
                )
                distortion = (distortion + catalog_distortion) / 2
            loss = loss_r + cfg.distortion_weight * distortion
            row = {"step": step, "retrieval": loss_r.item(), "distortion": distortion.item()}
            if distill is not None:
                unique = list(dict.fromkeys(q_texts))
                q_rows, cand = distill.candidates(unique)
                cand_items, _ = layer(ddp.embed_sharded(item_enc, [doc_texts[r] for r in cand.tolist()]))
                loss_d = distill.loss(q_rows, cand, ddp.embed_sharded(query_enc, unique) @ cand_items.T)
                loss = loss + cfg.distill_weight * loss_d
                row["distill"] = loss_d.item()
            opt.zero_grad()
            loss.backward()
            if ddp.is_distributed():  # every rank's loss is the global batch's: the mean is its gradient
                ddp.average_gradients([*trainable, layer.rotation_leaf()])
            opt.step()
            layer.rotation_step(cfg.rotation_lr)
            history.append(row | {"loss": loss.item()})
            bar.set_postfix(loss=f"{loss.item():.3f}")
            step += 1
            if cfg.max_seconds and ddp.agree(time.perf_counter() - t1 > cfg.max_seconds):
                stop = True
                break
        index = None
        if validation is not None and cfg.quantize and bool(layer.initialized):
            d_emb = item_enc.encode(doc_texts)
            index = layer.to_ivfpq(d_emb, doc_ids)
            score = ddp.from_main(validation.score, query_enc, index)
            validated = True
            if progress:
                print(f"poeem: epoch {epoch} nDCG@10 {score:.4f}")
            if guard.offer(epoch, score, lambda index=index, emb=d_emb: (*towers(query_enc, item_enc), index, emb)):
                break
        if stop:
            break
    if cfg.quantize and not bool(layer.initialized):
        _warm_start(layer, item_enc, doc_texts, cfg, rng)
    train_seconds = time.perf_counter() - t1
    trained = {f"{tower}.{k}": p for tower, enc in (("query", query_enc), ("item", item_enc))
               for k, p in enc.named_parameters() if p.requires_grad}  # fmt: skip
    record = ddp.check_identical(trained | layer.state_tensors(), "poeem: the towers or the quantizer")
    if record is not None:
        record["batch_per_rank"] = cfg.batch_size // record["world_size"]
    t2 = time.perf_counter()
    d_emb = item_enc.encode(doc_texts, progress=progress, desc="encode items")
    t3 = time.perf_counter()
    # indexing is one forward pass of the layer; --no-quantize: the two-step recipe on the same trained model
    if cfg.quantize:
        final = layer.to_ivfpq(d_emb, doc_ids, progress=progress)
    else:
        final = ddp.from_main(two_step_start, d_emb, doc_ids, cfg)
    index_seconds = time.perf_counter() - t3
    query_out: TextEncoder = query_enc
    item_out: TextEncoder = item_enc
    if validation is not None:
        if not validated:  # trained after the last validation (warm start at the end, --no-quantize)
            score = ddp.from_main(validation.score, query_enc, final)
            guard.offer(epoch_run, score, lambda: (*towers(query_enc, item_enc), final, d_emb))
        query_out, item_out, final, d_emb = guard.best
    if progress:
        print(guard.message("poeem"))
    if validation is not None and cfg.refit and guard.selected == "trained" and inputs.encoder is None:
        # the guard measured that e epochs beat the start; the held-aside labels now train too
        refit_cfg = replace(cfg, guard=False, refit=False, epochs=guard.best_epoch)
        if progress:
            print(f"poeem: refit on all {len(positives)} labelled queries for {guard.best_epoch} epochs")
        final_res = train(data, refit_cfg, inputs, progress)
        final_res.validation = guard.record() | {"refit_epochs": guard.best_epoch}
        final_res.timings["train_seconds"] += train_seconds
        return final_res
    timings = {
        "train_seconds": train_seconds,
        "start_seconds": start_seconds,
        "encode_items_seconds": t3 - t2,
        "index_seconds": index_seconds,
    }
    return TrainResult(
        query_out.eval(),
        item_out.eval(),
        final,
        history,
        timings,
        guard.record(),
        item_embeddings=d_emb,
        item_ids=doc_ids,
        distributed=record,
    )


def towers(query_enc: TextEncoder, item_enc: TextEncoder) -> tuple[TextEncoder, TextEncoder]:
    """Frozen copies of both towers for a guard snapshot (one copy when they are shared): the
    item tower ships with the index it made, so it must be the one of the selected epoch."""
    query = snapshot_encoder(query_enc)
    return query, query if item_enc is query_enc else snapshot_encoder(item_enc)


def _warm_start(
    layer: IndexingLayer, item_enc: TextEncoder, doc_texts: list[str], cfg: PoeemConfig, rng: random.Random
) -> None:
    """k-means init from the current item embeddings (a sample of the corpus), or, for the
    no-warm-start ablation, codebooks drawn from random items (dead codewords expected). Under
    torchrun every rank draws the sample (the rng stays in step), rank 0 alone runs k-means, and
    every rank takes its result."""
    sample = rng.sample(doc_texts, min(len(doc_texts), cfg.warm_items))
    if ddp.is_main():
        _fit(layer, item_enc.encode(sample), cfg)
    layer.broadcast_state()


def _fit(layer: IndexingLayer, x: torch.Tensor, cfg: PoeemConfig) -> None:
    if cfg.warm_start:
        layer.warm_start(x, seed=cfg.seed, niter=cfg.warm_start_iters)
        return
    with torch.no_grad():  # ablation: no k-means, a random item for each codeword
        gen = torch.Generator().manual_seed(cfg.seed)
        layer.centroids.copy_(x[torch.randint(len(x), (layer.nlist,), generator=gen)])
        res = (x - layer.centroids[torch.randint(layer.nlist, (len(x),), generator=gen)]).view(len(x), layer.M, -1)
        layer.codebooks.copy_(res[torch.randint(len(x), (layer.K,), generator=gen)].transpose(0, 1))
        layer.initialized.fill_(True)
