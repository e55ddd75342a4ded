"""Living index benchmarks: unseen items indexed by a forward pass, indexing throughput, live updates.

Parts (`--parts`, default all):

* ``unseen``: the paper's claim in production. SciFact, 384-d MiniLM (shared cache), nlist 64: train
  the mode `jointpq train` picks (auto: poeem with 809 labels) on a seeded 80 % of the corpus
  (training labels that point outside it dropped; test-judged documents fall on either side), then
  `jointpq index --mode add` the other 20 % through the artifact's own item tower; test nDCG@10 /
  recall@100 against the same config trained on 100 %, and the two-step Faiss OPQ + IVF-PQ on
  100 %, at M bytes per item, several seeds. Target: the forward-pass rows lose <= 0.01 nDCG@10.
* ``indexing``: items/s of `jointpq index` (texts through a hashed tower and a MiniLM-head tower
  on this CPU; 1M synthetic 128-d vectors) beside Faiss `add` of the same vectors into an
  IndexIVFPQ with the same quantizer.
* ``updates``: the 1M synthetic artifact (nlist 1024, M 16) served by `jointpq serve` (one worker,
  fsync on): upserts/s over HTTP (vectors, batch 1 and 100; texts on a hashed-tower artifact),
  search QPS and p50/p99 in process (`index.live.LiveIndex`, Faiss backend, nprobe 32) with a
  delta of 0 / 1 % / 10 % of the base (and 1 % deleted), compaction time of 1M + 10 %.

    python bench/live.py [--parts unseen indexing updates] [--m 8 16] [--seeds 0 1] [--json]
    python bench/live.py --tiny       # seconds: small data through every code path (tests use it)
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np
import torch
from harness import Report, Service, markdown_table, parse_args, require_shared

from index import Index, build_ivfpq, load_index, write_artifact
from index.live import LiveIndex
from index.pointer import publish
from model.data import RetrievalData, load_beir
from model.evaluate import evaluate

TOKEN = "bench-live-token"


# --- unseen items --------------------------------------------------------------------------------


def split_corpus(data: RetrievalData, fraction: float, seed: int) -> tuple[RetrievalData, list[str]]:
    """(data whose corpus is a seeded `fraction` of the documents, with training qrels restricted to
    it; the held-out doc ids). Test qrels stay whole: the test is run after the rest is added."""
    rng = np.random.default_rng(seed)
    ids = list(data.corpus)
    held = set(np.asarray(ids, dtype=object)[rng.permutation(len(ids))[: round((1 - fraction) * len(ids))]].tolist())
    corpus = {d: t for d, t in data.corpus.items() if d not in held}
    train = {}
    for q, docs in data.qrels.get("train", {}).items():
        kept = {d: s for d, s in docs.items() if d in corpus}
        if any(s > 0 for s in kept.values()):
            train[q] = kept
    return RetrievalData(data.path, corpus, data.queries, {**data.qrels, "train": train}), sorted(held)


def unseen(args: argparse.Namespace, emit: Report) -> None:
    from quality import Cached, faiss_two_step, subset

    from model.auto import choose
    from model.indexing import index_catalog
    from model.modes import TrainInputs
    from model.towers import load_item_encoder
    from model.train import resolve_config, train, write_trained_artifact

    scifact = require_shared("scifact")
    data = load_beir(scifact)
    cache = scifact / "minilm-l6-v2"
    doc_ids = json.loads((cache / "corpus_ids.json").read_text())
    q_ids = json.loads((cache / "queries_ids.json").read_text())
    xb_all, xq = np.load(cache / "corpus.npy"), np.load(cache / "queries.npy")
    if args.docs:
        data = subset(data, args.queries, args.docs)
    row_of = {d: i for i, d in enumerate(doc_ids)}
    xb = xb_all[[row_of[d] for d in data.corpus]]
    memo = {data.corpus[d]: torch.from_numpy(xb_all[row_of[d]]) for d in data.corpus}
    memo.update({data.queries[q]: torch.from_numpy(xq[i]) for i, q in enumerate(q_ids) if q in data.queries})
    cached = Cached({data.queries[q]: i for i, q in enumerate(q_ids) if q in data.queries}, xq)
    test_q = [q for q in data.queries if q in data.qrels["test"]]
    tmp = Path(tempfile.mkdtemp(prefix="bench-live-"))
    for M in args.m:
        for seed in args.seeds:
            base = {"M": M, "seed": seed}
            choice = choose(data)
            values = {"M": M, "nlist": args.nlist, "seed": seed, **choice.values, **dict(args.set or [])}
            if args.train_seconds:
                values["max_seconds"] = args.train_seconds
            # 1. the model trained on all items (the reference)
            cfg = resolve_config(choice.mode, preset=args.preset, **values)
            full = train(data, cfg, TrainInputs(item_embeddings=torch.from_numpy(xb), memo=memo), progress=False)
            for r in evaluate(full.query_encoder, Index.in_memory(full.index), data, "test", args.nprobe):
                emit({"row": f"{choice.mode} trained on 100 %", **base, **r})
            # 2. trained on 80 %, the other 20 % indexed by one forward pass of the artifact's item tower
            part, held = split_corpus(data, 0.8, seed)
            if args.control:  # all items, but only the labels the 80 % run can use: separates the two effects
                same_labels = RetrievalData(data.path, data.corpus, data.queries, {**data.qrels, **part.qrels})
                ctrl = train(
                    same_labels, cfg, TrainInputs(item_embeddings=torch.from_numpy(xb), memo=memo), progress=False
                )
                for r in evaluate(ctrl.query_encoder, Index.in_memory(ctrl.index), data, "test", args.nprobe):
                    emit({"row": f"{choice.mode} on 100 % items, the 80 % run's labels", **base, **r})
            xb_part = torch.from_numpy(xb_all[[row_of[d] for d in part.corpus]])
            t0 = time.perf_counter()
            res = train(part, cfg, TrainInputs(item_embeddings=xb_part, memo=memo), progress=False)
            train_s = time.perf_counter() - t0
            art = write_trained_artifact(tmp / f"a-{M}-{seed}", res, cfg, str(scifact))
            items = tmp / f"held-{M}-{seed}.jsonl"
            items.write_text("".join(json.dumps({"_id": d, "text": data.corpus[d]}) + "\n" for d in held))
            tower = load_item_encoder(art)
            if hasattr(tower, "memo"):  # a head tower: its frozen MiniLM base reads the shared cache
                tower.memo, tower.memoize = memo, True
            out, record = index_catalog(art, tmp / f"b-{M}-{seed}", corpus=items, mode="add", encoder=tower,
                                        progress=False)  # fmt: skip
            emit({"event": "add", **base, "trained_items": len(part.corpus), "added": record["added"],
                  "train_seconds": round(train_s, 1), "index_seconds": record["seconds"],
                  "drift_ratio": record["drift"]["distortion_ratio"]})  # fmt: skip
            idx = load_index(out, device="cpu", backend="torch")
            for r in evaluate(res.query_encoder, idx, data, "test", args.nprobe):
                emit({"row": f"{choice.mode} on 80 % + forward-pass add of 20 %", **base, **r})
            # 3. two-step Faiss trained on all items, and trained on the same 80 % with the rest added:
            # what unseen items cost the classic recipe on this corpus (its PQ overfits 4k items too)
            import faiss

            from model.evaluate import metrics

            qv = cached.encode([data.queries[q] for q in test_q]).numpy()
            keep = np.array([d in part.corpus for d in data.corpus])
            for label, train_x in (("on 100 %", xb), ("trained on 80 %, all added", xb[keep])):
                fidx, _ = faiss_two_step(train_x, M, args.nlist, seed)
                if len(train_x) != len(xb):
                    fidx.reset()
                    fidx.add(xb)
                for nprobe in args.nprobe:
                    params = faiss.SearchParametersPreTransform(index_params=faiss.SearchParametersIVF(nprobe=nprobe))
                    _, rows = fidx.search(qv, 100, params=params)
                    ids = list(data.corpus)
                    judged = [data.qrels["test"][q] for q in test_q]
                    m = metrics([[ids[r] for r in row if r >= 0] for row in rows], judged)
                    emit({"row": f"two-step Faiss (OPQ) {label}", **base, "nprobe": nprobe, **m})


# --- indexing throughput -------------------------------------------------------------------------


def tower_artifact(root: Path, encoder, texts: list[str], ids: list[str], M: int, nlist: int) -> Path:
    """An artifact whose both towers are `encoder` (a two-step index over its embeddings): what
    `jointpq index` needs to run; the towers' training does not change their speed."""
    from model.towers import tower_files

    x = encoder.encode(texts, batch_size=64)
    idx = build_ivfpq(x, nlist=nlist, M=M, metric="ip", opq=True, ids=ids, seed=0)
    files, desc = tower_files(encoder, encoder)
    return write_artifact(root, idx, training={"item_encoder": desc}, extra_files=files)


def indexing(args: argparse.Namespace, emit: Report) -> None:
    import faiss

    from index.faiss_interop import to_faiss_ivfpq
    from model.encoders import HashedNgramEncoder, HeadEncoder, MiniLMEncoder, minilm_available
    from model.indexing import index_catalog
    from service.demo import synthetic_clustered

    tmp = Path(tempfile.mkdtemp(prefix="bench-live-idx-"))
    scifact = require_shared("scifact")
    data = load_beir(scifact, splits=())
    ids = list(data.corpus)[: args.text_items]
    texts = [data.corpus[i] for i in ids]
    corpus = tmp / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"_id": i, "text": t}) + "\n" for i, t in zip(ids, texts, strict=True)))
    towers = [("hashed (128-d)", HashedNgramEncoder(dim=128))]
    if "minilm-head" in args.towers and minilm_available():
        towers.append(("minilm-head (384-d)", HeadEncoder(MiniLMEncoder())))
    for name, enc in towers:
        enc.eval()
        if isinstance(enc, HeadEncoder):
            enc.memoize = False  # the real forward pass, not a cache
        n_build = min(len(texts), 2048)
        art = tower_artifact(tmp / f"t-{len(list(tmp.iterdir()))}", enc, texts[:n_build], ids[:n_build], 8, 16)
        _, rec = index_catalog(art, tmp / f"o-{len(list(tmp.iterdir()))}", corpus=corpus, progress=False)
        share = round(rec["encode_seconds"] / rec["seconds"], 3)
        emit({"event": "indexing", "what": f"texts, {name} tower", "n": rec["given"], "seconds": rec["seconds"],
              "items_per_second": rec["items_per_second"], "encode_share": share})  # fmt: skip
    x, _ = synthetic_clustered(args.n, 1, d=128, seed=0)
    vec_ids = [f"item-{i}" for i in range(args.n)]
    nlist = min(1024, args.n // 64)
    base = build_ivfpq(x[: min(args.n, 200_000)], nlist=nlist, M=16, metric="ip", ids=vec_ids[: min(args.n, 200_000)])
    art = write_artifact(tmp / "vec", base)
    np.save(tmp / "x.npy", x)
    (tmp / "ids.json").write_text(json.dumps(vec_ids))
    _, rec = index_catalog(art, tmp / "vec-out", vectors=tmp / "x.npy", ids=tmp / "ids.json", progress=False)
    emit({"event": "indexing", "what": "vectors (jointpq index)", "n": args.n, "seconds": rec["seconds"],
          "items_per_second": rec["items_per_second"]})  # fmt: skip
    empty = build_ivfpq(x[: nlist * 40], nlist=nlist, M=16, metric="ip")  # same shapes; its items are dropped
    ivf = to_faiss_ivfpq(empty)
    ivf.reset()
    t0 = time.perf_counter()
    ivf.add(x)
    took = time.perf_counter() - t0
    emit({"event": "indexing", "what": "vectors (Faiss IndexIVFPQ.add)", "n": args.n, "seconds": round(took, 3),
          "items_per_second": round(args.n / took, 1), "threads": faiss.omp_get_max_threads()})  # fmt: skip


# --- live updates --------------------------------------------------------------------------------


def latency_qps(view, xq: np.ndarray, nprobe: int, seconds: float) -> dict:
    lat, t_end = [], time.perf_counter() + seconds
    i = 0
    while time.perf_counter() < t_end:
        t0 = time.perf_counter()
        view.search_rows(xq[i % len(xq)][None], 10, nprobe)
        lat.append(time.perf_counter() - t0)
        i += 1
    t0 = time.perf_counter()
    reps = 0
    while time.perf_counter() - t0 < seconds:
        view.search_rows(xq[:64], 10, nprobe)
        reps += 1
    return {
        "p50_ms": round(1e3 * statistics.median(lat), 3),
        "p99_ms": round(1e3 * float(np.percentile(lat, 99)), 3),
        "qps_batch1": round(len(lat) / sum(lat), 1),
        "qps_batch64": round(64 * reps / (time.perf_counter() - t0), 1),
    }


def upserts_per_second(url: str, make_items, batch: int, n_requests: int) -> dict:
    headers = {"Authorization": f"Bearer {TOKEN}"}
    lat = []
    with httpx.Client(timeout=120) as c:
        for r in range(n_requests):
            body = {"items": make_items(r, batch)}
            t0 = time.perf_counter()
            resp = c.post(f"{url}/admin/items", json=body, headers=headers)
            lat.append(time.perf_counter() - t0)
            if resp.status_code != 200:
                raise RuntimeError(f"upsert answered {resp.status_code}: {resp.text[:300]}")
    return {
        "batch": batch,
        "requests": n_requests,
        "items_per_second": round(batch * n_requests / sum(lat), 1),
        "p50_ms": round(1e3 * statistics.median(lat), 2),
        "p99_ms": round(1e3 * float(np.percentile(lat, 99)), 2),
    }


def updates(args: argparse.Namespace, emit: Report) -> None:
    from model.encoders import HashedNgramEncoder
    from service.compaction import write_compacted
    from service.demo import synthetic_clustered

    tmp = Path(tempfile.mkdtemp(prefix="bench-live-upd-"))
    x, xq = synthetic_clustered(args.n, 1000, d=128, seed=0)
    nlist = min(1024, args.n // 64)
    root = tmp / "root"
    t0 = time.perf_counter()
    idx = build_ivfpq(x, nlist=nlist, M=16, metric="ip", ids=[f"item-{i}" for i in range(args.n)], seed=0)
    write_artifact(root / "v1", idx)
    publish(root, "v1")
    emit({"event": "built", "n": args.n, "seconds": round(time.perf_counter() - t0, 1)})
    extra, _ = synthetic_clustered(args.n // 10, 1, d=128, seed=1)
    rng = np.random.default_rng(0)
    # HTTP upserts (fsync on), vectors
    with Service(root, batching="on", token=TOKEN) as svc:
        for batch, n_req in ((1, args.http_requests), (100, max(5, args.http_requests // 10))):

            def vec_items(r: int, b: int, batch: int = batch) -> list[dict]:
                return [{"id": f"new-{batch}-{r}-{j}", "vector": extra[(r * b + j) % len(extra)].tolist()}
                        for j in range(b)]  # fmt: skip

            emit(
                {
                    "event": "upserts",
                    "kind": "vectors",
                    "fsync": True,
                    **upserts_per_second(svc.url, vec_items, batch, n_req),
                }
            )
    # HTTP upserts, texts through a hashed item tower
    scifact = require_shared("scifact")
    data = load_beir(scifact, splits=())
    texts = list(data.corpus.values())
    text_root = tmp / "text-root"
    tower_artifact(text_root / "t1", HashedNgramEncoder(dim=128).eval(), texts[:2048], list(data.corpus)[:2048], 8, 16)
    publish(text_root, "t1")
    with Service(text_root, batching="on", token=TOKEN) as svc:
        for batch, n_req in ((1, args.http_requests), (100, max(5, args.http_requests // 10))):

            def text_items(r: int, b: int, batch: int = batch) -> list[dict]:
                return [{"id": f"t-{batch}-{r}-{j}", "text": texts[(r * b + j) % len(texts)]} for j in range(b)]

            emit({"event": "upserts", "kind": "texts (hashed tower)", "fsync": True,
                  **upserts_per_second(svc.url, text_items, batch, n_req)})  # fmt: skip
    # search with a delta, in process (Faiss backend as served on CPU)
    base = load_index(root / "v1", device="cpu", backend="auto")
    view = LiveIndex(base)
    measure = {"nprobe": args.search_nprobe, "seconds": args.seconds}
    emit({"event": "search", "delta": "0 %", "backend": base.backend, **latency_qps(view, xq, **measure)})
    for share in (0.01, 0.10):
        n_new = int(share * args.n)
        t0 = time.perf_counter()
        v = view.upsert([f"d-{i}" for i in range(n_new)], extra[:n_new])
        build_s = time.perf_counter() - t0
        emit({"event": "search", "delta": f"{round(share * 100)} %", "backend": base.backend,
              "delta_build_seconds": round(build_s, 2), **latency_qps(v, xq, **measure)})  # fmt: skip
    dead = [f"item-{i}" for i in rng.choice(args.n, args.n // 100, replace=False)]
    v, _ = view.upsert([f"d-{i}" for i in range(args.n // 100)], extra[: args.n // 100]).delete(dead)
    emit(
        {
            "event": "search",
            "delta": "1 % + 1 % deleted",
            "backend": base.backend,
            **latency_qps(v, xq, **measure),
        }
    )
    # one more write on a 10 % delta: the copy-on-write cost per batch
    v10 = view.upsert([f"d-{i}" for i in range(args.n // 10)], extra[: args.n // 10])
    t0 = time.perf_counter()
    v10.upsert(["one-more"], extra[:1])
    emit(
        {"event": "write", "delta_items": v10.delta.n, "apply_one_item_ms": round(1e3 * (time.perf_counter() - t0), 2)}
    )
    # compaction of 1M + 10 %
    t0 = time.perf_counter()
    out = write_compacted(root, root / "v1", v10.with_seq(1))
    emit(
        {"event": "compaction", "items": v10.n_live, "seconds": round(time.perf_counter() - t0, 2), "version": out.name}
    )


def line(row: dict) -> str | None:
    return " ".join(f"{k}={v}" for k, v in row.items() if k != "event")


def summarize(rows: list[dict]) -> None:
    quality = [r for r in rows if "row" in r]
    if quality:
        table = []
        keys = sorted({(r["row"], r["M"], r["nprobe"]) for r in quality}, key=lambda k: (k[1], k[2], k[0]))
        for row, M, nprobe in keys:
            rs = [r for r in quality if (r["row"], r["M"], r["nprobe"]) == (row, M, nprobe)]
            nd = [r["ndcg@10"] for r in rs]
            rc = [r["recall@100"] for r in rs]
            sd = f" ± {statistics.stdev(nd):.4f}" if len(nd) > 1 else ""
            table.append((M, nprobe, row, f"{np.mean(nd):.4f}{sd}", f"{np.mean(rc):.4f}", len(rs)))
        print(markdown_table(("M", "nprobe", "row", "nDCG@10", "recall@100", "seeds"), table))
        for M in sorted({r["M"] for r in quality}):
            for nprobe in sorted({r["nprobe"] for r in quality}):

                def mean(prefix: str, M: int = M, nprobe: int = nprobe) -> float:
                    v = [r["ndcg@10"] for r in quality if r["M"] == M and r["nprobe"] == nprobe and prefix in r["row"]]
                    return float(np.mean(v)) if v else float("nan")

                gap = mean("trained on 100") - mean("forward-pass add")
                unseen_only = mean("the 80 % run's labels") - mean("forward-pass add")
                faiss_gap = mean("Faiss (OPQ) on 100") - mean("Faiss (OPQ) trained on 80")
                print(f"target M={M} nprobe={nprobe}: forward-pass add loses {gap:+.4f} nDCG@10 against training on"
                      f" all items (<= 0.01: {'ok' if gap <= 0.01 else 'MISSED'}); {unseen_only:+.4f} of it at equal"
                      f" labels; Faiss loses {faiss_gap:+.4f} for the same unseen items")  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--parts", nargs="+", default=["unseen", "indexing", "updates"], choices=("unseen", "indexing", "updates")
    )
    p.add_argument("--m", type=int, nargs="+", default=[8, 16])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--nprobe", type=int, nargs="+", default=[16])
    p.add_argument("--nlist", type=int, default=64)
    p.add_argument("--search-nprobe", type=int, default=32, help="nprobe of the updates part's searches")
    p.add_argument("--preset", default="scifact")
    p.add_argument(
        "--no-control", dest="control", action="store_false",
        help="unseen: skip the control row (all items, the 80 %% run's labels: fewer labels vs unseen items)",
    )  # fmt: skip
    p.add_argument("--train-seconds", type=float, help="cap on each training run")
    p.add_argument(
        "--set", nargs="+", type=lambda kv: (kv.split("=")[0], json.loads(kv.split("=", 1)[1])), metavar="KEY=JSON",
        help="unseen: config values for every training run (e.g. catalog_items=64)",
    )  # fmt: skip
    p.add_argument("--queries", type=int, default=0)
    p.add_argument("--docs", type=int, default=0, help="SciFact corpus subset (0: all)")
    p.add_argument("--n", type=int, default=1_000_000, help="synthetic items (indexing, updates)")
    p.add_argument("--text-items", type=int, default=2000, help="texts indexed per tower (indexing)")
    p.add_argument("--towers", nargs="+", default=["hashed", "minilm-head"], help="indexing: item towers timed")
    p.add_argument("--http-requests", type=int, default=200)
    p.add_argument("--seconds", type=float, default=3.0, help="per search measurement")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", action="store_true")
    p.add_argument("--summarize", nargs="+", type=Path, help="only the tables of earlier --json runs")
    args = parse_args(
        p,
        tiny={"m": [8], "seeds": [0], "nlist": 16, "preset": "smoke", "train_seconds": 1.0, "queries": 60,
              "docs": 600, "n": 20_000, "text_items": 300, "http_requests": 10, "seconds": 0.2, "threads": 1,
              "towers": ["hashed"], "control": False},
    )  # fmt: skip
    if args.summarize:
        summarize([json.loads(ln) for f in args.summarize for ln in f.read_text().splitlines() if ln.startswith("{")])
        return
    import faiss

    torch.set_num_threads(args.threads)
    faiss.omp_set_num_threads(args.threads)
    emit = Report(args.json, line)
    for part in args.parts:
        {"unseen": unseen, "indexing": indexing, "updates": updates}[part](args, emit)
    if not args.json:
        summarize(emit.rows)


if __name__ == "__main__":
    main()
