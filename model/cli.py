"""`jointpq train` and `jointpq eval`."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

TRAIN_EXAMPLE = """example:
  jointpq train --mode poeem --data ../shared/data/scifact --out artifacts/scifact-poeem --m 16 --nlist 64 --epochs 10
"""
EVAL_EXAMPLE = """example:
  jointpq eval --artifact artifacts/scifact-poeem --data ../shared/data/scifact --split test --json
"""


def add_commands(sub: argparse._SubParsersAction) -> None:
    from .train import TrainConfig

    d = TrainConfig()
    p = sub.add_parser(
        "train",
        help="train encoder + IVF-PQ index jointly, write an artifact",
        epilog=TRAIN_EXAMPLE,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--mode", choices=("poeem", "jpq"), default=d.mode)
    p.add_argument("--data", required=True, type=Path, help="BEIR directory (corpus, queries, qrels/)")
    p.add_argument("--out", required=True, type=Path, help="artifact directory to create")
    p.add_argument(
        "--encoder",
        choices=("hashed", "minilm", "minilm-head"),
        default=d.encoder,
        help="hashed: from scratch; minilm: fine-tune MiniLM; minilm-head: frozen MiniLM + trainable head",
    )
    p.add_argument("--separate-towers", action="store_true", help="separate query and item encoders")
    p.add_argument("--m", type=int, default=d.M, help="PQ subspaces (bytes per item at 8 bits)")
    p.add_argument("--nlist", type=int, default=d.nlist)
    p.add_argument("--nbits", type=int, choices=(4, 8), default=d.nbits)
    p.add_argument("--epochs", type=int, default=d.epochs)
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--no-rotation", action="store_true", help="ablation: keep R = I")
    p.add_argument("--no-warm-start", action="store_true", help="ablation: random codebooks")
    p.add_argument("--item-embeddings", type=Path, help="jpq: (n, d) .npy of precomputed item embeddings")
    p.add_argument("--item-ids", type=Path, help="jpq: JSON list of the doc id of each --item-embeddings row")
    p.add_argument("--max-docs", type=int, help="train on a corpus subset of this size (judged docs kept)")
    p.add_argument("--max-seconds", type=float, help="stop training after this long")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--device", default=d.device)
    p.add_argument(
        "--publish",
        action="store_true",
        help="then point the artifact root's CURRENT file at it (a watching service reloads)",
    )
    p.set_defaults(func=_train)

    e = sub.add_parser(
        "eval",
        help="recall/nDCG/MRR of an artifact over an nprobe sweep",
        epilog=EVAL_EXAMPLE,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    e.add_argument("--artifact", required=True, type=Path)
    e.add_argument("--data", required=True, type=Path)
    e.add_argument("--split", default="test")
    e.add_argument("--nprobe", type=int, nargs="+", default=[1, 4, 16, 64])
    e.add_argument("--max-docs", type=int, help="evaluate on the same corpus subset as training")
    e.add_argument("--seed", type=int, default=0, help="subset seed (as in training)")
    e.add_argument("--device", default="auto")
    e.add_argument("--backend", default="auto", choices=("auto", "torch", "faiss"))
    e.add_argument("--json", action="store_true", help="one JSON object per nprobe")
    e.set_defaults(func=_eval)


def _train(args: argparse.Namespace) -> int:
    from .data import load_beir
    from .evaluate import evaluate
    from .train import TrainConfig, train_jpq, train_poeem, training_canaries, write_trained_artifact

    data = load_beir(args.data)
    if args.max_docs:
        data = data.subset(args.max_docs, seed=args.seed)
    cfg = TrainConfig(
        mode=args.mode,
        encoder=args.encoder,
        shared_towers=not args.separate_towers,
        M=args.m,
        nlist=args.nlist,
        nbits=args.nbits,
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        rotation=not args.no_rotation,
        warm_start=not args.no_warm_start,
        seed=args.seed,
        device=args.device,
        max_seconds=args.max_seconds,
    )
    if args.mode == "jpq":
        result = train_jpq(data, cfg, item_embeddings=_item_embeddings(args, list(data.corpus)))
    else:
        result = train_poeem(data, cfg)
    from index import Index

    idx = Index.in_memory(result.index)
    split = "test" if "test" in data.qrels else next(iter(data.qrels))
    rows = evaluate(result.query_encoder, idx, data, split, nprobes=(min(16, cfg.nlist),))
    canaries = training_canaries(result, data, split, seed=args.seed)
    write_trained_artifact(args.out, result, cfg, str(args.data), metrics={split: rows}, canaries=canaries)
    if args.publish:
        from index.pointer import publish

        publish(args.out.parent, args.out.name)
    print(json.dumps({"artifact": str(args.out), "steps": len(result.history), **result.timings, **rows[0]}))
    return 0


def _item_embeddings(args: argparse.Namespace, doc_ids: list[str]):
    """Rows of --item-embeddings in corpus order (via --item-ids when given), or None."""
    if not args.item_embeddings:
        return None
    import numpy as np
    import torch

    x = np.load(args.item_embeddings, allow_pickle=False)
    if args.item_ids:
        ids = json.loads(args.item_ids.read_text(encoding="utf-8"))
        if len(ids) != len(x):
            raise ValueError(f"{args.item_ids} has {len(ids)} ids for {len(x)} rows of {args.item_embeddings}")
        row = {d: i for i, d in enumerate(ids)}
        missing = [d for d in doc_ids if d not in row]
        if missing:
            raise ValueError(f"{args.item_embeddings}: no row for {len(missing)} corpus docs, e.g. {missing[0]!r}")
        x = x[[row[d] for d in doc_ids]]
    elif len(x) != len(doc_ids):
        raise ValueError(f"{args.item_embeddings} has {len(x)} rows for {len(doc_ids)} docs (pass --item-ids)")
    return torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))


def _eval(args: argparse.Namespace) -> int:
    from index import load_index

    from .data import load_beir
    from .encoders import load_encoder
    from .evaluate import evaluate

    idx = load_index(args.artifact, device=args.device, backend=args.backend)
    encoder = load_encoder(args.artifact)
    data = load_beir(args.data, splits=(args.split,))
    if args.max_docs:
        data = data.subset(args.max_docs, seed=args.seed)
    rows = evaluate(encoder, idx, data, args.split, nprobes=args.nprobe)
    if args.json:
        for r in rows:
            print(json.dumps(r))
    else:
        print(f"{'nprobe':>6} {'recall@10':>10} {'recall@100':>11} {'ndcg@10':>8} {'mrr@10':>7}")
        for r in rows:
            cols = (r["recall@10"], r["recall@100"], r["ndcg@10"], r["mrr@10"])
            print(f"{r['nprobe']:>6} " + " ".join(f"{v:>{w}.4f}" for v, w in zip(cols, (10, 11, 8, 7), strict=True)))
    return 0
