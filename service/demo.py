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


def synthetic_clustered(n: int, nq: int, d: int = 128, nclusters: int = 1024, intrinsic: int = 8, seed: int = 0):
    """Seeded clustered set with low intrinsic dimension, so nearest neighbours mean something:
    x = centre[c] + z W_c + 0.05 e, z ~ N(0, I_8), W_c a random (8, d) map per cluster, e ~ N(0, I_d).
    (Isotropic Gaussian blobs in high dimension make every point of a blob nearly equidistant.)
    Returns base (n, d) and queries (nq, d) float32 from the same distribution."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((nclusters, d)).astype(np.float32) * 2
    maps = rng.standard_normal((nclusters, intrinsic, d)).astype(np.float32) / np.sqrt(intrinsic)

    def draw(m: int) -> np.ndarray:
        out = np.empty((m, d), np.float32)
        for s in range(0, m, 1 << 16):  # chunked: the (m, intrinsic, d) gather is large
            c = rng.integers(0, nclusters, min(m - s, 1 << 16))
            z = rng.standard_normal((len(c), intrinsic)).astype(np.float32)
            noise = 0.05 * rng.standard_normal((len(c), d)).astype(np.float32)
            out[s : s + len(c)] = centres[c] + np.einsum("mi,mid->md", z, maps[c]) + noise
        return out

    return draw(n), draw(nq)


def add_command(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="build the demo artifact if missing, load it, run sample searches")
    p.add_argument("--artifact", type=Path, default=DEMO)
    p.add_argument("--device", default="auto")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from index import build_ivfpq, exact_search, load_index, write_artifact

    x, queries = synthetic_clustered(20_000, 5, d=64, nclusters=64, seed=0)
    if not (args.artifact / "manifest.json").exists():
        t0 = time.perf_counter()
        index = build_ivfpq(x, nlist=64, M=16, nbits=8, metric="l2", ids=[f"item-{i}" for i in range(len(x))])
        source = "demo.synthetic_clustered(20000, d=64, nclusters=64, seed=0)"
        write_artifact(args.artifact, index, training={"mode": "two-step", "source": source})
        print(f"built {args.artifact} in {time.perf_counter() - t0:.1f} s")
    idx = load_index(args.artifact, device=args.device)
    print(f"loaded {idx.version}: {idx.data.n} items, d={idx.data.d}, backend={idx.backend}, device={idx.device}")
    _, ids = idx.search(queries, k=5, nprobe=8)
    _, exact = exact_search(queries, x, 5, "l2")
    hits = 0
    for q, (got, ref) in enumerate(zip(ids, exact, strict=True)):
        ref_ids = [f"item-{r}" for r in ref]
        hits += len(set(got) & set(ref_ids))
        print(f"query {q}: ivfpq {got}  exact {ref_ids}")
    print(f"recall@5 against exact search: {hits / (5 * len(ids)):.2f} (16 bytes per item instead of 256)")
    return 0
