"""One trainer, two modes (see design.md and the joint-training issue).

* ``poeem``: query tower, item tower and the IndexingLayer end to end. Items pass through the
  layer in the forward pass (straight-through); loss = in-batch softmax with hard negatives +
  distortion. The layer runs unquantized for `warmup_steps`, then is warm-started by k-means on
  item embeddings, then quantizes; R takes a Givens step after every optimiser step.
* ``jpq``: item embeddings fixed (the pretrained item encoder, computed once), index initialised
  by the two-step builder (OPQ + IVF-PQ); the query encoder and the PQ centroids (not the
  assignments) learn with a LambdaRank-weighted pairwise loss on scores against PQ-reconstructed
  items, with hard negatives retrieved from the current PQ index each epoch.

Both end with `IndexingLayer.to_ivfpq` / the trained index and write a complete artifact.
"""

from __future__ import annotations

import copy
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from index import TorchSearcher, exact_search, resolve_device, write_artifact
from index.canary import CANARY, CanarySet
from index.ivfpq import IVFPQ

from .data import RetrievalData
from .encoders import HashedNgramEncoder, HeadEncoder, MiniLMEncoder, TextEncoder, encoder_files
from .layer import IndexingLayer
from .losses import contrastive

MODES = ("poeem", "jpq")


@dataclass
class TrainConfig:
    """Hyperparameters; every field lands in the artifact's manifest."""

    mode: str = "poeem"
    encoder: str = "hashed"  # "hashed" (from scratch, seconds) or "minilm" (pretrained)
    shared_towers: bool = True  # one encoder for queries and items: small data favours it
    dim: int = 128  # hashed encoder output width (MiniLM: 384)
    M: int = 16
    nlist: int = 64
    nbits: int = 8
    metric: str = "ip"
    epochs: int = 10
    batch_size: int = 64
    lr: float = 5e-3  # encoder(s); use ~5e-6 to fine-tune MiniLM (JPQ's setting)
    codebook_lr: float = 1e-4  # jpq: PQ centroids (JPQ: 5e-6 at M 16/24 up to 1e-4 at M >= 48)
    negatives: int = 32  # jpq: hard negatives per query from the current index's top `hard_pool`
    quantize: bool = True  # False: the two-step baseline (train unquantized, then OPQ + IVF-PQ offline)
    rotation: bool = True  # learn R by Givens steps (ablation: False)
    rotation_lr: float = 1e-3
    warm_start: bool = True  # ablation: False = random codebooks from the first batch
    warmup_steps: int = 40  # unquantized steps before the warm start (Poeem: 1024)
    warm_items: int = 8192  # items encoded for the warm-start k-means (Poeem: 8192)
    hard_negatives: int = 1  # per query, mined from the current index each epoch
    hard_pool: int = 50  # mine among the top-`hard_pool` retrieved, positives excluded
    distortion_weight: float = 1.0
    temperature: float = 0.05
    seed: int = 0
    device: str = "auto"
    max_seconds: float | None = None  # stop early after this much training time
    extra: dict[str, Any] = field(default_factory=dict)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def make_encoder(cfg: TrainConfig, memo: dict[str, torch.Tensor] | None = None) -> TextEncoder:
    """The configured encoder; `minilm-head` is frozen MiniLM + a trainable head (`memo`: text -> cached embedding)."""
    if cfg.encoder == "minilm":
        return MiniLMEncoder()
    if cfg.encoder == "minilm-head":
        return HeadEncoder(MiniLMEncoder(), memo)
    if cfg.encoder == "hashed":
        return HashedNgramEncoder(dim=cfg.dim)
    raise ValueError(f"encoder {cfg.encoder!r} is not one of ('hashed', 'minilm', 'minilm-head')")


@dataclass
class TrainResult:
    query_encoder: TextEncoder
    item_encoder: TextEncoder
    index: IVFPQ
    history: list[dict[str, float]]
    timings: dict[str, float]


def _pairs(data: RetrievalData, split: str) -> list[tuple[str, str]]:
    return [(q, d) for q, docs in data.qrels[split].items() for d, s in docs.items() if s > 0]


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


def train_poeem(
    data: RetrievalData,
    cfg: TrainConfig,
    split: str = "train",
    progress: bool = True,
    memo: dict[str, torch.Tensor] | None = None,
) -> TrainResult:
    """Poeem: both towers and the indexing layer trained end to end. `memo` (text -> embedding)
    pre-fills the frozen base of a `minilm-head` encoder."""
    from tqdm.auto import tqdm

    seed_everything(cfg.seed)
    dev = resolve_device(cfg.device)
    item_enc = make_encoder(cfg, memo).to(dev)
    if cfg.shared_towers:
        query_enc = item_enc
    elif isinstance(item_enc, HeadEncoder):  # share the frozen base (and its memo), not the head
        query_enc = HeadEncoder(item_enc.base, item_enc.memo).to(dev)
    else:
        query_enc = copy.deepcopy(item_enc)
    layer = IndexingLayer(item_enc.dim, cfg.nlist, cfg.M, cfg.nbits, cfg.metric, rotation=cfg.rotation).to(dev)
    params = list({id(p): p for p in [*item_enc.parameters(), *query_enc.parameters(), *layer.parameters()]}.values())
    opt = torch.optim.AdamW(params, lr=cfg.lr)
    pairs = _pairs(data, split)
    doc_ids = list(data.corpus)
    doc_texts = [data.corpus[d] for d in doc_ids]
    positives = {q: set(docs) for q, docs in data.positives(split).items()}
    qids = sorted(positives)
    rng = random.Random(cfg.seed)
    if cfg.epochs and len(pairs) < cfg.batch_size:  # the loop below would run no step, silently
        raise ValueError(
            f"{len(pairs)} training pairs in {split!r}, fewer than batch_size={cfg.batch_size}: no training step"
            " would run; lower the batch size or give more labelled queries"
        )
    history, step, hard = [], 0, {}
    t0 = time.perf_counter()
    stop = False
    for epoch in range(cfg.epochs):
        if cfg.hard_negatives:  # mine from the current model (index once quantized)
            q_emb = query_enc.encode([data.queries[q] for q in qids])
            d_emb = item_enc.encode(doc_texts)
            index = layer.to_ivfpq(d_emb, doc_ids) if bool(layer.initialized) else None
            hard = mine_hard_negatives(q_emb, index, d_emb, qids, positives, doc_ids, cfg.hard_pool, cfg.nlist)
        rng.shuffle(pairs)
        bar = tqdm(
            range(0, len(pairs) - cfg.batch_size + 1, cfg.batch_size), desc=f"epoch {epoch + 1}", disable=not progress
        )
        for s in bar:
            batch = pairs[s : s + cfg.batch_size]
            if cfg.quantize and not bool(layer.initialized) and step >= cfg.warmup_steps:
                _warm_start(layer, item_enc, doc_texts, cfg, rng)
            negs = [rng.choice(hard[q]) for q, _ in batch for _ in range(cfg.hard_negatives) if hard.get(q)]
            q = query_enc.embed([data.queries[qid] for qid, _ in batch])
            items, distortion = layer(
                item_enc.embed([data.corpus[d] for _, d in batch] + [data.corpus[d] for d in negs])
            )
            loss_r = contrastive(q, items[: len(batch)], items[len(batch) :], cfg.temperature)
            loss = loss_r + cfg.distortion_weight * distortion
            opt.zero_grad()
            loss.backward()
            opt.step()
            layer.rotation_step(cfg.rotation_lr)
            history.append(
                {"step": step, "loss": loss.item(), "retrieval": loss_r.item(), "distortion": distortion.item()}
            )
            bar.set_postfix(loss=f"{loss.item():.3f}")
            step += 1
            if cfg.max_seconds and time.perf_counter() - t0 > cfg.max_seconds:
                stop = True
                break
        if stop:
            break
    if cfg.quantize and not bool(layer.initialized):
        _warm_start(layer, item_enc, doc_texts, cfg, rng)
    train_seconds = time.perf_counter() - t0
    t1 = time.perf_counter()
    d_emb = item_enc.encode(doc_texts, progress=progress, desc="encode items")
    t2 = time.perf_counter()
    if cfg.quantize:
        index = layer.to_ivfpq(d_emb, doc_ids, progress=progress)  # indexing: one forward pass of the layer
    else:  # the two-step recipe on the same trained model
        from index import build_ivfpq

        index = build_ivfpq(
            d_emb, nlist=cfg.nlist, M=cfg.M, nbits=cfg.nbits, metric=cfg.metric, opq=True, ids=doc_ids, seed=cfg.seed
        )
    timings = {
        "train_seconds": train_seconds,
        "encode_items_seconds": t2 - t1,
        "index_seconds": time.perf_counter() - t2,
    }
    return TrainResult(query_enc.eval(), item_enc.eval(), index, history, timings)


def _warm_start(
    layer: IndexingLayer, item_enc: TextEncoder, doc_texts: list[str], cfg: TrainConfig, rng: random.Random
) -> None:
    """k-means init from the current item embeddings (a sample of the corpus), or, for the
    no-warm-start ablation, codebooks drawn from random items (dead codewords expected)."""
    sample = rng.sample(doc_texts, min(len(doc_texts), cfg.warm_items))
    x = item_enc.encode(sample)
    if cfg.warm_start:
        layer.warm_start(x, seed=cfg.seed)
        return
    with torch.no_grad():  # ablation: no k-means, a random item for each codeword
        gen = torch.Generator().manual_seed(cfg.seed)
        layer.centroids.copy_(x[torch.randint(len(x), (layer.nlist,), generator=gen)])
        res = (x - layer.centroids[torch.randint(layer.nlist, (len(x),), generator=gen)]).view(len(x), layer.M, -1)
        layer.codebooks.copy_(res[torch.randint(len(x), (layer.K,), generator=gen)].transpose(0, 1))
        layer.initialized.fill_(True)


def training_canaries(
    result: TrainResult, data: RetrievalData, split: str, n: int = 32, k: int = 100, seed: int = 0
) -> CanarySet | None:
    """Up to `n` judged queries of `split` with their relevant ids, as the artifact's quality gate
    (`index.canary`): a service refuses a later reload whose recall on them drops below 0.8x today's."""
    from index import Index
    from index.canary import make_canaries

    positives = data.positives(split) if split in data.qrels else {}
    qids = sorted(q for q, docs in positives.items() if docs and q in data.queries)
    if not qids:
        return None
    qids = random.Random(seed).sample(qids, min(n, len(qids)))
    texts = [data.queries[q] for q in qids]
    vectors = result.query_encoder.encode(texts).numpy()
    idx = Index.in_memory(result.index)

    def search(x, k, nprobe):
        return idx.search(x, k, nprobe)[1]

    return make_canaries(vectors, [sorted(positives[q]) for q in qids], search, texts, k, min(16, result.index.nlist))


def write_trained_artifact(
    out: str | Path,
    result: TrainResult,
    cfg: TrainConfig,
    data_path: str,
    metrics: dict | None = None,
    canaries: CanarySet | None = None,
) -> Path:
    """Query encoder + index + ids (+ canaries) as one artifact; the manifest records how it was made."""
    training = {
        "mode": cfg.mode,
        "data": data_path,
        "config": {k: v for k, v in asdict(cfg).items() if k != "extra"},
        "seed": cfg.seed,
        "timings": result.timings,
        "final_loss": result.history[-1]["loss"] if result.history else None,
        "steps": len(result.history),
        "metrics": metrics or {},
        "query_encoder": result.query_encoder.config(),
    }
    extra = encoder_files(result.query_encoder)
    if canaries is not None:
        extra[CANARY] = canaries.dumps()
    return write_artifact(out, result.index, training=training, extra_files=extra)


def train_jpq(
    data: RetrievalData,
    cfg: TrainConfig,
    split: str = "train",
    item_embeddings: torch.Tensor | None = None,
    encoder: TextEncoder | None = None,
    progress: bool = True,
) -> TrainResult:
    """JPQ: fixed item embeddings indexed by OPQ + IVF-PQ; train the query encoder and the PQ
    codebooks with the LambdaRank-weighted pairwise loss against PQ-reconstructed items, hard
    negatives retrieved from the current index each epoch (missed positives appended).

    `encoder` is the pretrained encoder (default: `make_encoder(cfg)`); `item_embeddings` (n, d)
    in corpus order skip encoding the corpus with it (e.g. a cache)."""
    from tqdm.auto import tqdm

    from index import build_ivfpq

    from .losses import lambda_pairwise

    seed_everything(cfg.seed)
    dev = resolve_device(cfg.device)
    item_enc = encoder if encoder is not None else make_encoder(cfg)
    query_enc = copy.deepcopy(item_enc).to(dev).train()
    doc_ids = list(data.corpus)
    t0 = time.perf_counter()
    if item_embeddings is None:
        item_embeddings = item_enc.encode([data.corpus[d] for d in doc_ids], progress=progress, desc="encode items")
    if item_embeddings.shape != (len(doc_ids), item_enc.dim):
        raise ValueError(
            f"item embeddings are {tuple(item_embeddings.shape)}, expected ({len(doc_ids)}, {item_enc.dim})"
        )
    t1 = time.perf_counter()
    base = build_ivfpq(
        item_embeddings,
        nlist=cfg.nlist,
        M=cfg.M,
        nbits=cfg.nbits,
        metric=cfg.metric,
        opq=True,
        ids=doc_ids,
        seed=cfg.seed,
    )
    build_seconds = time.perf_counter() - t1
    # fixed: rotation, centroids, assignments; trained: the codebooks and the query encoder
    R, C = base.rotation.to(dev), base.centroids.to(dev)
    codes, cells = base.unpacked_codes().long().to(dev), base.cells().to(dev)
    row_of = {d: r for r, d in enumerate(base.ids)}
    P = torch.nn.Parameter(base.codebooks.clone().to(dev))
    opt = torch.optim.AdamW([{"params": query_enc.parameters(), "lr": cfg.lr}, {"params": [P], "lr": cfg.codebook_lr}])
    positives = {q: set(docs) for q, docs in data.positives(split).items()}
    qids = sorted(positives)
    rng = random.Random(cfg.seed)
    history: list[dict[str, float]] = []
    pool = cfg.hard_pool

    def current_index() -> IVFPQ:
        from dataclasses import replace

        return replace(base, codebooks=P.detach().cpu().clone())

    def reconstruct(rows: torch.Tensor) -> torch.Tensor:  # (..., ) rows -> (..., d) x_hat' rotated
        parts = P[torch.arange(cfg.M, device=dev), codes[rows]]  # (..., M, dsub)
        return C[cells[rows]] + parts.reshape(*rows.shape, -1)

    t2 = time.perf_counter()
    for epoch in range(cfg.epochs):
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
        bar = tqdm(range(0, len(order), cfg.batch_size), desc=f"jpq epoch {epoch + 1}", disable=not progress)
        for s in bar:
            batch = [q for q in order[s : s + cfg.batch_size] if cands[q][1]]
            if not batch:
                continue
            pos = [rng.choice(cands[q][0]) for q in batch]
            n_neg = min(len(cands[q][1]) for q in batch)
            negs = [cands[q][1][:n_neg] for q in batch]
            qr = query_enc.embed([data.queries[q] for q in batch]) @ R.T  # (B, d) rotated
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
            opt.zero_grad()
            loss.backward()
            opt.step()
            history.append({"step": len(history), "loss": loss.item(), "retrieval": loss.item(), "distortion": 0.0})
            bar.set_postfix(loss=f"{loss.item():.4f}")
            if cfg.max_seconds and time.perf_counter() - t2 > cfg.max_seconds:
                break
        if cfg.max_seconds and time.perf_counter() - t2 > cfg.max_seconds:
            break
    timings = {
        "train_seconds": time.perf_counter() - t2,
        "encode_items_seconds": t1 - t0,
        "index_seconds": build_seconds,
    }
    return TrainResult(query_enc.eval(), item_enc.eval(), current_index(), history, timings)
