"""Shared fixtures: real data from ../shared/data (skipped with a reason when absent) and small
seeded synthetic indexes built with the real builder."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
# an empty JOINTPQ_SHARED_DATA counts as unset (as in bench/harness.py), not as the current directory
SHARED_DATA = Path(os.environ.get("JOINTPQ_SHARED_DATA") or ROOT.parent / "shared" / "data")

torch.set_num_threads(min(2, torch.get_num_threads()))

# Fixtures that take many seconds to build (two trained demo artifacts; a Poeem training run):
# every test that uses one, directly or through another fixture, is `slow`, so `make test-fast`
# (-m "not slow") never builds them. New users are marked without anyone remembering to.
SLOW_FIXTURES = frozenset({"artifact_root", "trained"})


@pytest.hookimpl(tryfirst=True)  # before -m deselects by marker
def pytest_collection_modifyitems(config, items):
    for item in items:
        if SLOW_FIXTURES.intersection(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)


DEMO_DATA = ROOT / "data" / "scifact-demo"


@pytest.fixture(scope="session")
def artifact_root(tmp_path_factory) -> Path:
    """Root with `text-v1` and `text-v2` (hashed-encoder poeem, different seeds, with canaries),
    `vec-v1` (a vector-only two-step artifact, d=24) and a CURRENT pointer at text-v1. Here, not in
    tests/service/, so the service and cluster tests share one (each training costs seconds);
    tests that change a root copy it (`root_copy`)."""
    from index import build_ivfpq, write_artifact
    from index.pointer import publish
    from service.demo import build_demo

    root = tmp_path_factory.mktemp("artifacts")
    for seed, version in ((0, "text-v1"), (1, "text-v2")):
        build_demo(root, DEMO_DATA, "hashed", version=version, seed=seed, epochs=1, max_seconds=4, dim=64)
    x = clustered(2000, 24, seed=3)
    write_artifact(root / "vec-v1", build_ivfpq(x, nlist=16, M=8, ids=[f"v{i}" for i in range(len(x))]))
    publish(root, "text-v1")
    return root


def shared(name: str) -> Path:
    """Path of a shared data set, or skip the test saying why (a user's clone has no ../shared)."""
    path = SHARED_DATA / name
    if not path.exists():
        pytest.skip(f"shared data set {name!r} not found at {path} (set JOINTPQ_SHARED_DATA)")
    return path


@pytest.fixture(scope="session")
def siftsmall():
    """(base (10000, 128), queries (100, 128), ground truth (100, 100)) from the TEXMEX siftsmall."""
    from index.vectors import read_vecs, read_vectors

    d = shared("siftsmall")
    return (
        read_vectors(d / "siftsmall_base.bvecs"),
        read_vectors(d / "siftsmall_query.fvecs"),
        read_vecs(d / "siftsmall_groundtruth.ivecs"),
    )


def clustered(n: int, d: int, seed: int = 0, nclusters: int = 32) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((nclusters, d)).astype(np.float32) * 2
    return centres[rng.integers(0, nclusters, n)] + rng.standard_normal((n, d)).astype(np.float32)


@pytest.fixture(scope="session")
def small_data():
    """(base (3000, 32), queries (40, 32)) seeded clustered vectors."""
    return clustered(3000, 32, seed=0), clustered(40, 32, seed=1)


@pytest.fixture(scope="session")
def small_indexes(small_data):
    """Two-step indexes over `small_data` for every (metric, nbits, opq) the engine supports."""
    from index import build_ivfpq

    xb, _ = small_data
    out = {}
    for metric in ("ip", "l2"):
        for nbits, M in ((8, 8), (4, 16)):
            for opq in (False, True):
                out[metric, nbits, opq] = build_ivfpq(
                    xb,
                    nlist=16,
                    M=M,
                    nbits=nbits,
                    metric=metric,
                    opq=opq,
                    niter=10,
                    seed=3,
                    ids=[f"doc-{i}" for i in range(len(xb))],
                )
    return out


def recall(found: np.ndarray, truth: np.ndarray) -> float:
    """Mean |found ∩ truth| / |truth| over rows (ids or row numbers, -1 ignored)."""
    return float(
        np.mean([len(set(f[f >= 0].tolist()) & set(t.tolist())) / len(t) for f, t in zip(found, truth, strict=True)])
    )
