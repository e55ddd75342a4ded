"""The query encoder's own limits, in process: torch vs ONNX Runtime float32 vs ONNX Runtime int8.

Parts (`--parts`, default all):
  speed    throughput (queries/s) and latency (ms per call) of each runtime at batch 1, 16, 64 on
           unique SciFact claims (the demo's when the shared data is absent); corpus encoding in
           items/s: torch in file order (the old path), torch and ONNX in length-sorted batches.
  quality  SciFact test nDCG@10 / recall@100 with the same index and the query tower on torch,
           ONNX fp32 and ONNX int8: the demo-style model (auto = poeem, frozen MiniLM + heads,
           809 labels) and the two-step index over plain MiniLM, several seeds; plus exact float
           search (no index) to isolate the encoder. The int8 decision rule of issue #12: int8 is a
           documented choice only where it loses at most 0.005 nDCG@10.

A GPU, when present, adds `cuda` rows (torch on CUDA; ONNX Runtime's CUDA provider when
onnxruntime-gpu is installed).

    python bench/encoder.py                        # everything (~10 min on 2 cores)
    python bench/encoder.py --parts speed --threads 1 2
    python bench/encoder.py --parts quality --m 8 16 --seeds 0 1 2 --json
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import harness
import numpy as np
import torch
from harness import Report, markdown_table, parse_args

RUNTIMES = ("torch", "onnx fp32", "onnx int8")


def texts_of(data_dir: Path, n: int) -> tuple[list[str], list[str]]:
    """(unique query texts, corpus texts) of a BEIR directory."""
    from model.data import load_beir

    data = load_beir(data_dir, optional=True)
    queries = list(dict.fromkeys(data.queries.values()))[:n]
    return queries, list(data.corpus.values())


def encoders(device: str, threads: int) -> dict[str, torch.nn.Module]:
    """MiniLM on each runtime (the int8 and fp32 graphs built in memory exactly as an artifact's)."""
    from model.encoders import MiniLMEncoder
    from model.onnx_export import export_graph, quantize_int8
    from model.onnx_runtime import OnnxRunner, session_from_bytes

    out = {}
    base = MiniLMEncoder().to(device).eval()
    out["torch"] = base
    for name, graph in (("onnx fp32", export_graph(base)), ("onnx int8", quantize_int8(base))):
        enc = MiniLMEncoder(weights=False).to(device).eval()
        enc.load_state_dict(base.state_dict())
        enc.runtime = OnnxRunner(session_from_bytes(graph, threads, device), enc, name.split()[1], "memory")
        if device == "cuda" and "CUDAExecutionProvider" not in enc.runtime.providers:
            continue  # onnxruntime-gpu absent: the CPU provider is not a GPU row
        out[name] = enc
    return out


def speed(args: argparse.Namespace, emit: Report) -> None:
    data_dir = harness.shared_data_dir() / "scifact"
    queries, corpus = texts_of(data_dir if data_dir.is_dir() else harness.DEMO_DATA, args.queries)
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    for device in devices:
        for threads in args.threads:
            torch.set_num_threads(threads)
            encs = encoders(device, threads)
            for name, enc in encs.items():
                for b in args.batch:
                    calls = [queries[i : i + b] for i in range(0, len(queries) - b + 1, b)]
                    enc.encode(calls[0], batch_size=b)  # warm-up
                    lat, n, t0 = [], 0, time.perf_counter()
                    while time.perf_counter() - t0 < args.seconds:
                        for c in calls:
                            s = time.perf_counter()
                            enc.encode(c, batch_size=b)
                            lat.append(time.perf_counter() - s)
                            n += len(c)
                    took = time.perf_counter() - t0
                    emit({"part": "speed", "device": device, "threads": threads, "runtime": name, "batch": b,
                          "qps": n / took, "ms_p50": 1e3 * statistics.median(lat),
                          "ms_p99": 1e3 * float(np.percentile(lat, 99))})  # fmt: skip
            docs = corpus[: args.corpus_items]
            for name, sort in (("torch", False), ("torch", True), ("onnx fp32", True)):
                if name not in encs:
                    continue
                enc = encs[name]
                t0 = time.perf_counter()
                if sort:
                    enc.encode(docs, batch_size=64)
                else:  # the old path: batches of 64 in file order, each padded to its longest
                    for s in range(0, len(docs), 64):
                        enc.encode(docs[s : s + 64], batch_size=64)
                took = time.perf_counter() - t0
                emit({"part": "corpus", "device": device, "threads": threads, "runtime": name,
                      "order": "length-sorted" if sort else "file order", "items": len(docs),
                      "items_per_s": len(docs) / took, "seconds": took})  # fmt: skip


def quality(args: argparse.Namespace, emit: Report) -> None:
    """Same index, three query-tower runtimes; the artifact is written and loaded as the service does."""
    from index import build_ivfpq, load_index
    from index.flat import exact_search
    from model.data import load_beir
    from model.encoders import load_encoder
    from model.evaluate import evaluate, metrics
    from model.modes import TrainInputs
    from model.train import resolve_config, train, write_trained_artifact

    torch.set_num_threads(args.threads[-1])
    scifact = harness.require_shared("scifact")
    data = load_beir(scifact)
    cache = scifact / "minilm-l6-v2"
    doc_ids = json.loads((cache / "corpus_ids.json").read_text())
    q_ids = json.loads((cache / "queries_ids.json").read_text())
    xb, xq = np.load(cache / "corpus.npy"), np.load(cache / "queries.npy")
    memo = {data.corpus[d]: torch.from_numpy(xb[i]) for i, d in enumerate(doc_ids)}
    memo |= {data.queries[q]: torch.from_numpy(xq[i]) for i, q in enumerate(q_ids)}
    if args.docs:
        data = data.subset(args.docs, seed=0)
        keep = {d: i for i, d in enumerate(doc_ids)}
        xb, doc_ids = xb[[keep[d] for d in data.corpus]], list(data.corpus)
    qrels = data.qrels["test"]
    test_q = [q for q in data.queries if q in qrels]
    with tempfile.TemporaryDirectory(prefix="jointpq-bench-encoder-") as tmp:
        first = None  # a two-step artifact: exact float search with its plain MiniLM query tower
        for M in args.m:
            for seed in args.seeds:
                cfg = resolve_config("poeem", preset="scifact", M=M, seed=seed, encoder_precision="int8",
                                     **({"max_seconds": args.train_seconds} if args.train_seconds else {}))  # fmt: skip
                rows = {}
                res = train(data, cfg, TrainInputs(memo=memo), progress=False)
                rows["auto [809] = poeem"] = write_trained_artifact(
                    Path(tmp) / f"poeem-{M}-{seed}", res, cfg, "scifact"
                )
                two = build_ivfpq(torch.from_numpy(xb), nlist=cfg.nlist, M=M, metric="ip", opq=True, ids=doc_ids,
                                  seed=seed)  # fmt: skip
                two_res = type(res)(res.query_encoder.base, res.query_encoder.base, two, [], {})
                rows["two-step (MiniLM)"] = write_trained_artifact(
                    Path(tmp) / f"two-{M}-{seed}", two_res, cfg, "scifact"
                )
                first = first or rows["two-step (MiniLM)"]  # its query tower is the plain MiniLM
                for label, path in rows.items():
                    idx = load_index(path, device="cpu", backend="torch")
                    for runtime, precision in (("torch", None), ("onnx", "fp32"), ("onnx", "int8")):
                        enc = load_encoder(path, runtime=runtime, precision=precision)
                        name = "torch" if runtime == "torch" else f"onnx {precision}"
                        for r in evaluate(enc, idx, data, "test", args.nprobe):
                            emit({"part": "quality", "model": label, "M": M, "seed": seed, "runtime": name,
                                  "serving": (enc.runtime_info or {}).get("runtime", "torch"), **r})  # fmt: skip
        for runtime, precision in (("torch", None), ("onnx", "fp32"), ("onnx", "int8")):
            enc = load_encoder(first, runtime=runtime, precision=precision)
            q = enc.encode([data.queries[t] for t in test_q])
            _, rows_ = exact_search(q, torch.from_numpy(xb), 100, "ip", device="cpu")
            m = metrics([[doc_ids[r] for r in row] for row in rows_], [qrels[t] for t in test_q])
            name = "torch" if runtime == "torch" else f"onnx {precision}"
            emit({"part": "quality", "model": "exact float (MiniLM)", "M": None, "seed": None, "runtime": name,
                  "serving": (enc.runtime_info or {}).get("runtime", "torch"), "nprobe": None, **m})  # fmt: skip


def line(row: dict) -> str | None:
    if row.get("part") == "speed":
        return (f"speed  {row['device']:<4} threads {row['threads']} {row['runtime']:<10} batch {row['batch']:>3}:"
                f" {row['qps']:8.1f} q/s  p50 {row['ms_p50']:7.2f} ms  p99 {row['ms_p99']:7.2f} ms")  # fmt: skip
    if row.get("part") == "corpus":
        return (f"corpus {row['device']:<4} threads {row['threads']} {row['runtime']:<10} {row['order']:<13}:"
                f" {row['items_per_s']:8.1f} items/s ({row['items']} in {row['seconds']:.1f} s)")  # fmt: skip
    if row.get("part") == "quality":
        return (f"quality {row['model']:<22} M {row['M']} seed {row['seed']} nprobe {row['nprobe']}"
                f" {row['runtime']:<10} nDCG@10 {row['ndcg@10']:.4f} R@100 {row['recall@100']:.4f}")  # fmt: skip
    return None


def summarize(rows: list[dict]) -> None:
    sp = [r for r in rows if r.get("part") == "speed"]
    if sp:
        print("\n### In process, unique queries (q/s, ms per call p50)\n")
        keys = sorted(
            {(r["device"], r["threads"], r["runtime"]) for r in sp}, key=lambda k: (k[0], k[1], RUNTIMES.index(k[2]))
        )
        batches = sorted({r["batch"] for r in sp})
        table = []
        for dev, th, rt in keys:
            cells = []
            for b in batches:
                r = next(
                    (x for x in sp if (x["device"], x["threads"], x["runtime"], x["batch"]) == (dev, th, rt, b)), None
                )
                cells.append(f"{r['qps']:,.0f} / {r['ms_p50']:.1f}" if r else "-")
            table.append([dev, th, rt, *cells])
        print(markdown_table(["device", "threads", "runtime", *[f"batch {b}" for b in batches]], table))
    co = [r for r in rows if r.get("part") == "corpus"]
    if co:
        print("\n### Corpus encoding (items/s)\n")
        cells = [[r["device"], r["threads"], r["runtime"], r["order"], f"{r['items_per_s']:,.1f}"] for r in co]
        print(markdown_table(["device", "threads", "runtime", "order", "items/s"], cells))
    qu = [r for r in rows if r.get("part") == "quality"]
    if qu:
        print("\n### SciFact test, same index, query tower per runtime (mean over seeds; nDCG@10 / recall@100)\n")
        groups: dict[tuple, dict[str, list[dict]]] = {}
        for r in qu:
            groups.setdefault((r["model"], r["M"], r["nprobe"]), {}).setdefault(r["runtime"], []).append(r)
        table = []
        for (model, M, nprobe), by in groups.items():

            def mean(rt: str, key: str, by=by) -> float:
                return float(np.mean([x[key] for x in by[rt]])) if rt in by else float("nan")

            cells = [f"{mean(rt, 'ndcg@10'):.4f} / {mean(rt, 'recall@100'):.4f}" for rt in RUNTIMES]
            loss = mean("torch", "ndcg@10") - mean("onnx int8", "ndcg@10")
            seeds = len(by.get("torch", []))
            table.append([model, M, nprobe, seeds, *cells, f"{loss:+.4f}", "yes" if loss <= 0.005 else "no"])
        print(markdown_table(["model", "M", "nprobe", "seeds", *RUNTIMES, "int8 loss", "int8 within 0.005"], table))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--parts", nargs="+", choices=("speed", "quality"), default=["speed", "quality"])
    p.add_argument("--threads", type=int, nargs="+", default=[2], help="intra-op threads (torch and ONNX Runtime)")
    p.add_argument("--batch", type=int, nargs="+", default=[1, 16, 64])
    p.add_argument("--queries", type=int, default=256, help="unique query texts timed")
    p.add_argument("--corpus-items", type=int, default=1000, help="corpus texts encoded for the items/s rows")
    p.add_argument("--seconds", type=float, default=3.0, help="per speed row")
    p.add_argument("--m", type=int, nargs="+", default=[16])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--nprobe", type=int, nargs="+", default=[16])
    p.add_argument("--docs", type=int, default=0, help="quality: corpus subset (0: all of SciFact)")
    p.add_argument("--train-seconds", type=float, help="quality: cap on each training run")
    p.add_argument("--json", action="store_true")
    tiny = {"batch": [1, 8], "queries": 16, "corpus_items": 16, "seconds": 0.2, "m": [8], "seeds": [0],
            "nprobe": [4], "docs": 400, "train_seconds": 2.0, "threads": [1]}  # fmt: skip
    args = parse_args(p, tiny=tiny)
    emit = Report(args.json, line)
    if "speed" in args.parts:
        speed(args, emit)
    if "quality" in args.parts:
        quality(args, emit)
    summarize(emit.rows)


if __name__ == "__main__":
    main()
