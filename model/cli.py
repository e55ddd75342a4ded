"""`jointpq train` and `jointpq eval`."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

TRAIN_EXAMPLE = """examples:
  jointpq train --data ../shared/data/scifact --out artifacts/scifact-auto          # auto: picks the mode from the data
  jointpq train --mode distill --data ../shared/data/scifact --out artifacts/scifact-distill --m 8 --queries queries.txt
  jointpq train --mode poeem --data ../shared/data/scifact --out artifacts/scifact-poeem --distill-weight 1
  torchrun --nproc_per_node 2 -m service.cli train --mode poeem --data ../shared/data/scifact --out artifacts/p2
      # data-parallel (poeem, distill): --batch-size stays the global batch, each process takes batch/2
"""
INDEX_EXAMPLE = """examples:
  jointpq index --artifact artifacts/shop-v3 --corpus catalog.jsonl.gz --out artifacts/shop-v3-i1 --publish
  jointpq index --artifact artifacts/shop-v3 --corpus new-items.jsonl --mode add --out artifacts/shop-v3-i2
  jointpq index --artifact artifacts/shop-v3 --vectors items.npy --ids item_ids.json --out artifacts/shop-v3-i3
"""
EVAL_EXAMPLE = """example:
  jointpq eval --artifact artifacts/scifact-auto --data ../shared/data/scifact --split test --json
"""


def add_commands(sub: argparse._SubParsersAction) -> None:
    from .config import add_config_flags
    from .modes import MODES
    from .presets import PRESETS

    p = sub.add_parser(
        "train",
        help="train encoder + IVF-PQ index jointly (or distill the index without labels), write an artifact",
        description="Modes: auto (default: picks from the data), "
        + "; ".join(f"{m.name}: {m.summary}" for m in MODES.values())
        + ". Every run holds queries aside and never ships an index worse than the two-step start (--no-guard: off).",
        epilog=TRAIN_EXAMPLE,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--mode", choices=("auto", *MODES), default="auto", help="auto: no labels -> distill, else poeem")
    p.add_argument("--data", required=True, type=Path, help="BEIR directory: corpus.jsonl[.gz] (+ queries, qrels/)")
    p.add_argument("--out", required=True, type=Path, help="artifact directory to create")
    p.add_argument("--queries", type=Path, help="distill: training query texts (one a line, or JSONL with 'text')")
    p.add_argument(
        "--preset",
        choices=tuple(PRESETS),
        help="named values: " + "; ".join(f"{k}: {v.why}" for k, v in PRESETS.items()),
    )
    p.add_argument(
        "--item-embeddings", type=Path, help="(n, d) .npy of the pretrained encoder over the corpus (a cache)"
    )
    p.add_argument("--item-ids", type=Path, help="JSON list of the doc id of each --item-embeddings row")
    p.add_argument("--max-docs", type=int, help="train on a corpus subset of this size (judged docs kept)")
    p.add_argument("--label-sample", type=int, help="train on a seeded sample of this many labelled queries")
    p.add_argument(
        "--publish",
        action="store_true",
        help="then point the artifact root's CURRENT file at it (a watching service reloads)",
    )
    p.add_argument(
        "--loss-log", type=Path,
        help="write the shipped run's per-step losses there, one JSON object a line (step, loss and its terms)",
    )  # fmt: skip
    add_config_flags(p.add_argument_group("training config (defaults depend on the mode and encoder)"),
                     [m.config for m in MODES.values()])  # fmt: skip
    p.set_defaults(func=_train)

    i = sub.add_parser(
        "index",
        help="index a changed catalog with a trained artifact's frozen model (one forward pass, no retraining)",
        description="Encodes the items with the artifact's item tower (or takes vectors), assigns cells and codes"
        " with its learned rotation, centroids and codebooks, and writes a new version with the same model."
        " The manifest records the parent, the counts and a drift report (distortion and cell balance of the new"
        " items against the trained ones: when it says retrain_advised, retrain).",
        epilog=INDEX_EXAMPLE,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    i.add_argument("--artifact", required=True, type=Path, help="the trained artifact whose model indexes the items")
    src = i.add_mutually_exclusive_group(required=True)
    src.add_argument("--corpus", type=Path, help="items.jsonl[.gz]: {'_id' (or 'id'), 'title'?, 'text'} per line")
    src.add_argument("--vectors", type=Path, help="(n, d) float .npy of item embeddings (with --ids)")
    i.add_argument("--ids", type=Path, help="JSON list of the n item ids of --vectors")
    i.add_argument("--out", required=True, type=Path, help="the new artifact version to write")
    i.add_argument(
        "--mode", choices=("replace", "add"), default="replace",
        help="replace: exactly these items; add: the parent's items plus these (a present id is replaced)",
    )  # fmt: skip
    i.add_argument("--publish", action="store_true", help="then point the artifact root's CURRENT at it")
    i.add_argument("--batch-size", type=int, default=64, help="encoder batch (texts)")
    i.add_argument("--device", default="auto", help="auto | cpu | cuda: where the item tower runs")
    i.add_argument(
        "--encoder-runtime", choices=("auto", "torch", "onnx"), default="auto",
        help="auto: ONNX Runtime where it measured faster (MiniLM on CPU) and the artifact's graph checks out",
    )  # fmt: skip
    i.set_defaults(func=_index)

    o = sub.add_parser(
        "onnx",
        help="write a version of an artifact with ONNX forms of its encoders (made before ONNX, or another precision)",
        description="Exports the query tower (and an item tower of its own) to ONNX next to its weights, checks the"
        " graphs against torch on probe texts, and writes a new version; the index and ids are copied unchanged.",
        epilog="example:\n  jointpq onnx --artifact artifacts/demo/scifact-demo-v1 --precision int8"
        " --out artifacts/demo/scifact-demo-v1-int8 --publish",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    o.add_argument("--artifact", required=True, type=Path, help="the artifact whose encoders to export")
    o.add_argument("--out", required=True, type=Path, help="the new artifact version to write")
    o.add_argument("--precision", choices=("fp32", "int8"), default="fp32", help="the query tower's served graph")
    o.add_argument("--publish", action="store_true", help="then point the artifact root's CURRENT at it")
    o.set_defaults(func=_onnx)

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
    e.add_argument(
        "--encoder-runtime", choices=("auto", "torch", "onnx"), default="auto",
        help="the query tower's engine, as the service runs it (onnx: the artifact's graph at its precision)",
    )  # fmt: skip
    e.add_argument("--json", action="store_true", help="one JSON object per nprobe")
    e.set_defaults(func=_eval)


def _train(args: argparse.Namespace) -> int:
    """Under torchrun every rank trains (`model.distributed`); rank 0 alone evaluates, writes the
    artifact and the loss log, publishes and prints the summary, while the others wait for it."""
    from . import distributed

    try:
        code = _train_ranks(args)
    except BaseException:
        distributed.shutdown(barrier=False)  # never wait for peers that may be inside a collective
        raise
    distributed.shutdown()
    return code


def _train_ranks(args: argparse.Namespace) -> int:
    from . import distributed
    from .auto import choose
    from .config import given_values
    from .data import load_beir, sample_labels
    from .evaluate import evaluate
    from .modes import MODES, TrainInputs
    from .queries import read_query_file
    from .train import resolve_config, train, training_canaries, write_trained_artifact

    data = load_beir(args.data, optional=True)
    seed = args.seed if args.seed is not None else 0
    if args.max_docs:
        data = data.subset(args.max_docs, seed=seed)
    if args.label_sample:
        data = sample_labels(data, "train", args.label_sample, seed)
    given = given_values(args, [m.config for m in MODES.values()])
    mode, values = args.mode, {}
    if mode == "auto":
        from .encoders import minilm_available

        choice = choose(data, minilm=minilm_available())
        mode, values = choice.mode, {k: v for k, v in choice.values.items() if k not in given}
        if given.get("encoder", "minilm-head") != "minilm-head":  # the distillation term needs the head's frozen base
            values.pop("distill_weight", None)
        if distributed.is_main():
            print(f"auto: {choice.reason}")
    cfg = resolve_config(mode, preset=args.preset, given=given, **values)
    if args.queries and mode != "distill":
        from .config import ConfigError

        raise ConfigError(f"--queries is for --mode distill (label-free); --mode {mode} learns from qrels/train.tsv")
    if mode != "distill" and "train" not in data.qrels:
        from .data import DataError

        raise DataError(f"{args.data}/qrels/train.tsv: --mode {mode} needs labelled queries (or use --mode distill)")
    inputs = TrainInputs(item_embeddings=_item_embeddings(args, list(data.corpus)))
    if args.queries:
        inputs.queries, inputs.query_source = read_query_file(args.queries), f"file:{args.queries}"
    result = train(data, cfg, inputs)
    if not distributed.is_main():
        return 0
    if args.loss_log:
        args.loss_log.parent.mkdir(parents=True, exist_ok=True)
        args.loss_log.write_text("".join(json.dumps(row) + "\n" for row in result.history), encoding="utf-8")
    from index import Index

    idx = Index.in_memory(result.index)
    split = "test" if "test" in data.qrels else None
    rows = evaluate(result.query_encoder, idx, data, split, nprobes=(min(16, cfg.nlist),)) if split else []
    canaries = training_canaries(result, data, split, cfg)
    write_trained_artifact(
        args.out, result, cfg, str(args.data), metrics={split: rows} if split else {}, canaries=canaries,
        preset=args.preset,
    )  # fmt: skip
    if args.publish:
        from index.pointer import publish

        publish(args.out.parent, args.out.name)
    summary = {"artifact": str(args.out), "mode": mode, "selected": result.selected, "steps": len(result.history)}
    if result.distributed is not None:
        summary |= {"world_size": result.distributed["world_size"], "backend": result.distributed["backend"]}
    print(json.dumps(summary | result.timings | (rows[0] if rows else {})))
    return 0


def _index(args: argparse.Namespace) -> int:
    from .indexing import index_catalog

    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")
    out, record = index_catalog(
        args.artifact, args.out, corpus=args.corpus, vectors=args.vectors, ids=args.ids, mode=args.mode,
        batch_size=args.batch_size, device=args.device, runtime=args.encoder_runtime,
    )  # fmt: skip
    if args.publish:
        from index import load_index
        from index.pointer import publish

        load_index(out, device="cpu")  # prove it loads before any service is pointed at it
        publish(out.parent, out.name)
        record["published"] = True
    print(json.dumps({"artifact": str(out)} | record))
    return 0


def _onnx(args: argparse.Namespace) -> int:
    from .onnx_export import with_onnx

    out, record = with_onnx(args.artifact, args.out, args.precision)
    if args.publish:
        from index import load_index
        from index.pointer import publish

        load_index(out, device="cpu")
        publish(out.parent, out.name)
        record["published"] = True
    print(json.dumps({"artifact": str(out)} | record))
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
    encoder = load_encoder(args.artifact, runtime=args.encoder_runtime, device=idx.device)
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
