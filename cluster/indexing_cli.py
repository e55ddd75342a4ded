"""`jointpq index --ray --shards S`: the flags `cluster` adds to `jointpq index` (`cluster.cli`).

Imported whether or not Ray is installed (the `jointpq.cli` entry point loads it on every run),
so it imports nothing heavy: Ray and `cluster.indexing` only when `--ray` is given. Without the
extra, `--ray` ends in one line, `error: --ray needs the cluster extra: ...`, exit 2."""

from __future__ import annotations

import argparse
import json
from typing import Any

RAY_CHUNK = 1024  # cluster.indexing.RAY_CHUNK (not imported from there: that module needs Ray)
NEEDS_EXTRA = "--ray needs the cluster extra: pip install 'jointpq[cluster]'"
EXAMPLE = (
    "  jointpq index --artifact artifacts/shop-v3 --corpus catalog.jsonl.gz --ray --shards 4"
    " --out artifacts/shop-v3-s4\n"
)


def extend(commands: dict[str, argparse.ArgumentParser]) -> None:
    """Add the Ray flags to `index` and wrap its `func`: without `--ray` it runs as before."""
    p = commands.get("index")
    if p is None:
        return
    g = p.add_argument_group(
        "parallel indexing on Ray Data (the cluster extra)",
        "--ray runs the item tower on a pool of Ray actors and writes --out as a shard set of\n"
        "--shards artifacts (shards.json + one artifact per shard, as `jointpq shard` makes);\n"
        "each item's cell and codes equal the single-process run's.",
    )
    g.add_argument("--ray", action="store_true", help="index on Ray Data, writing a shard set (needs --shards)")
    g.add_argument("--shards", type=int, help="how many shard artifacts to write (S, by a stable hash of the id)")
    g.add_argument("--ray-address", help="the Ray cluster to join (e.g. auto, ray://head:10001); default: a local Ray")
    g.add_argument("--ray-workers", type=int, help="actors, each with its own item tower; default: one per CPU (GPU)")
    g.add_argument("--ray-chunk", type=int, default=RAY_CHUNK, help="items per actor call (default %(default)s)")
    if p.epilog is not None and EXAMPLE not in p.epilog:
        p.epilog = p.epilog.rstrip("\n") + "\n" + EXAMPLE
    p.set_defaults(func=_wrap(p.get_default("func")))


def _wrap(single: Any):
    def run(args: argparse.Namespace) -> int:
        if not args.ray:
            given = [f for f, v in (("--shards", args.shards), ("--ray-address", args.ray_address),
                                    ("--ray-workers", args.ray_workers)) if v is not None]  # fmt: skip
            if given:
                raise ValueError(f"{', '.join(given)} go with --ray (index into a shard set); to split an existing"
                                 " artifact: jointpq shard")  # fmt: skip
            return single(args)
        return _ray(args)

    run.__doc__ = f"`jointpq index`, or with --ray `cluster.indexing.index_with_ray` (wrapping {single!r})."
    return run


def _ray(args: argparse.Namespace) -> int:
    if args.shards is None:
        raise ValueError("--ray needs --shards S: it writes S shard artifacts (a shard set) directly")
    if args.batch_size < 1 or args.ray_chunk < 1:
        raise ValueError(f"--batch-size and --ray-chunk must be >= 1, got {args.batch_size} and {args.ray_chunk}")
    try:
        from .indexing import index_with_ray
    except ModuleNotFoundError as e:
        if (e.name or "").split(".")[0] in ("ray", "pyarrow"):
            raise ValueError(NEEDS_EXTRA) from None
        raise
    shard_set, record = index_with_ray(
        args.artifact, args.out, corpus=args.corpus, vectors=args.vectors, ids=args.ids, shards=args.shards,
        mode=args.mode, batch_size=args.batch_size, address=args.ray_address, device=args.device,
        runtime=args.encoder_runtime, concurrency=args.ray_workers, chunk=args.ray_chunk,
    )  # fmt: skip
    if args.publish:  # for `jointpq serve --cluster --watch` on this root (a single-process service refuses it)
        from index.pointer import publish

        publish(shard_set.path.parent, shard_set.path.name)
        record["published"] = True
    print(json.dumps({"shard_set": str(shard_set.path)} | record))
    return 0
