"""Quality benchmark on SciFact (BEIR test, 300 queries): learned index vs the two-step recipe.

Rows, at M = 8 / 16 / 48 bytes per item (384-d all-MiniLM-L6-v2), nlist 64, nprobe 16 / 64:
exact float search with the off-the-shelf encoder; two-step with our builder (OPQ + IVF-PQ) and
with Faiss (OPQ + IndexIVFPQ); `distill` without labels, from the train split's query texts and
from pseudo-queries only; `jpq` and `poeem`, each alone and with `--distill-weight 1`, trained on
all 809 labelled training queries and on a seeded sample of 100 (the few-label regime); `auto` in
both regimes (the row of the mode it picks: same config, same seed). Every training row's config
comes from `model.train.resolve_config` (preset `scifact`), the code path of `jointpq train`; a
row overrides a default only where its name says so (`+ distill`: distill_weight 1).
Item embeddings come from the shared MiniLM cache, which the test suite proves our encoder
reproduces (cosine > 0.999); `--encode` (or a missing cache) encodes them here instead, on the
fast path (ONNX Runtime, length-sorted batches) the demo's first run uses.
Also: indexing time of our forward-pass indexing vs Faiss OPQ +
IVF-PQ train + add. SciFact comes from $JOINTPQ_SHARED_DATA (else ../shared/data).

    python bench/quality.py [--m 8 16 48] [--seeds 0 1 2] [--json]
    python bench/quality.py --tiny         # every row on a 96-query, 800-doc subset, 1 seed, 1 s of training each
"""

from __future__ import annotations

import argparse
import json
import re
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from harness import Report, markdown_table, parse_args, require_shared

from index import Index, build_ivfpq, exact_search
from model.auto import choose
from model.data import RetrievalData, load_beir, sample_labels
from model.evaluate import evaluate, metrics
from model.layer import IndexingLayer
from model.modes import TrainInputs
from model.train import resolve_config, train


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


def encode_scifact(data: RetrievalData, doc_ids: list[str], q_ids: list[str], emit, progress: bool):
    """(corpus (n, 384), queries (m, 384)) float32 from all-MiniLM-L6-v2 on the fastest runtime
    here (`model.onnx_runtime.accelerate`: ONNX Runtime, else torch), batches sorted by length."""
    from model.encoders import MiniLMEncoder
    from model.onnx_runtime import accelerate

    enc = MiniLMEncoder()
    runtime = accelerate(enc)["runtime"]
    out = []
    for what, texts in (("corpus", [data.corpus[d] for d in doc_ids]), ("queries", [data.queries[q] for q in q_ids])):
        t0 = time.perf_counter()
        out.append(enc.encode(texts, progress=progress, desc=f"MiniLM ({runtime}): {what}").numpy())
        took = time.perf_counter() - t0
        emit({"event": "encode", "what": what, "runtime": runtime, "items": len(texts), "seconds": took,
              "items_per_s": len(texts) / took})  # fmt: skip
    return out[0], out[1]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--m", type=int, nargs="+", default=[8, 16, 48])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--nprobe", type=int, nargs="+", default=[16, 64])
    p.add_argument("--labels", type=int, nargs="+", default=[0, 100], help="labelled training queries (0: all)")
    p.add_argument("--ablation-m", type=int, nargs="*", default=[], help="M values that get the poeem ablations")
    p.add_argument("--rows", nargs="*", help="only the training rows whose name starts with one of these")
    p.add_argument("--synthetic", type=int, default=1_000_000, help="items for the indexing-time row (0: skip)")
    p.add_argument("--indexing-only", action="store_true", help="only the indexing-time rows")
    p.add_argument("--no-scifact-indexing", action="store_true", help="indexing rows: synthetic only")
    p.add_argument("--nlist", type=int, default=64, help="IVF cells of every index")
    p.add_argument("--queries", type=int, default=0, help="first N judged queries per split (0: all)")
    p.add_argument("--docs", type=int, default=0, help="corpus subset: judged docs + random others up to N (0: all)")
    p.add_argument("--train-seconds", type=float, help="cap on each training run (default: none)")
    p.add_argument("--threads", type=int, default=2, help="torch and Faiss (OpenMP) threads")
    p.add_argument("--preset", default="scifact", help="the training preset every row starts from")
    p.add_argument(
        "--encode", action="store_true",
        help="encode corpus and queries with MiniLM (ONNX Runtime, length-sorted batches) instead of the shared cache",
    )  # fmt: skip
    p.add_argument("--json", action="store_true")
    p.add_argument("--summarize", nargs="+", type=Path, help="only the tables and targets of earlier --json runs")
    args = parse_args(
        p,
        tiny={
            "m": [8], "seeds": [0], "nprobe": [4, 16], "nlist": 16, "labels": [0, 40], "ablation_m": [8],
            "queries": 96, "docs": 800, "train_seconds": 1.0, "synthetic": 0, "threads": 1, "preset": "smoke",
        },
    )  # fmt: skip
    if args.summarize:  # e.g. one --json run per M in parallel processes, then one table
        rows = [json.loads(ln) for f in args.summarize for ln in f.read_text().splitlines() if ln.startswith("{")]
        measured = [r for r in rows if "ndcg@10" in r and r.get("nprobe") is not None]
        args.m = sorted({r["M"] for r in measured})
        args.seeds = sorted({r["seed"] for r in measured})
        args.nprobe = sorted({r["nprobe"] for r in measured})
        args.json = False
        summarize(rows, args, Report(False, line))
        return
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
    if args.encode or not (cache / "corpus.npy").is_file():  # the fast path, as the demo's first run
        xb, xq = encode_scifact(data, doc_ids, q_ids, emit, progress=not args.json)
    else:
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

    auto_rows: dict[tuple, dict[str, list[dict]]] = {}
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
            start = ours  # every training row starts from this very build (same builder, same seed)
            for label, mode, regime, values in training_rows(data, args, M):
                if args.rows and not any(label.startswith(r) for r in args.rows):
                    continue
                rdata = data if not regime else sample_labels(data, "train", regime, seed)
                if mode == "distill" and "pseudo" in label:  # no query text at all: the corpus's own sentences
                    rdata = replace(rdata, queries={}, qrels={})
                cfg = resolve_config(
                    mode, preset=args.preset, M=M, nlist=args.nlist, seed=seed, max_seconds=args.train_seconds, **values
                )
                inputs = TrainInputs(item_embeddings=torch.from_numpy(xb), memo=memo, start=start)
                if mode == "distill" and "pseudo" not in label:
                    inputs.queries = [data.queries[q] for q in data.qrels["train"]]
                    inputs.query_source = "train split query texts (labels unused)"
                res = train(rdata, cfg, inputs, progress=False)
                steps = len(res.history)  # gradient steps taken: --tiny shows its rows did train
                emit({"event": "train", "engine": label, "M": M, "seed": seed, "steps": steps, "selected": res.selected,
                      "validation": res.validation.get("curve"), **res.timings})  # fmt: skip
                idx = Index.in_memory(res.index)
                for r in evaluate(res.query_encoder, idx, data, "test", args.nprobe):
                    emit({"engine": label, "M": M, "seed": seed, **r})
                    auto_rows.setdefault((M, seed, regime), {}).setdefault(label, []).append(r)
            for regime in args.labels:  # auto: the row of the mode it picks, same config and seed
                rdata = data if not regime else sample_labels(data, "train", regime, seed)
                choice = choose(rdata)
                if choice.mode == "distill":  # the data set's query texts (its train split's), labels unused
                    label = "distill (train query texts)"
                else:
                    label = row_label(
                        choice.mode, choice.values.get("distill_weight", 0), regime, len(data.qrels["train"])
                    )
                emit({"event": "auto", "labels": regime or "all", "M": M, "seed": seed, "picks": label,
                      "reason": choice.reason})  # fmt: skip
                picked = auto_rows.get((M, seed, 0), {}) | auto_rows.get((M, seed, regime), {})  # distill: regime 0
                for r in evaluate_rows(picked, label):
                    emit({**r, "engine": f"auto [{regime or 'all'}]", "M": M, "seed": seed})

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


def labels_of(engine: str) -> int | None:
    """The labelled-query count in a row's name ("jpq [100 labels]" -> 100), None for others."""
    m = re.search(r"\[(\d+) labels\]", engine)
    return int(m.group(1)) if m else None


def same_regime(engine: str, regime: str, most: int) -> bool:
    """Rows an `auto [regime]` row competes with: the label-free ones and those trained on as many
    labels ("all": the largest count, every labelled training query)."""
    if engine.startswith("distill"):
        return True
    n = labels_of(engine)
    return n is not None and n == (most if regime == "all" else int(regime))


def row_label(mode: str, distill_weight: float, regime: int, n_all: int) -> str:
    what = f"{mode} + distill" if distill_weight else mode
    return f"{what} [{regime or n_all} labels]"


def training_rows(data: RetrievalData, args: argparse.Namespace, M: int) -> list[tuple[str, str, int, dict]]:
    """(label, mode, labelled queries (0: all), config values) of every training row."""
    n_all = len(data.qrels["train"])
    rows = [
        ("distill (train query texts)", "distill", 0, {}),
        ("distill (pseudo-queries)", "distill", 0, {}),
    ]
    for regime in args.labels:
        for mode in ("jpq", "poeem"):
            for weight in (0.0, 1.0):
                rows.append((row_label(mode, weight, regime, n_all), mode, regime, {"distill_weight": weight}))
    if M in args.ablation_m:
        rows += [
            ("two-step fine-tuned (OPQ)", "poeem", 0, {"quantize": False}),
            ("poeem no rotation", "poeem", 0, {"rotation": False}),
            ("poeem no warm start", "poeem", 0, {"warm_start": False}),
        ]
    return rows


def evaluate_rows(picked: dict[str, list[dict]], label: str) -> list[dict]:
    """The metric rows (one per nprobe) of the training row `label`, as emitted (none if not run)."""
    return picked.get(label, [])


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


DISTILL = ("distill (train query texts)", "distill (pseudo-queries)")


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
    faiss_name = "two-step Faiss (OPQ)"
    for M in args.m:
        for n in args.nprobe:
            faiss_m = mean.get((faiss_name, M, n))
            if not faiss_m:
                continue
            for e in DISTILL:  # label-free: >= Faiss on both metrics; M=8 half the gap; M=48 97 % of exact
                d = mean.get((e, M, n))
                if not d:
                    continue
                row = {"event": "target", "engine": e, "M": M, "nprobe": n,
                       "ndcg_ge_faiss": d["ndcg@10"] >= faiss_m["ndcg@10"],
                       "recall100_ge_faiss": d["recall@100"] >= faiss_m["recall@100"]}  # fmt: skip
                gap = exact["ndcg@10"] - faiss_m["ndcg@10"]
                if M == 8 and gap > 0:
                    row["gap_closed_ndcg"] = (d["ndcg@10"] - faiss_m["ndcg@10"]) / gap
                    row["half_gap_ok"] = row["gap_closed_ndcg"] >= 0.5
                if M == 48:
                    row["share_of_exact"] = d["ndcg@10"] / exact["ndcg@10"]
                    row["share_ok"] = row["share_of_exact"] >= 0.97
                emit(row)
            for e in [k[0] for k in mean if k[0].startswith("auto [") and k[1:] == (M, n)]:
                a = mean[(e, M, n)]
                regime = e[len("auto [") : -1]  # "all" or a number of labelled queries
                most = max((labels_of(k[0]) or 0) for k in mean)
                peers = [v for k, v in mean.items() if k[1:] == (M, n) and same_regime(k[0], regime, most)]
                best = max(peers, key=lambda v: v["ndcg@10"])
                emit({"event": "target", "engine": e, "M": M, "nprobe": n,
                      "ndcg_ge_faiss": a["ndcg@10"] >= faiss_m["ndcg@10"],
                      "recall100_ge_faiss": a["recall@100"] >= faiss_m["recall@100"],
                      "ndcg_minus_best_row": a["ndcg@10"] - best["ndcg@10"]})  # fmt: skip
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
