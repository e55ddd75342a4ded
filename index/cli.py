"""`jointpq build` and `jointpq search`: the index core from the command line."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

BUILD_EXAMPLE = """example:
  jointpq build --vectors base.fvecs --out artifacts/sift-v1 --nlist 64 --m 16 --nbits 8 --metric l2 --opq
"""
SEARCH_EXAMPLE = """example:
  jointpq search --artifact artifacts/sift-v1 --queries queries.fvecs --k 10 --nprobe 8
"""


def add_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "build",
        help="build an IVF-PQ artifact from vectors (two-step recipe)",
        epilog=BUILD_EXAMPLE,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--vectors", required=True, type=Path, help=".npy, .fvecs or .bvecs, (n, d)")
    p.add_argument("--ids", type=Path, help="text file, one item id per line (default: row numbers)")
    p.add_argument("--out", required=True, type=Path, help="artifact directory to create")
    p.add_argument("--nlist", type=int, default=1024, help="coarse cells")
    p.add_argument("--m", type=int, default=16, help="PQ subspaces (bytes per item at 8 bits)")
    p.add_argument("--nbits", type=int, default=8, choices=(4, 8), help="bits per PQ code")
    p.add_argument("--metric", default="ip", choices=("ip", "l2"))
    p.add_argument("--opq", action="store_true", help="learn an OPQ rotation first")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu", help="cpu, cuda or auto")
    p.set_defaults(func=_build)

    s = sub.add_parser(
        "search",
        help="search an artifact with query vectors, print JSON lines",
        epilog=SEARCH_EXAMPLE,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    s.add_argument("--artifact", required=True, type=Path)
    s.add_argument("--queries", required=True, type=Path, help=".npy, .fvecs or .bvecs, (B, d)")
    s.add_argument("--k", type=int, default=10)
    s.add_argument("--nprobe", type=int, default=16)
    s.add_argument("--device", default="auto")
    s.add_argument("--backend", default="auto", choices=("auto", "torch", "faiss"))
    s.set_defaults(func=_search)

    e = sub.add_parser(
        "faiss-export",
        help="write an artifact's index as a Faiss index file",
        epilog="example:\n  jointpq faiss-export --artifact artifacts/sift-v1 --out sift.faiss",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    e.add_argument("--artifact", required=True, type=Path)
    e.add_argument("--out", required=True, type=Path, help="Faiss index file (labels are row numbers)")
    e.add_argument("--fast-scan", action="store_true", help="IndexIVFPQFastScan (4-bit codes only)")
    e.set_defaults(func=_faiss_export)

    i = sub.add_parser(
        "faiss-import",
        help="turn a Faiss IVF-PQ index file into an artifact",
        epilog="example:\n  jointpq faiss-import --index sift.faiss --out artifacts/sift-v2",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    i.add_argument("--index", required=True, type=Path, help="IndexIVFPQ, optionally behind OPQ/a rotation")
    i.add_argument("--ids", type=Path, help="text file, the item id of Faiss label i on line i")
    i.add_argument("--out", required=True, type=Path)
    i.set_defaults(func=_faiss_import)

    h = sub.add_parser(
        "shard",
        help="split an artifact into S shard artifacts by a stable hash of the item id",
        description="Each shard is a complete artifact (the full model, its slice of the items); "
        "`jointpq serve --cluster` serves them, merging the shards' top-k exactly.",
        epilog="example:\n  jointpq shard --artifact artifacts/demo/demo-v1 --shards 4 --out artifacts/demo/demo-v1-s4",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    h.add_argument("--artifact", required=True, type=Path, help="the artifact to split (verified first)")
    h.add_argument("--shards", required=True, type=int, help="how many shards (S)")
    h.add_argument("--out", required=True, type=Path, help="new directory: shards.json + one artifact per shard")
    h.set_defaults(func=_shard)


def _build(args: argparse.Namespace) -> int:
    from . import build_ivfpq, resolve_device, write_artifact
    from .vectors import read_vectors

    x = read_vectors(args.vectors)
    ids = None
    if args.ids:
        ids = args.ids.read_text(encoding="utf-8").splitlines()
        if len(ids) != len(x):
            raise SystemExit(f"error: {args.ids} has {len(ids)} ids for {len(x)} vectors")
    t0 = time.perf_counter()
    index = build_ivfpq(
        x,
        nlist=args.nlist,
        M=args.m,
        nbits=args.nbits,
        metric=args.metric,
        opq=args.opq,
        ids=ids,
        seed=args.seed,
        device=resolve_device(args.device),
    )
    took = time.perf_counter() - t0
    training = {
        "mode": "two-step",
        "source": str(args.vectors),
        "opq": args.opq,
        "seed": args.seed,
        "build_seconds": round(took, 3),
    }
    write_artifact(args.out, index, training=training)
    print(
        json.dumps(
            {
                "artifact": str(args.out),
                "n_items": index.n,
                "dim": index.d,
                "nlist": index.nlist,
                "M": index.M,
                "nbits": index.nbits,
                "build_seconds": round(took, 3),
            }
        )
    )
    return 0


def _search(args: argparse.Namespace) -> int:
    from . import load_index
    from .vectors import read_vectors

    idx = load_index(args.artifact, device=args.device, backend=args.backend)
    scores, ids = idx.search(read_vectors(args.queries), k=args.k, nprobe=args.nprobe)
    for s, i in zip(scores, ids, strict=True):
        print(json.dumps({"ids": i, "scores": [round(float(v), 6) for v in s]}))
    return 0


def _faiss_export(args: argparse.Namespace) -> int:
    import faiss

    from .artifact import IDS, read_artifact
    from .faiss_interop import to_faiss

    _, data = read_artifact(args.artifact)
    faiss.write_index(to_faiss(data, fast_scan=args.fast_scan), str(args.out))
    print(json.dumps({"faiss_index": str(args.out), "labels": "row numbers", "ids": str(args.artifact / IDS)}))
    return 0


def _faiss_import(args: argparse.Namespace) -> int:
    import faiss

    from .artifact import write_artifact
    from .faiss_interop import from_faiss

    if not args.index.is_file():
        raise ValueError(f"{args.index}: no such file")
    ids = args.ids.read_text(encoding="utf-8").splitlines() if args.ids else None
    findex = faiss.read_index(str(args.index))
    if ids is not None and len(ids) < findex.ntotal:
        raise ValueError(f"{args.ids} has {len(ids)} ids, the index holds {findex.ntotal} vectors")
    data = from_faiss(findex, ids=ids)
    write_artifact(args.out, data, training={"mode": "faiss-import", "source": str(args.index)})
    print(json.dumps({"artifact": str(args.out), "n_items": data.n, "nlist": data.nlist, "M": data.M}))
    return 0


def _shard(args: argparse.Namespace) -> int:
    from .shard import shard_artifact

    t0 = time.perf_counter()
    shards = shard_artifact(args.artifact, args.shards, args.out)
    sizes = [read_n(shards.member(i)) for i in range(shards.count)]
    print(json.dumps({"shard_set": str(shards.path), "parent": shards.parent, "shards": shards.count,
                      "n_items": shards.n_items, "items_per_shard": sizes,
                      "seconds": round(time.perf_counter() - t0, 3)}))  # fmt: skip
    return 0


def read_n(path: Path) -> int:
    from .artifact import read_manifest

    return read_manifest(path).n_items
