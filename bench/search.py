"""Search benchmark: recall@10, recall@100 and QPS of our engines beside native Faiss.

Rows: our torch backend and our faiss backend (both serving *our* two-step artifact), Faiss
IndexIVFPQ and IndexIVFPQFastScan built by Faiss itself, at nprobe 1/8/32/128 and 1 and 2
threads, on siftsmall (real, official ground truth) and a seeded synthetic clustered set
(default 1M x 128, exact ground truth computed here). On CUDA, also the torch backend on the
GPU at batch 1 and 256. Prints a line per row as it comes and a markdown table at the end; `--json`
prints one JSON object per row instead. Never asserts on time: compare ratios within one run.
siftsmall is read from $JOINTPQ_SHARED_DATA (else ../shared/data); missing, the run stops with an
error unless `--skip-sift` says to leave it out.

    python bench/search.py                 # full run (~10 min on 2 cores)
    python bench/search.py --n 100000      # quicker synthetic set
    python bench/search.py --json > rows.jsonl
    python bench/search.py --tiny          # seconds: 2k synthetic + siftsmall, nprobe 1 / 8, 1 thread
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from harness import Report, kv_line, markdown_table, parse_args, require_shared

from index import build_ivfpq, exact_search, load_index, make_searcher, write_artifact
from index.artifact import IDS, _read_ids
from index.vectors import read_vecs, read_vectors
from service.demo import synthetic_clustered

SIFT_NLIST, SIFT_M = 64, 16


def recall_at(found: np.ndarray, gt: np.ndarray, k: int) -> float:
    """|top-k found ∩ true top-k| / k, averaged over queries (the Faiss benchs' 'k-recall@k')."""
    return float(np.mean([len(set(f[:k].tolist()) & set(g[:k].tolist())) / k for f, g in zip(found, gt, strict=True)]))


def timed_qps(fn, nq: int, min_seconds: float = 1.0, repeats: int = 3) -> float:
    """Best of `repeats` runs (each at least `min_seconds` of calls), after one warm-up call."""
    fn()
    best = 0.0
    for _ in range(repeats):
        calls, t0 = 0, time.perf_counter()
        while True:
            fn()
            calls += 1
            dt = time.perf_counter() - t0
            if dt >= min_seconds:
                break
        best = max(best, calls * nq / dt)
    return best


def synthetic(n: int, nq: int, d: int = 128, seed: int = 0):
    """The seeded clustered set of `jointpq demo` (low intrinsic dimension), base and queries."""
    return synthetic_clustered(n, nq, d=d, seed=seed)


def set_threads(t: int) -> None:
    import faiss

    torch.set_num_threads(t)
    faiss.omp_set_num_threads(t)


def faiss_native(xb: np.ndarray, nlist: int, M: int, nbits: int, fast_scan: bool):
    """Faiss's own two-step index, trained and filled by Faiss (polysemous training off)."""
    import faiss

    d = xb.shape[1]
    if fast_scan:
        index = faiss.IndexIVFPQFastScan(faiss.IndexFlatL2(d), d, nlist, M, nbits)
    else:
        index = faiss.IndexIVFPQ(faiss.IndexFlatL2(d), d, nlist, M, nbits)
        index.do_polysemous_training = False
    t0 = time.perf_counter()
    index.train(xb)
    t1 = time.perf_counter()
    index.add(xb)
    return index, t1 - t0, time.perf_counter() - t1


def run_dataset(name, xb, xq, gt, nlist, M, args, emit) -> None:
    import faiss

    set_threads(max(args.threads))  # builds use the sweep's most threads (2 by default; --tiny: 1, no OMP contention)
    engines = {}
    t0 = time.perf_counter()
    ours = build_ivfpq(xb, nlist=nlist, M=M, nbits=8, metric="l2", seed=0)
    emit(
        {"dataset": name, "event": "build", "engine": "ours two-step IVF-PQ 8-bit", "seconds": time.perf_counter() - t0}
    )
    t0 = time.perf_counter()
    ours4 = build_ivfpq(xb, nlist=nlist, M=2 * M, nbits=4, metric="l2", seed=0)
    emit(
        {"dataset": name, "event": "build", "engine": "ours two-step IVF-PQ 4-bit", "seconds": time.perf_counter() - t0}
    )
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        write_artifact(Path(tmp) / "a", ours)
        t1 = time.perf_counter()
        idx = load_index(Path(tmp) / "a", device="cpu", backend="torch")
        t2 = time.perf_counter()
        _read_ids(Path(tmp) / "a" / IDS)
        emit(
            {
                "dataset": name,
                "event": "artifact",
                "n_items": idx.data.n,
                "write_seconds": t1 - t0,
                "load_seconds": t2 - t1,
                "ids_load_seconds": time.perf_counter() - t2,
            }
        )
    engines[f"torch ours IVF{nlist},PQ{M}"] = (make_searcher(ours, "cpu", "torch"), ours.ids)
    engines[f"faiss ours IVF{nlist},PQ{M}"] = (make_searcher(ours, "cpu", "faiss"), ours.ids)
    engines[f"torch ours IVF{nlist},PQ{2 * M}x4"] = (make_searcher(ours4, "cpu", "torch"), ours4.ids)
    engines[f"faiss ours IVF{nlist},PQ{2 * M}x4fs"] = (make_searcher(ours4, "cpu", "faiss"), ours4.ids)
    for fast in (False, True):
        m, nbits = (2 * M, 4) if fast else (M, 8)
        index, t_train, t_add = faiss_native(xb, nlist, m, nbits, fast)
        label = f"Faiss IVF{nlist},PQ{m}" + ("x4fs" if fast else "")
        emit({"dataset": name, "event": "build", "engine": label, "train_seconds": t_train, "add_seconds": t_add})
        engines[label] = (index, None)

    for threads in args.threads:
        set_threads(threads)
        for nprobe in args.nprobe:
            nprobe = min(nprobe, nlist)
            calls, found = {}, {}
            for label, (engine, ids) in engines.items():
                # timed: the engine's own call (rows / Faiss labels); ids are mapped once, untimed
                if ids is None:  # native Faiss: labels are row numbers of xb already
                    params = faiss.SearchParametersIVF(nprobe=nprobe)

                    def call(engine=engine, params=params):
                        return engine.search(xq, 100, params=params)[1]
                else:

                    def call(engine=engine, nprobe=nprobe):
                        return engine.search_rows(xq, 100, nprobe)[1]

                calls[label] = call
                rows = call()
                found[label] = rows if ids is None else np.where(rows >= 0, ids[rows.clip(0)].astype(np.int64), -1)
            # engines take turns, best of `repeats` rounds each: drift on a shared machine hits all alike
            best = dict.fromkeys(calls, 0.0)
            for _ in range(args.repeats):
                for label, call in calls.items():
                    best[label] = max(best[label], timed_qps(call, len(xq), args.min_seconds, repeats=1))
            for label in calls:
                emit(
                    {
                        "dataset": name,
                        "engine": label,
                        "device": "cpu",
                        "threads": threads,
                        "nprobe": nprobe,
                        "batch": len(xq),
                        "recall@10": recall_at(found[label], gt, 10),
                        "recall@100": recall_at(found[label], gt, 100),
                        "qps": best[label],
                    }
                )

    if torch.cuda.is_available():
        gpu = make_searcher(ours, "cuda", "torch")
        for batch in (1, 256):
            for nprobe in args.nprobe:
                nprobe = min(nprobe, nlist)
                xs = [xq[s : s + batch] for s in range(0, len(xq) - batch + 1, batch)] or [xq]

                def call(gpu=gpu, xs=xs, nprobe=nprobe):
                    return np.concatenate([gpu.search_rows(x, 100, nprobe)[1] for x in xs])

                rows = call()
                found = np.where(rows >= 0, ours.ids[rows.clip(0)].astype(np.int64), -1)
                n_done = sum(len(x) for x in xs)
                qps = timed_qps(call, n_done, args.min_seconds)
                emit(
                    {
                        "dataset": name,
                        "engine": f"torch ours IVF{nlist},PQ{M}",
                        "device": torch.cuda.get_device_name(),
                        "threads": None,
                        "nprobe": nprobe,
                        "batch": batch,
                        "recall@10": recall_at(found, gt[:n_done], 10),
                        "recall@100": recall_at(found, gt[:n_done], 100),
                        "qps": qps,
                    }
                )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=1_000_000, help="synthetic base size (0 skips it)")
    p.add_argument("--nq", type=int, default=1000, help="synthetic queries")
    p.add_argument("--nlist", type=int, default=1024, help="cells for the synthetic set")
    p.add_argument("--min-seconds", type=float, default=1.0, help="time per QPS sample")
    p.add_argument("--repeats", type=int, default=3, help="rounds of samples; the best counts")
    p.add_argument("--nprobe", type=int, nargs="+", default=[1, 8, 32, 128], help="nprobe sweep (capped at nlist)")
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2], help="CPU thread counts to time")
    p.add_argument("--skip-sift", action="store_true", help="leave siftsmall out (else missing data is an error)")
    p.add_argument("--json", action="store_true", help="one JSON object per row on stdout")
    args = parse_args(
        p, tiny={"n": 2000, "nq": 50, "nlist": 16, "min_seconds": 0.02, "repeats": 1, "nprobe": [1, 8], "threads": [1]}
    )
    sift = None if args.skip_sift else require_shared("siftsmall")  # before any work: fail fast

    emit = Report(args.json, line)

    import faiss

    emit(
        {
            "event": "machine",
            "platform": platform.platform(),
            "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "faiss": faiss.__version__,
            "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        }
    )
    if sift is not None:
        xb = read_vectors(sift / "siftsmall_base.bvecs")
        xq = read_vectors(sift / "siftsmall_query.fvecs")
        gt = read_vecs(sift / "siftsmall_groundtruth.ivecs")
        run_dataset("siftsmall", xb, xq, gt, SIFT_NLIST, SIFT_M, args, emit)
    if args.n:
        xb, xq = synthetic(args.n, args.nq)
        t0 = time.perf_counter()
        _, gt = exact_search(xq, xb, 100, "l2", device="auto")
        emit({"dataset": f"synthetic-{args.n}", "event": "ground truth", "seconds": time.perf_counter() - t0})
        run_dataset(f"synthetic-{args.n}", xb, xq, gt, args.nlist, 16, args, emit)
    if not args.json:
        print("\n" + summary_table(emit.rows))


def line(row: dict) -> str:
    """A measured row as one aligned line (progress for a long run); events as a `# k=v` comment."""
    if "qps" not in row:
        return "# " + kv_line(row)
    return (
        f"{row['dataset']:<18} {row['engine']:<28} {str(row['device'])[:12]:<12} thr={row['threads']} "
        f"nprobe={row['nprobe']:<4} batch={row['batch']:<5} R@10={row['recall@10']:.3f} "
        f"R@100={row['recall@100']:.3f} QPS={row['qps']:>9.0f}"
    )


def summary_table(rows: list[dict]) -> str:
    """Every measured row, as the markdown table docs/benchmarks.md quotes."""
    header = ("dataset", "engine", "device", "threads", "nprobe", "batch", "R@10", "R@100", "QPS")
    return markdown_table(header, [
        (r["dataset"], r["engine"], r["device"], r["threads"], r["nprobe"], r["batch"], f"{r['recall@10']:.3f}",
         f"{r['recall@100']:.3f}", f"{r['qps']:.0f}")
        for r in rows if "qps" in r
    ])  # fmt: skip


if __name__ == "__main__":
    main()
