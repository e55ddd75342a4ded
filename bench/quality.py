"""Quality benchmark on SciFact (BEIR test, 300 queries): jointly learned index vs two-step.

Rows, at M = 8 / 16 / 48 bytes per item (384-d all-MiniLM-L6-v2), nlist 64, an nprobe sweep:
exact float search with the off-the-shelf encoder; two-step with our builder (OPQ + IVF-PQ);
two-step with Faiss (OPQ + IndexIVFPQ); `poeem` (frozen MiniLM + a trainable residual head per
tower, trained end to end with the indexing layer) and its ablations (no rotation, no warm start);
`jpq` (MiniLM query encoder fine-tuned). Item embeddings come from the shared MiniLM cache, which the test suite
proves our encoder reproduces (cosine > 0.999). Also: indexing time of our forward-pass indexing
vs Faiss OPQ + IVF-PQ train + add, on SciFact and on a synthetic 1M corpus.
SciFact comes from $JOINTPQ_SHARED_DATA (else ../shared/data); missing, the run stops with an error.

    python bench/quality.py [--m 8 16 48] [--seeds 0 1 2] [--jpq-epochs 2] [--json]
    python bench/quality.py --tiny         # every row on a 96-query, 800-doc subset, 1 seed, 1 s of training each
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace

import numpy as np
import torch
from harness import Report, markdown_table, parse_args, require_shared

from index import Index, build_ivfpq, exact_search
from model.data import RetrievalData, load_beir
from model.evaluate import evaluate, metrics
from model.layer import IndexingLayer
from model.train import TrainConfig, train_jpq, train_poeem


class Cached:
    """A 'query encoder' that returns the cached MiniLM query embeddings (exact and two-step rows)."""

    def __init__(self, texts_to_rows: dict[str, int], emb: np.ndarray):
        self.rows, self.emb = texts_to_rows, emb

    def encode(self, texts):
        return torch.from_numpy(self.emb[[self.rows[t] for t in texts]])


def subset(data: RetrievalData, n_queries: int, n_docs: int, seed: int = 0) -> RetrievalData:
    """The first `n_queries` judged queries of each split (0: all) and a corpus of their judged
    documents plus random others up to `n_docs` (0: all): --tiny's data, every qrel still inside."""
    if n_queries:
        data = replace(data, qrels={s: dict(list(q.items())[:n_queries]) for s, q in data.qrels.items()})
    return data.subset(n_docs, seed) if n_docs else data


def faiss_two_step(xb: np.ndarray, M: int, nlist: int, seed: int):
    import faiss

    index = faiss.index_factory(xb.shape[1], f"OPQ{M},IVF{nlist},PQ{M}", faiss.METRIC_INNER_PRODUCT)
    ivf = faiss.downcast_index(faiss.extract_index_ivf(index))
    ivf.do_polysemous_training = False
    ivf.cp.seed = ivf.pq.cp.seed = seed + 1234
    t0 = time.perf_counter()
    index.train(xb)
    index.add(xb)
    return index, time.perf_counter() - t0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--m", type=int, nargs="+", default=[8, 16, 48])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--nprobe", type=int, nargs="+", default=[16, 64])
    p.add_argument("--jpq-epochs", type=int, default=2)
    p.add_argument("--poeem-epochs", type=int, default=10)
    p.add_argument("--ablation-m", type=int, nargs="*", default=[8], help="M values that get the poeem ablations")
    p.add_argument("--skip-jpq", action="store_true")
    p.add_argument("--synthetic", type=int, default=1_000_000, help="items for the indexing-time row (0: skip)")
    p.add_argument("--indexing-only", action="store_true", help="only the indexing-time rows")
    p.add_argument("--no-scifact-indexing", action="store_true", help="indexing rows: synthetic only")
    p.add_argument("--nlist", type=int, default=64, help="IVF cells of every index")
    p.add_argument("--queries", type=int, default=0, help="first N judged queries per split (0: all)")
    p.add_argument("--docs", type=int, default=0, help="corpus subset: judged docs + random others up to N (0: all)")
    p.add_argument("--train-seconds", type=float, help="cap on each training run (default: none)")
    p.add_argument("--threads", type=int, default=2, help="torch and Faiss (OpenMP) threads")
    p.add_argument("--json", action="store_true")
    args = parse_args(
        p,
        tiny={
            "m": [8], "seeds": [0], "nprobe": [4, 16], "nlist": 16, "jpq_epochs": 1, "poeem_epochs": 1,
            "queries": 96, "docs": 800, "train_seconds": 1.0, "synthetic": 0, "threads": 1,
        },
    )  # fmt: skip
    scifact = require_shared("scifact")  # before any work: fail fast
    import faiss

    # one thread in --tiny: OpenMP threads spin, and on a busy 2-core machine two of them ran OPQ 5x slower
    torch.set_num_threads(args.threads)
    faiss.omp_set_num_threads(args.threads)
    emit = Report(args.json, line)

    data = load_beir(scifact)
    cache = scifact / "minilm-l6-v2"
    doc_ids = json.loads((cache / "corpus_ids.json").read_text())
    q_ids = json.loads((cache / "queries_ids.json").read_text())
    assert doc_ids == list(data.corpus) and q_ids == list(data.queries)
    xb = np.load(cache / "corpus.npy")
    xq = np.load(cache / "queries.npy")
    if args.queries or args.docs:  # the cache's rows for the documents kept, in corpus order
        data = subset(data, args.queries, args.docs)
        row_of = {d: i for i, d in enumerate(doc_ids)}
        xb = xb[[row_of[d] for d in data.corpus]]
        doc_ids = list(data.corpus)
        emit({"event": "subset", "docs": len(doc_ids), **{s: len(q) for s, q in data.qrels.items()}})
    cached = Cached({data.queries[q]: i for i, q in enumerate(q_ids)}, xq)
    # frozen MiniLM outputs for the poeem towers (minilm-head): text -> cached embedding
    memo = {data.corpus[d]: torch.from_numpy(xb[i]) for i, d in enumerate(doc_ids)}
    memo.update({data.queries[q]: torch.from_numpy(xq[i]) for i, q in enumerate(q_ids)})
    qrels = data.qrels["test"]
    test_q = [q for q in q_ids if q in qrels]

    _, rows = exact_search(cached.encode([data.queries[q] for q in test_q]), xb, 100, "ip", device="cpu")
    exact = metrics([[doc_ids[r] for r in row] for row in rows], [qrels[q] for q in test_q])
    emit({"engine": "exact float", "M": 1536, "seed": None, "nprobe": None, **exact})

    for M in [] if args.indexing_only else args.m:
        for seed in args.seeds:
            t0 = time.perf_counter()
            ours = build_ivfpq(xb, nlist=args.nlist, M=M, metric="ip", opq=True, ids=doc_ids, seed=seed)
            emit(
                {"event": "build", "engine": "two-step ours", "M": M, "seed": seed, "seconds": time.perf_counter() - t0}
            )
            idx = Index.in_memory(ours)
            for r in evaluate(cached, idx, data, "test", args.nprobe):
                emit({"engine": "two-step ours (OPQ)", "M": M, "seed": seed, **r})
            fidx, took = faiss_two_step(xb, M, args.nlist, seed)
            emit({"event": "build", "engine": "two-step Faiss", "M": M, "seed": seed, "seconds": took})
            import faiss

            for nprobe in args.nprobe:
                params = faiss.SearchParametersPreTransform(index_params=faiss.SearchParametersIVF(nprobe=nprobe))
                _, I = fidx.search(cached.encode([data.queries[q] for q in test_q]).numpy(), 100, params=params)  # noqa: E741
                m = metrics([[doc_ids[r] for r in row if r >= 0] for row in I], [qrels[q] for q in test_q])
                emit({"engine": "two-step Faiss (OPQ)", "M": M, "seed": seed, "nprobe": nprobe, **m})
            variants = (
                ("poeem", True, True, True),
                ("two-step fine-tuned (OPQ)", True, True, False),
                ("poeem no rotation", False, True, True),
                ("poeem no warm start", True, False, True),
            )
            for label, rotation, warm, quantize in variants:
                if label.startswith("poeem ") and M not in args.ablation_m:
                    continue
                # "two-step fine-tuned": the same heads trained unquantized, then OPQ + IVF-PQ offline
                cfg = TrainConfig(
                    encoder="minilm-head",
                    shared_towers=False,
                    M=M,
                    nlist=args.nlist,
                    epochs=args.poeem_epochs,
                    max_seconds=args.train_seconds,
                    lr=1e-3,
                    warmup_steps=30,
                    rotation=rotation,
                    warm_start=warm,
                    quantize=quantize,
                    seed=seed,
                )
                res = train_poeem(data, cfg, progress=False, memo=memo)
                steps = len(res.history)  # gradient steps taken: --tiny shows its rows did train
                emit({"event": "train", "engine": label, "M": M, "seed": seed, "steps": steps, **res.timings})
                idx = Index.in_memory(res.index)
                for r in evaluate(res.query_encoder, idx, data, "test", args.nprobe):
                    emit({"engine": label, "M": M, "seed": seed, **r})
            if args.skip_jpq:
                continue
            cfg = TrainConfig(
                mode="jpq",
                encoder="minilm",
                M=M,
                nlist=args.nlist,
                epochs=args.jpq_epochs,
                max_seconds=args.train_seconds,
                lr=5e-6,
                codebook_lr=1e-4,
                batch_size=32,
                seed=seed,
            )
            res = train_jpq(data, cfg, item_embeddings=torch.from_numpy(xb), progress=False)
            emit({"event": "train", "engine": "jpq", "M": M, "seed": seed, "steps": len(res.history), **res.timings})
            idx = Index.in_memory(res.index)
            for r in evaluate(res.query_encoder, idx, data, "test", args.nprobe):
                emit({"engine": "jpq", "M": M, "seed": seed, **r})

    # indexing time: forward pass of a trained layer vs Faiss OPQ + IVF-PQ train + add
    sets = [] if args.no_scifact_indexing else [("scifact", xb)]
    if args.synthetic:
        from service.demo import synthetic_clustered

        sets.append((f"synthetic-{args.synthetic}", synthetic_clustered(args.synthetic, 1, d=384, seed=0)[0]))
    for name, x in sets:
        for M in args.m:
            layer = IndexingLayer(x.shape[1], args.nlist, M, 8, "ip")
            layer.warm_start(torch.from_numpy(x[:20000]), niter=10)  # stands in for a trained layer
            t0 = time.perf_counter()
            layer.to_ivfpq(torch.from_numpy(x), [str(i) for i in range(len(x))])
            ours = time.perf_counter() - t0
            _, faiss_s = faiss_two_step(x, M, args.nlist, 0)
            emit(
                {
                    "event": "indexing",
                    "data": name,
                    "n": len(x),
                    "M": M,
                    "forward_pass_seconds": ours,
                    "faiss_train_add_seconds": faiss_s,
                    "speedup": faiss_s / ours,
                }
            )
    if not args.indexing_only:
        summarize(emit.rows, args, emit)
    else:
        for r in emit.rows:
            if r.get("event") == "indexing":
                emit({"event": "target", "indexing": r["data"], "M": r["M"], "ok": r["speedup"] >= 10})


def line(row: dict) -> str:
    """A metrics row as one aligned line; anything else as a `# {json}` comment."""
    if "ndcg@10" not in row:
        return "# " + json.dumps(row)
    return (
        f"{row['engine']:<22} M={row['M']!s:<3} seed={row['seed']!s:<4} nprobe={row['nprobe']!s:<4} "
        f"nDCG@10={row['ndcg@10']:.4f} R@100={row['recall@100']:.4f} R@10={row['recall@10']:.4f} "
        f"MRR@10={row['mrr@10']:.4f}"
    )


def mean_table(mean: dict[tuple, dict], ms: list[int], nprobes: list[int]) -> str:
    """Engines x M rows, one `nDCG@10 ± std / recall@100` cell per nprobe (engines measured at every nprobe)."""
    engines = list(dict.fromkeys(k[0] for k in mean))
    body = []
    for M in ms:
        for e in engines:
            cells = [mean.get((e, M, n)) for n in nprobes]
            if all(c is not None for c in cells):
                txt = (f"{c['ndcg@10']:.4f} ± {c['std_ndcg']:.4f} / {c['recall@100']:.4f}" for c in cells)
                body.append([e, M, *txt])
    return markdown_table(["engine", "M"] + [f"nprobe {n}" for n in nprobes], body)


JOINT = ("poeem", "jpq")
TWO_STEP = ("two-step ours (OPQ)", "two-step Faiss (OPQ)")


def summarize(rows: list[dict], args: argparse.Namespace, emit) -> None:
    """Mean over seeds per (engine, M, nprobe) as a markdown table, then the issue's targets."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        if "ndcg@10" in r and r["nprobe"] is not None:
            groups.setdefault((r["engine"], r["M"], r["nprobe"]), []).append(r)
    mean = {
        key: {m: float(np.mean([r[m] for r in rs])) for m in ("ndcg@10", "recall@100", "recall@10", "mrr@10")}
        | {"n": len(rs), "std_ndcg": float(np.std([r["ndcg@10"] for r in rs]))}
        for key, rs in groups.items()
    }
    exact = next(r for r in rows if r.get("engine") == "exact float")
    if not args.json:  # the table would break the JSON lines
        print(
            f"\n## Mean over seeds {args.seeds} (nDCG@10 ± std / recall@100; exact float {exact['ndcg@10']:.4f} / "
            f"{exact['recall@100']:.4f})\n"
        )
        print(mean_table(mean, args.m, args.nprobe) + "\n")
    for M in args.m:
        for n in args.nprobe:
            joint = [(mean[(e, M, n)], e) for e in JOINT if (e, M, n) in mean]
            base = [mean[(e, M, n)] for e in TWO_STEP if (e, M, n) in mean]
            if not joint or not base:
                continue
            best, name = max(joint, key=lambda t: t[0]["ndcg@10"])
            ok_ndcg = all(best["ndcg@10"] >= b["ndcg@10"] for b in base)
            ok_r100 = all(best["recall@100"] >= b["recall@100"] for b in base)
            row = {
                "event": "target",
                "M": M,
                "nprobe": n,
                "best_joint": name,
                "ndcg_ok": ok_ndcg,
                "recall100_ok": ok_r100,
            }
            ft = mean.get(("two-step fine-tuned (OPQ)", M, n))
            if ft:  # not one of the baselines: the fair one for poeem's supervised heads
                row["vs_fine_tuned_two_step"] = {
                    "ndcg@10": best["ndcg@10"] - ft["ndcg@10"],
                    "recall@100": best["recall@100"] - ft["recall@100"],
                }
            faiss_m = mean.get(("two-step Faiss (OPQ)", M, n))
            if M == 8 and faiss_m:
                gap = exact["ndcg@10"] - faiss_m["ndcg@10"]
                row["gap_closed_ndcg"] = (best["ndcg@10"] - faiss_m["ndcg@10"]) / gap if gap > 0 else None
            emit(row)
    for r in rows:
        if r.get("event") == "indexing":
            emit(
                {
                    "event": "target",
                    "indexing": r["data"],
                    "M": r["M"],
                    "speedup": r["speedup"],
                    "ok": r["speedup"] >= 10,
                }
            )


if __name__ == "__main__":
    main()
