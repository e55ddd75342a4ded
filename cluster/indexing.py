"""`jointpq index --ray`: the indexing forward pass on Ray Data, written straight into a shard set.

`model.indexing.index_catalog` runs the item tower over a catalog in one process. Past a few
million items (or with MiniLM on CPUs) that pass is the whole cost, and it is embarrassingly
parallel: every item's embedding, cell and codes depend on the item and the frozen model alone.
Here it runs as a Ray Data `map_batches` over an actor pool; each actor (`ChunkIndexer`) loads the
artifact's item tower and its quantizer (rotation, centroids, codebooks: a few MB, never the codes)
once, in __init__.

    driver                                    actors (`concurrency` of them, any node)
    ------                                    ----------------------------------------
    read the catalog in `chunk`-item pieces   per piece: texts -> item tower -> (n, d) embeddings
    (the same reader as `jointpq index`),     -> Quantizer -> cells (n,) int64, codes (n, M) uint8,
    put each piece in the object store  --->  squared distortion (n,) float32, shard_of(ids) (n,)
                                        <---  those four arrays, as bytes (never the embeddings)
    gather them in catalog order, group by shard, assemble S IVF-PQ slices, write the shard set

**Equality with the single-process run.** Each actor runs the very calls `index_catalog` runs on a
chunk (`encoder.encode(texts, batch_size)` then `Quantizer.encode_chunks`), on the same texts (the
reader is `model.indexing.corpus_batches`: title + text, same ids, same errors). The item tower's
rows do not depend on their batch-mates (padding is masked: `TextEncoder.encode`) and the quantizer
is row-wise (`index.encode`), so every item gets the cell and codes `jointpq index` gives it, bit for
bit (tests/cluster/test_ray_indexing.py), whatever the chunk size; each shard then equals the
matching slice of `jointpq shard` run on the single-process artifact (same rows, same CSR order).

**Memory.** The driver keeps ids, cells (8 B), codes (M B), shard (4 B) and distortion (4 B) per
item; embeddings exist only inside the actors, one chunk at a time. The catalog's texts pass once
through the object store (Ray spills it to disk when it outgrows the store's share of memory).
Workers must be able to read `artifact` (a shared or identical path on every node).
"""

from __future__ import annotations

import logging
import os
import pickle
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import ray
import torch

from index import read_artifact
from index.artifact import MANIFEST, TENSORS, read_manifest, sha256_file
from index.build import assemble
from index.canary import CANARY, make_canaries, read_canaries
from index.drift import DriftStats, report
from index.encode import Quantizer
from index.errors import ArtifactError, JointPQError
from index.ivfpq import IVFPQ
from index.shard import ShardSet, carried_files, check_count, merge, shard_of, write_shards
from model.indexing import (
    CHUNK,
    INDEX_MODES,
    Batch,
    IndexingError,
    corpus_batches,
    indexing_record,
    vector_batches,
)
from model.towers import TOWER, NoItemTower, has_item_tower

# Items per actor call (one map_batches row). Smaller than index_catalog's 16384 so that a
# catalog of a few thousand items still spreads over the pool; a multiple of the encoder batch.
RAY_CHUNK = 1024
INDEXED_WITH = "ray-data"


def load_quantizer(artifact: Path, manifest_sha256: str) -> Quantizer:
    """The artifact's quantizer alone: rotation (d, d), centroids (nlist, d), codebooks (M, K, d/M),
    read from its safetensors without the codes (an actor never holds the parent's items). The
    manifest must be the one the driver verified (`manifest_sha256`): the same version on every node."""
    from safetensors import safe_open

    if sha256_file(artifact / MANIFEST) != manifest_sha256:
        raise ArtifactError(f"{artifact}: on this worker its {MANIFEST} differs from the driver's (another version)")
    m = read_manifest(artifact)
    shapes = {"rotation": (m.dim, m.dim), "centroids": (m.nlist, m.dim), "codebooks": (m.M, 1 << m.nbits, m.dim // m.M)}
    with safe_open(str(artifact / TENSORS), framework="pt") as f:
        tensors = {name: f.get_tensor(name) for name in shapes}
    for name, shape in shapes.items():
        if tuple(tensors[name].shape) != shape or tensors[name].dtype != torch.float32:
            raise ArtifactError(f"{artifact}/{TENSORS}: {name} is not float32 {shape}")
    return Quantizer(m.metric, tensors["rotation"], tensors["centroids"], tensors["codebooks"])


class ChunkIndexer:
    """One actor of the pool: the item tower and the quantizer, both loaded once, here.

    Called by Ray Data with a pyarrow batch of chunks (rows: `start` int64, `ids` list<string>, and
    `texts` list<string> or `vectors` binary: the chunk's (n, d) float32 row-major). Returns per
    chunk: `start`, `n`, and as bytes `cells` (n,) int64, `codes` (n, M) uint8, `errors` (n,) float32
    (squared distortion ||x' - x_hat'||^2, the drift report's input), `shards` (n,) int32
    (`shard_of(id, S)`, hashed here to spread the work), plus `encode_seconds`, `worker`, and
    `error`: empty, or the pickled exception the chunk (or loading the model) raised."""

    def __init__(
        self, artifact: str, manifest_sha256: str, texts: bool, shards: int, batch_size: int, runtime: str,
        device: str, threads: int,
    ) -> None:  # fmt: skip
        torch.set_num_threads(max(1, threads))
        self.worker = f"{os.getpid()}@{ray.get_runtime_context().get_node_id()[:8]}"
        self.shards = shards
        self.batch_size = batch_size
        self.encoder = None
        # an error here is kept and returned by each call (`error`): Ray reports a failed __init__
        # as ActorDiedError with the cause flattened to text; as data it reaches the driver whole,
        # so `jointpq index --ray` prints the artifact's problem in one line, as without Ray
        self.failed: BaseException | None = None
        try:
            self.quantizer = load_quantizer(Path(artifact), manifest_sha256)  # on the CPU, as index_catalog's
            if texts:
                from index.search import resolve_device
                from model.towers import load_item_encoder

                dev = resolve_device(device)
                encoder = load_item_encoder(artifact, runtime=runtime, device=dev)
                self.encoder = encoder.to(dev).eval()
                if self.encoder.dim != self.quantizer.d:
                    raise IndexingError(f"{artifact}: the item tower outputs {self.encoder.dim} dims, the index"
                                        f" has {self.quantizer.d}")  # fmt: skip
        except Exception as e:
            self.failed = e

    def __call__(self, batch: pa.Table) -> dict[str, np.ndarray]:
        out: dict[str, list[Any]] = {k: [] for k in COLUMNS}
        for row in batch.to_pylist():
            try:
                if self.failed is not None:
                    raise self.failed
                result = self._index(row["ids"], row.get("texts"), row.get("vectors"))
                error = b""
            except Exception as e:
                result, error = {}, _pickled(e)
            out["start"].append(row["start"])
            out["n"].append(len(row["ids"]))
            for k in ("cells", "codes", "errors", "shards"):
                out[k].append(result.get(k, b""))
            out["encode_seconds"].append(result.get("encode_seconds", 0.0))
            out["worker"].append(self.worker)
            out["error"].append(error)
        arrays: dict[str, np.ndarray] = {
            "start": np.asarray(out["start"], dtype=np.int64),
            "n": np.asarray(out["n"], dtype=np.int64),
            "encode_seconds": np.asarray(out["encode_seconds"], dtype=np.float64),
        }
        for k in ("cells", "codes", "errors", "shards", "worker", "error"):
            arr = np.empty(len(out[k]), dtype=object)
            arr[:] = out[k]
            arrays[k] = arr
        return arrays

    def _index(self, ids: list[str], texts: list[str] | None, vectors: bytes | None) -> dict[str, Any]:
        """One chunk, as index_catalog does it: texts -> (n, d) embeddings -> encode_chunks."""
        te = time.perf_counter()
        if self.encoder is not None:
            x = self.encoder.encode(texts, batch_size=self.batch_size)
        else:
            x = torch.from_numpy(np.frombuffer(vectors, dtype=np.float32).reshape(-1, self.quantizer.d).copy())
        parts = list(self.quantizer.encode_chunks(x))
        seconds = time.perf_counter() - te
        M = self.quantizer.M
        cells = torch.cat([p[0] for p in parts]) if parts else torch.zeros(0, dtype=torch.int64)
        codes = torch.cat([p[1] for p in parts]) if parts else torch.zeros(0, M, dtype=torch.uint8)
        errors = torch.cat([p[2] for p in parts]) if parts else torch.zeros(0)
        return {
            "cells": cells.numpy().astype(np.int64).tobytes(),
            "codes": codes.numpy().astype(np.uint8).tobytes(),
            "errors": errors.numpy().astype(np.float32).tobytes(),
            "shards": shard_of(ids, self.shards).astype(np.int32).tobytes(),
            "encode_seconds": seconds,
        }


COLUMNS = ("start", "n", "cells", "codes", "errors", "shards", "encode_seconds", "worker", "error")


def _pickled(e: BaseException) -> bytes:
    """An actor's error as data (pickled; its message when it does not pickle): Ray carries a
    raised exception's type but drops its chain and, for a failed __init__, the object itself."""
    try:
        return pickle.dumps(e)
    except Exception:
        return pickle.dumps(IndexingError(f"{type(e).__name__}: {e}"))


def index_with_ray(
    artifact: str | Path,
    out: str | Path,
    *,
    corpus: str | Path | None = None,
    vectors: str | Path | None = None,
    ids: str | Path | None = None,
    shards: int,
    mode: str = "replace",
    batch_size: int = 64,
    chunk: int = RAY_CHUNK,
    address: str | None = None,
    device: str = "cpu",
    runtime: str = "auto",
    concurrency: int | None = None,
    progress: bool = True,
) -> tuple[ShardSet, dict[str, Any]]:
    """Index `corpus` (texts) or `vectors` + `ids` with `artifact`'s frozen model on Ray Data and
    write the result as a shard set of `shards` artifacts at `out` (new; built in a temp directory
    beside it and renamed into place). Returns (the set, the `indexed` record with its drift report).

    `mode`, `batch_size` (encoder batch), `runtime` as `jointpq index`; `chunk`: items per actor
    call; `address`: the Ray cluster to join (default: the running one, else a local one started
    and stopped here); `device`: where the actors run the item tower ("auto": cuda when the
    cluster has GPUs); `concurrency`: actors in the pool (default: one per CPU, or per GPU)."""
    if mode not in INDEX_MODES:
        raise IndexingError(f"--mode {mode!r} is not one of {INDEX_MODES}")
    if (corpus is None) == (vectors is None):
        raise IndexingError("give exactly one of --corpus (texts) or --vectors (with --ids)")
    if vectors is not None and ids is None:
        raise IndexingError("--vectors needs --ids (a JSON list of one id per row)")
    try:
        check_count(shards)
    except ValueError:
        raise IndexingError(f"--shards must be an integer in [1, 4096], got {shards!r}") from None
    if batch_size < 1 or chunk < 1:
        raise IndexingError(f"--batch-size and the chunk must be >= 1, got {batch_size} and {chunk}")
    if concurrency is not None and concurrency < 1:
        raise IndexingError(f"--ray-workers must be >= 1, got {concurrency}")
    artifact, out = Path(artifact), Path(out)
    if out.exists():
        raise ArtifactError(f"{out}: already exists (shard sets are immutable, like versions)")
    t0 = time.perf_counter()
    manifest, parent = read_artifact(artifact)
    if manifest.shard is not None:
        raise IndexingError(f"{artifact}: is itself a shard ({manifest.version}); index with the whole artifact")
    texts = corpus is not None
    if texts:
        if not has_item_tower(artifact):  # as load_item_encoder says it, before any Ray starts
            raise NoItemTower(f"{artifact}: holds no item encoder ({TOWER} missing: made before item towers"
                              " shipped); index vectors instead of texts, or retrain")  # fmt: skip
        batches: Iterator[Batch] = corpus_batches(Path(corpus), chunk)  # type: ignore[arg-type]
        source = f"corpus:{corpus}"
    else:
        batches = vector_batches(Path(vectors), Path(ids), parent.d, chunk)  # type: ignore[arg-type]
        source = f"vectors:{vectors}"
    where = corpus or ids
    # the first chunk is read before Ray starts: a missing or malformed file fails with one line
    first = next(batches, None)
    new_ids: list[str] = []
    gathered: list[dict[str, Any]] = []
    workers = 0
    started = False
    if first is not None:
        started = _connect(address)
        ctx = ray.data.DataContext.get_current()
        bars, ctx.enable_progress_bars = ctx.enable_progress_bars, progress
        try:
            workers, gathered, new_ids = _run(
                artifact, sha256_file(artifact / MANIFEST), texts, first, batches, where, shards=shards,
                batch_size=batch_size, runtime=runtime, device=device, concurrency=concurrency,
            )  # fmt: skip
        finally:
            ctx.enable_progress_bars = bars
            if started:
                ray.shutdown()
    if not new_ids and mode == "replace":
        raise IndexingError(f"{corpus or vectors}: no items to index")

    # -- the new items, in catalog order (the order index_catalog holds them in) -----------------
    gathered.sort(key=lambda r: r["start"])
    M = parent.M
    new_cells = torch.from_numpy(np.frombuffer(b"".join(r["cells"] for r in gathered), dtype=np.int64).copy())
    new_codes = torch.from_numpy(np.frombuffer(b"".join(r["codes"] for r in gathered), dtype=np.uint8).copy())
    new_codes = new_codes.reshape(-1, M)
    new_shard = np.frombuffer(b"".join(r["shards"] for r in gathered), dtype=np.int32)
    errors = torch.from_numpy(np.frombuffer(b"".join(r["errors"] for r in gathered), dtype=np.float32).copy())
    if not len(new_cells) == len(new_ids) == len(new_shard) == len(errors) == len(new_codes):
        raise RuntimeError(f"the workers returned {len(new_cells)} items of {len(new_ids)} sent")
    encode_seconds = sum(float(r["encode_seconds"]) for r in gathered)
    gathered.clear()  # the bytes now live in the arrays above
    drift = DriftStats()
    for s in range(0, len(errors), CHUNK):  # summed per index_catalog chunk: the same float64 sums
        drift.add(errors[s : s + CHUNK])

    # -- with the parent's items (add), grouped by shard, each slice in catalog order ------------
    parent_ids = [str(i) for i in parent.ids]
    seen = set(new_ids)
    replaced = sum(1 for i in parent_ids if i in seen)
    if mode == "add":
        keep = np.asarray([i not in seen for i in parent_ids], dtype=bool)
        parent_shard = shard_of(parent_ids, shards) if parent_ids else np.zeros(0, dtype=np.int64)
        parent_cells, parent_codes = parent.cells(), parent.unpacked_codes()
        drift = drift.merged((manifest.training.get("drift") or {}).get("new_items"))
    parts: list[IVFPQ] = []
    for s in range(shards):
        nm = new_shard == s
        cells_s, codes_s = new_cells[torch.from_numpy(nm)], new_codes[torch.from_numpy(nm)]
        ids_s = [i for i, m in zip(new_ids, nm.tolist(), strict=True) if m]
        if mode == "add":
            pm = keep & (parent_shard == s)
            tm = torch.from_numpy(pm)
            cells_s, codes_s = torch.cat([parent_cells[tm], cells_s]), torch.cat([parent_codes[tm], codes_s])
            ids_s = [i for i, m in zip(parent_ids, pm.tolist(), strict=True) if m] + ids_s
        parts.append(assemble(parent.metric, parent.rotation, parent.centroids, parent.codebooks, cells_s, codes_s,
                              ids_s, parent.nbits))  # fmt: skip
    del new_cells, new_codes
    total = sum(p.n for p in parts)
    sizes = torch.stack([p.list_sizes() for p in parts]).sum(0)  # the whole index's cells, as one would hold
    seconds = time.perf_counter() - t0
    # encode_seconds: summed over the workers (worker-seconds)
    record = indexing_record(manifest.version, mode, source, len(new_ids), replaced, len(parent_ids), total,
                             bool(texts), seconds, encode_seconds) | {
        "indexed_with": INDEXED_WITH,
        "ray_version": ray.__version__,
        "workers": workers,
        "chunk": chunk,
        "shards": shards,
        "shard_items": [p.n for p in parts],
    }
    training = dict(manifest.training)
    training["indexed"] = record
    training["drift"] = report(manifest.training.get("drift_baseline"), drift, sizes)
    training.setdefault("applied_seq", 0)
    training.pop("sharded_from", None)
    extra: dict[str, Path | bytes] = dict(carried_files(artifact, manifest.files))
    extra.pop(CANARY, None)
    canaries = _carried_canaries(artifact, parts, parent.metric)
    if canaries is not None:
        extra[CANARY] = canaries.dumps()
    # the set's parent is `out`'s name: what `jointpq shard` of a single-process `jointpq index --out
    # <that name>` would record
    shard_set = write_shards(out, parts, out.name, training, extra)
    return shard_set, record | {"drift": training["drift"]}


def _connect(address: str | None) -> bool:
    """Join `address`, or the Ray already running in this process, or start a local one. True
    when this call started it (then the caller shuts it down)."""
    if ray.is_initialized():
        return False
    kwargs: dict[str, Any] = {"logging_level": logging.WARNING}
    if address is None and not os.environ.get("RAY_ADDRESS"):
        kwargs["include_dashboard"] = False
    ray.init(address=address, **kwargs)
    return True


def _run(
    artifact: Path, manifest_sha256: str, texts: bool, first: Batch, batches: Iterator[Batch], where: Any, *,
    shards: int, batch_size: int, runtime: str, device: str, concurrency: int | None,
) -> tuple[int, list[dict[str, Any]], list[str]]:  # fmt: skip
    """Put the catalog's chunks in the object store, run the actor pool over them, gather the
    outputs. Returns (workers, one dict per chunk as `ChunkIndexer` gives it, the ids in order)."""
    refs, new_ids, seen = [], [], set()
    start = 0
    for batch in _chain(first, batches):
        for i in batch.ids:
            if i in seen:
                raise IndexingError(f"{where}: id {i!r} appears twice")
            seen.add(i)
        cols: dict[str, Any] = {"start": pa.array([start], pa.int64()), "ids": pa.array([batch.ids])}
        if batch.texts is not None:
            cols["texts"] = pa.array([batch.texts], pa.list_(pa.string()))
        else:
            cols["vectors"] = pa.array([batch.vectors.numpy().astype(np.float32).tobytes()], pa.binary())  # type: ignore[union-attr]
        refs.append(ray.put(pa.table(cols)))
        new_ids.extend(batch.ids)
        start += len(batch.ids)
    resources = ray.cluster_resources()
    gpu = device == "cuda" or (device == "auto" and texts and resources.get("GPU", 0) >= 1)
    dev = "cuda" if gpu else ("cpu" if device == "auto" else device)
    cpus = float(resources.get("CPU", 1))
    if concurrency is None:
        concurrency = int(resources.get("GPU", 1)) if gpu else max(1, int(cpus))
    workers = max(1, min(concurrency, len(refs)))
    node_cpus = max((float(n["Resources"].get("CPU", 0)) for n in ray.nodes() if n.get("Alive")), default=cpus)
    per_worker = min(node_cpus, cpus / workers) if cpus >= workers else cpus / workers  # fractional: shares CPUs
    per_worker = max(per_worker, 0.01)
    ds = ray.data.from_arrow_refs(refs).map_batches(
        ChunkIndexer,
        batch_size=1,
        batch_format="pyarrow",
        compute=ray.data.ActorPoolStrategy(size=workers),
        num_cpus=per_worker,
        num_gpus=1 if gpu else None,
        fn_constructor_kwargs={
            "artifact": str(artifact), "manifest_sha256": manifest_sha256, "texts": texts, "shards": shards,
            "batch_size": batch_size, "runtime": runtime, "device": dev, "threads": int(per_worker) or 1,
        },
    )  # fmt: skip
    gathered = []
    try:
        for row in ds.iter_rows():
            if row["error"]:
                raise pickle.loads(row["error"])  # the first chunk that failed: its worker's exception
            gathered.append(row)
    except (JointPQError, ValueError, OSError):
        raise
    except Exception as e:
        err = _cause(e)
        raise err from (e if err.__cause__ is e else None)
    return workers, gathered, new_ids


def _chain(first: Batch, rest: Iterator[Batch]) -> Iterator[Batch]:
    yield first
    yield from rest


def _cause(e: BaseException) -> BaseException:
    """The error an actor raised (an IndexingError, a malformed tower's ValueError, ...) out of
    Ray's wrappers, so the command prints its one-line message; any other failure (a node lost,
    an actor killed) as an IndexingError naming it, chained to Ray's error."""
    from ray.exceptions import RayError, RayTaskError

    cur: BaseException | None = e
    seen: set[int] = set()
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        if isinstance(cur, RayTaskError):
            cur = cur.cause
            continue
        if isinstance(cur, JointPQError | ValueError | OSError) and not isinstance(cur, RayError):
            return cur
        cur = cur.__cause__ or getattr(cur, "cause", None)
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    err = IndexingError(f"indexing on Ray failed: {type(e).__name__}: {lines[-1] if lines else 'no message'}")
    err.__cause__ = e  # kept by the caller's `raise ... from`
    return err


def _carried_canaries(artifact: Path, parts: list[IVFPQ], metric: str):
    """As `model.indexing.carried_canaries`, searched over the shards merged (`index.shard.merge`:
    equal to the unsharded search): the parent's canaries whose expected ids all remain."""
    from index import Index

    old = read_canaries(artifact)
    if old is None:
        return None
    present: set[str] = set()
    for p in parts:
        present.update(map(str, p.ids))
    kept = [q for q in old.queries if q.expected and set(q.expected) <= present]
    if not kept:
        return None
    indexes = [Index.in_memory(p) for p in parts if p.n]

    def search(x: np.ndarray, k: int, nprobe: int) -> list[list[str]]:
        return merge([i.search(x, k, nprobe) for i in indexes], k, metric)[1]

    margin = old.min_recall / old.measured_recall if old.measured_recall else 0.8
    return make_canaries(
        np.asarray([q.vector for q in kept], dtype=np.float32),
        [list(q.expected) for q in kept],
        search,
        [q.text for q in kept],
        old.k,
        old.nprobe,
        margin=margin,
    )


