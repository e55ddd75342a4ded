"""`jointpq index`: index a (changed) catalog with a trained artifact's frozen model, no retraining.

Poeem's point: once trained, the item tower plus the learned indexing layer (rotation, coarse
cell, PQ codes) index any item with one forward pass, in seconds. This module runs that pass
over a catalog file (texts, through the artifact's item tower) or precomputed vectors and writes
a new artifact version with the same model (both towers, rotation, centroids, codebooks) and the
new codes and ids:

    replace   the new version holds exactly the given items
    add       the parent's items plus the given ones (an id already present is replaced)

Items stream through in chunks (`chunk` rows: encoder batches, then `index.encode.Quantizer`),
so a 1M-item catalog never holds all its embeddings; what is kept is cells (8 B) and codes (M B)
per item. Indexing the training corpus reproduces the trained artifact's cells and codes exactly
(the same encoder batches and the same quantizer code path as training; tests/model/test_indexing).
The manifest records where the version came from and the drift report (`index.drift`).
"""

from __future__ import annotations

import itertools
import json
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from index import read_artifact, write_artifact
from index.artifact import IDS, MANIFEST, TENSORS
from index.build import assemble
from index.canary import CANARY, make_canaries, read_canaries
from index.drift import DriftStats, report
from index.encode import Quantizer
from index.errors import JointPQError

from .data import DataError, iter_jsonl

INDEX_MODES = ("replace", "add")
CHUNK = 16384  # items per encode + quantize step; a multiple of the encoder batch (64)


def indexing_record(
    parent: str, mode: str, source: str, given: int, replaced: int, parent_items: int, items: int, encoded: bool,
    seconds: float, encode_seconds: float,
) -> dict[str, Any]:  # fmt: skip
    """The manifest's `training.indexed` record of one indexing run (`jointpq index`, with or without --ray)."""
    return {
        "parent": parent,
        "mode": mode,
        "source": source,
        "given": given,
        "added": given - replaced,
        "replaced": replaced,
        "removed": parent_items - replaced if mode == "replace" else 0,
        "items": items,
        "encoder": "item tower" if encoded else "vectors given",
        "seconds": round(seconds, 3),
        "encode_seconds": round(encode_seconds, 3),
        "items_per_second": round(given / seconds, 1) if seconds > 0 else None,
    }


class IndexingError(JointPQError, ValueError):
    """The items to index cannot be indexed with this artifact; the message names the input."""


@dataclass
class Batch:
    """One chunk of items: ids and either texts (to encode) or (n, d) vectors."""

    ids: list[str]
    texts: list[str] | None = None
    vectors: torch.Tensor | None = None


def corpus_batches(path: Path, chunk: int = CHUNK) -> Iterator[Batch]:
    """Chunks of a catalog file in the BEIR corpus layout ({"_id" or "id", "title"?, "text"}
    per line, .jsonl or .jsonl.gz): the text is title + text, as training reads it."""
    if not path.is_file():
        raise DataError(f"{path}: no such catalog file")
    ids: list[str] = []
    texts: list[str] = []
    for _, _id, text in iter_jsonl(path, ("title", "text"), id_keys=("_id", "id")):
        ids.append(_id)
        texts.append(text)
        if len(ids) == chunk:
            yield Batch(ids, texts)
            ids, texts = [], []
    if ids:
        yield Batch(ids, texts)


def vector_batches(vectors: Path, ids_path: Path, dim: int, chunk: int = CHUNK) -> Iterator[Batch]:
    """Chunks of an (n, d) .npy (memory-mapped: never read whole) with a JSON list of n ids."""
    try:
        x = np.load(vectors, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError) as e:
        raise IndexingError(f"{vectors}: not a readable .npy array ({e})") from None
    try:
        ids = json.loads(ids_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise IndexingError(f"{ids_path}: not a readable JSON list of ids ({e})") from None
    if not isinstance(ids, list) or not all(isinstance(i, str) and i for i in ids):
        raise IndexingError(f"{ids_path}: expected a JSON list of non-empty strings")
    if x.ndim != 2 or not np.issubdtype(x.dtype, np.number):
        raise IndexingError(f"{vectors}: expected a 2-D numeric array, got shape {x.shape} dtype {x.dtype}")
    if x.shape[1] != dim:
        raise IndexingError(f"{vectors}: rows have {x.shape[1]} dims, the artifact's index has {dim}")
    if len(ids) != len(x):
        raise IndexingError(f"{ids_path}: {len(ids)} ids for {len(x)} rows of {vectors}")
    for s in range(0, len(x), chunk):
        part = torch.from_numpy(np.array(x[s : s + chunk], dtype=np.float32))
        if not bool(torch.isfinite(part).all()):
            bad = s + int((~torch.isfinite(part)).any(1).nonzero()[0])
            raise IndexingError(f"{vectors}: row {bad} (id {ids[bad]!r}) holds NaN or infinite values")
        yield Batch(ids[s : s + chunk], vectors=part)


def copied_model_files(artifact: Path, manifest_files: dict[str, Any]) -> dict[str, Path]:
    """Every file of the parent except the index, ids, manifest and canaries: the encoders (both
    towers) and anything else the model needs, carried over byte for byte."""
    skip = {MANIFEST, TENSORS, IDS, CANARY}
    return {name: artifact / name for name in manifest_files if name not in skip}


def index_catalog(
    artifact: str | Path,
    out: str | Path,
    *,
    corpus: str | Path | None = None,
    vectors: str | Path | None = None,
    ids: str | Path | None = None,
    mode: str = "replace",
    batch_size: int = 64,
    chunk: int = CHUNK,
    device: str = "auto",
    progress: bool = True,
    encoder: Any = None,
    runtime: str = "auto",
) -> tuple[Path, dict[str, Any]]:
    """Index `corpus` (texts) or `vectors` + `ids` with `artifact`'s frozen model into a new
    artifact `out`; returns (out, the manifest's `indexed` record). See the module docstring.
    `encoder`: the artifact's item tower already loaded (e.g. a head tower whose frozen base
    reads a cache of base embeddings); default: `model.towers.load_item_encoder(artifact)` on
    `runtime` ("auto": ONNX Runtime for MiniLM on the CPU, see `model.onnx_runtime`)."""
    from tqdm.auto import tqdm

    from index.search import resolve_device

    if mode not in INDEX_MODES:
        raise IndexingError(f"--mode {mode!r} is not one of {INDEX_MODES}")
    if (corpus is None) == (vectors is None):
        raise IndexingError("give exactly one of --corpus (texts) or --vectors (with --ids)")
    if vectors is not None and ids is None:
        raise IndexingError("--vectors needs --ids (a JSON list of one id per row)")
    artifact, out = Path(artifact), Path(out)
    t0 = time.perf_counter()
    manifest, parent = read_artifact(artifact)
    quantizer = Quantizer.of(parent)
    dev = resolve_device(device)
    if corpus is not None:
        from .towers import load_item_encoder

        if encoder is None:  # runtime: ONNX Runtime where it is faster (`model.onnx_runtime`), float32
            encoder = load_item_encoder(artifact, runtime=runtime, device=dev)
        encoder = encoder.to(dev).eval()
        if encoder.dim != parent.d:
            raise IndexingError(f"{artifact}: the item tower outputs {encoder.dim} dims, the index has {parent.d}")
        batches = corpus_batches(Path(corpus), chunk)
        source = f"corpus:{corpus}"
    else:
        encoder = None
        batches = vector_batches(Path(vectors), Path(ids), parent.d, chunk)  # type: ignore[arg-type]
        source = f"vectors:{vectors}"
    new_ids: list[str] = []
    seen: set[str] = set()
    cells, codes = [], []
    drift = DriftStats()
    encode_seconds = 0.0
    # the first chunk is read before the bar opens (a missing or malformed file fails with no bar
    # drawn), and the bar closes on errors too: an error line never shares its line with it
    first = next(batches, None)
    with tqdm(desc="index items", unit="item", disable=not progress) as bar:
        for batch in itertools.chain([first] if first is not None else [], batches):
            for i in batch.ids:
                if i in seen:
                    raise IndexingError(f"{corpus or ids}: id {i!r} appears twice")
                seen.add(i)
            te = time.perf_counter()
            x = batch.vectors if batch.vectors is not None else encoder.encode(batch.texts, batch_size=batch_size)  # type: ignore[union-attr]
            encode_seconds += time.perf_counter() - te
            for c, j, err in quantizer.encode_chunks(x):
                cells.append(c)
                codes.append(j)
                drift.add(err)
            new_ids.extend(batch.ids)
            bar.update(len(batch.ids))
    if not new_ids and mode == "replace":
        raise IndexingError(f"{corpus or vectors}: no items to index")
    new_cells = torch.cat(cells) if cells else torch.zeros(0, dtype=torch.int64)
    new_codes = torch.cat(codes) if codes else torch.zeros(0, parent.M, dtype=torch.uint8)
    parent_ids = [str(i) for i in parent.ids]
    replaced = sum(1 for i in parent_ids if i in seen)
    if mode == "add":
        keep = torch.tensor([i not in seen for i in parent_ids], dtype=torch.bool)
        all_cells = torch.cat([parent.cells()[keep], new_cells])
        all_codes = torch.cat([parent.unpacked_codes()[keep], new_codes])
        all_ids = [i for i, k in zip(parent_ids, keep.tolist(), strict=True) if k] + new_ids
        drift = drift.merged((manifest.training.get("drift") or {}).get("new_items"))
    else:
        all_cells, all_codes, all_ids = new_cells, new_codes, new_ids
    index = assemble(
        parent.metric, parent.rotation, parent.centroids, parent.codebooks, all_cells, all_codes, all_ids, parent.nbits
    )
    seconds = time.perf_counter() - t0
    record = indexing_record(manifest.version, mode, source, len(new_ids), replaced, len(parent_ids), index.n,
                             encoder is not None, seconds, encode_seconds)  # fmt: skip
    training = dict(manifest.training)
    training["indexed"] = record
    training["drift"] = report(manifest.training.get("drift_baseline"), drift, index.list_sizes())
    training.setdefault("applied_seq", 0)
    extra: dict[str, bytes | str | Path] = dict(copied_model_files(artifact, manifest.files))
    canaries = carried_canaries(artifact, index)
    if canaries is not None:
        extra[CANARY] = canaries.dumps()
    write_artifact(out, index, training=training, extra_files=extra)
    return out, record | {"drift": training["drift"]}


def carried_canaries(artifact: Path, index):
    """The parent's canary queries whose expected ids all remain, re-measured on the new index
    (same margin): a changed catalog must not fail its own gate for ids it no longer holds."""
    from index import Index

    old = read_canaries(artifact)
    if old is None:
        return None
    present = set(map(str, index.ids))
    kept = [q for q in old.queries if q.expected and set(q.expected) <= present]
    if not kept:
        return None
    idx = Index.in_memory(index)
    margin = old.min_recall / old.measured_recall if old.measured_recall else 0.8
    return make_canaries(
        np.asarray([q.vector for q in kept], dtype=np.float32),
        [list(q.expected) for q in kept],
        lambda x, k, nprobe: idx.search(x, k, nprobe)[1],
        [q.text for q in kept],
        old.k,
        old.nprobe,
        margin=margin,
    )
