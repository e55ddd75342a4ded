"""`jointpq serve --cluster`: the flags `cluster` adds to `jointpq serve` (`cluster.cli`).

Imported on every `jointpq` run (the `jointpq.cli` entry point), so nothing heavy here: Ray and
`cluster.serve` only when `--cluster` is given. Without the extra, `--cluster` ends in one line,
`error: --cluster needs the cluster extra: ...`, exit 2."""

from __future__ import annotations

import argparse
from typing import Any

NEEDS_EXTRA = "--cluster needs the cluster extra: pip install 'jointpq[cluster]'"
EXAMPLE = "  jointpq serve --cluster --shards 2 --replicas 2 --artifact-root artifacts/demo --port 8000\n"
CLUSTER_FLAGS = ("shards", "replicas", "address", "on_partial", "shard_deadline_s", "replica_cpus")


def extend(commands: dict[str, argparse.ArgumentParser]) -> None:
    """Add the cluster flags to `serve` and wrap its `func`: without `--cluster` it runs as before."""
    p = commands.get("serve")
    if p is None:
        return
    g = p.add_argument_group(
        "sharded serving on Ray Serve (the cluster extra)",
        "--cluster starts a local Ray (or joins --address) and deploys a router with this service's\n"
        "HTTP contract over --shards shard deployments of --replicas replicas each; the router\n"
        "encodes, probes once, fans out and merges the shards' top-k exactly.",
    )
    g.add_argument("--cluster", action="store_true", help="serve sharded on Ray Serve")
    g.add_argument("--shards", type=int, help="shards (S): a version is split by a stable hash of the item id")
    g.add_argument("--replicas", type=int, help="replicas of each shard (R >= 2 survives a replica's loss)")
    g.add_argument("--address", help="the Ray cluster to join (auto, ray://head:10001); default: start a local Ray")
    g.add_argument("--on-partial", choices=("partial", "503"),
                   help="a shard past its deadline: answer with the others, flagged in coverage (default), or 503")
    g.add_argument("--shard-deadline-s", type=float, help="per request, all shards, retries included (default 5)")
    g.add_argument("--replica-cpus", type=float,
                   help="Ray CPUs per replica (fractions allowed; default: this machine's CPUs over S x R + 1)")
    if p.epilog is not None and EXAMPLE not in p.epilog:
        p.epilog = p.epilog.rstrip("\n") + "\n" + EXAMPLE
    p.set_defaults(func=_wrap(p.get_default("func")))


def _wrap(single: Any):
    def run(args: argparse.Namespace) -> int:
        if not args.cluster:
            given = ["--" + f.replace("_", "-") for f in CLUSTER_FLAGS if getattr(args, f, None) is not None]
            if given:
                raise ValueError(f"{', '.join(given)} go with --cluster (sharded serving on Ray Serve)")
            return single(args)
        try:
            import ray  # noqa: F401
        except ImportError:
            raise ValueError(NEEDS_EXTRA) from None
        from .serve import run_cluster

        return run_cluster(args)

    return run
