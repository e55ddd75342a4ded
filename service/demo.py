"""`jointpq demo`: the README's first command until the service lands.

Builds a demo artifact if none exists (a seeded synthetic clustered set, so it works offline on
a fresh clone with nothing downloaded), loads it through `load_index` and runs a few searches,
comparing them with exact search so the output shows what the index trades for speed.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

DEMO = Path("artifacts/demo")


def synthetic_clustered(n: int, d: int, *, nclusters: int = 256, seed: int = 0, spread: float = 3.0) -> np.ndarray:
    """(n, d) float32 Gaussian blobs around `nclusters` random centres (seeded)."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((nclusters, d)).astype(np.float32) * spread
    return centres[rng.integers(0, nclusters, n)] + rng.standard_normal((n, d)).astype(np.float32)


def add_command(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="build the demo artifact if missing, load it, run sample searches")
    p.add_argument("--artifact", type=Path, default=DEMO)
    p.add_argument("--device", default="auto")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from index import build_ivfpq, exact_search, load_index, write_artifact

    x = synthetic_clustered(20_000, 64, seed=0)
    if not (args.artifact / "manifest.json").exists():
        t0 = time.perf_counter()
        index = build_ivfpq(x, nlist=64, M=16, nbits=8, metric="l2", ids=[f"item-{i}" for i in range(len(x))])
        write_artifact(args.artifact, index, training={"mode": "two-step", "source": "synthetic(20000, 64, seed=0)"})
        print(f"built {args.artifact} in {time.perf_counter() - t0:.1f} s")
    idx = load_index(args.artifact, device=args.device)
    print(f"loaded {idx.version}: {idx.data.n} items, d={idx.data.d}, backend={idx.backend}, device={idx.device}")
    queries = synthetic_clustered(5, 64, seed=1)
    _, ids = idx.search(queries, k=5, nprobe=8)
    _, exact = exact_search(queries, x, 5, "l2")
    for q, (got, ref) in enumerate(zip(ids, exact, strict=True)):
        print(f"query {q}: ivfpq {got}  exact {[f'item-{r}' for r in ref]}")
    return 0
