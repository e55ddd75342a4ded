"""Shards of an artifact: past one machine's memory, each machine holds a slice of the items.

An index of 1B items x 16 B is 16 GB of codes plus ids; it is served as S shards, each a complete
artifact with the **full model** (rotation, centroids, codebooks, encoders: they are small) and a
slice of the items: its own codes, CSR lists and ids. Items are assigned by a stable hash of
their id (`shard_of`: the first 8 bytes of BLAKE2b, mod S), so anyone (a router routing a live
write, `jointpq index --ray` writing shards directly) finds an item's shard from its id alone,
on any machine, in any process (Python's `hash()` is salted per process: useless here).

Layout of a shard set (`jointpq shard --artifact A --shards S --out DIR`)::

    DIR/
      shards.json             format, parent version, S, hash, each member's name, items, manifest sha256
      shard-000-of-002/       an artifact; its manifest says {"shard": {"index": 0, "count": 2, ...}}
      shard-001-of-002/

Search over shards (`merge`): every shard scans the **same** cells (the probe is computed once,
by the router, `index.search.Probe`), returns its top-k, and the router merges them by score.
Each item's score is computed by the same code from the same numbers whatever shard holds it, so
the merge equals the unsharded search exactly, ids and scores. **Tie order**: equal scores are
ordered by item id (ascending code points), so a result does not depend on S or on which shard
answered first; the unsharded engines pick among equal scores arbitrarily, which is why the tests
compare in this order.
"""

from __future__ import annotations

import hashlib
import heapq
import json
import os
import shutil
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .artifact import IDS, MANIFEST, MAX_SHARDS, TENSORS, read_artifact, read_json, read_manifest, sha256_file
from .artifact import write_artifact as _write_artifact
from .errors import ArtifactError
from .ivfpq import IVFPQ

SHARDS = "shards.json"
SHARDS_FORMAT = "jointpq-shards"
HASH = "blake2b-64"


def check_count(shards: int) -> int:
    if isinstance(shards, bool) or not isinstance(shards, int) or not 1 <= shards <= MAX_SHARDS:
        raise ValueError(f"shards must be an integer in [1, {MAX_SHARDS}], got {shards!r}")
    return shards


def shard_of(ids: Iterable[str], shards: int) -> np.ndarray:
    """(n,) int64 shard of each item id: BLAKE2b-64 of its UTF-8 bytes, little-endian, mod S.
    Stable across processes, machines and Python versions (~1 s per million ids)."""
    check_count(shards)

    def h64(i: str) -> int:
        digest = hashlib.blake2b(str(i).encode("utf-8", "surrogatepass"), digest_size=8).digest()
        return int.from_bytes(digest, "little")

    h = np.fromiter((h64(i) for i in ids), dtype=np.uint64)
    return (h % np.uint64(shards)).astype(np.int64)


def shard_name(i: int, shards: int) -> str:
    return f"shard-{i:03d}-of-{shards:03d}"


def split(index: IVFPQ, shards: int) -> list[IVFPQ]:
    """The S slices of `index` by `shard_of` its ids: same quantizer, each item's codes and cell
    kept, rows in the parent's order (so the cells stay contiguous: CSR offsets recounted)."""
    owner = torch.from_numpy(shard_of(index.ids, shards))
    cells = index.cells()
    out = []
    for s in range(shards):
        keep = owner == s
        offsets = torch.zeros(index.nlist + 1, dtype=torch.int64)
        offsets[1:] = torch.cumsum(torch.bincount(cells[keep], minlength=index.nlist), 0)
        codes, ids = index.codes[keep].contiguous(), index.ids[keep.numpy()]
        quantizer = (index.rotation, index.centroids, index.codebooks)
        out.append(IVFPQ(index.metric, *quantizer, codes, offsets, ids, index.nbits))
    return out


@dataclass(frozen=True)
class ShardSet:
    """A written shard set: where it is, what it was cut from, its members in shard order."""

    path: Path
    parent: str
    count: int
    members: tuple[str, ...]  # directory names inside `path`, member i holds shard i
    n_items: int
    hash: str = HASH

    def member(self, i: int) -> Path:
        return self.path / self.members[i]


def write_shard(
    path: Path, index: IVFPQ, i: int, shards: int, parent: str, parent_items: int, *, training: dict[str, Any],
    extra_files: dict[str, Path | bytes] | None = None,
) -> Path:  # fmt: skip
    """Write shard i of S (its slice `index`) as an artifact whose manifest says so."""
    meta = {"index": i, "count": shards, "parent": parent, "hash": HASH, "parent_items": parent_items}
    return _write_artifact(path, index, version=f"{parent}/{shard_name(i, shards)}", training=training,
                           extra_files=extra_files, shard=meta)  # fmt: skip


def write_shard_set(out: Path, members: Sequence[Path], parent: str) -> ShardSet:
    """Write `out/shards.json` over member artifacts already written inside `out`, in shard order."""
    entries = []
    total = 0
    for i, m in enumerate(members):
        man = read_manifest(m)
        if man.shard is None or man.shard["index"] != i or man.shard["count"] != len(members):
            raise ArtifactError(f"{m.name}: its manifest does not say it is shard {i} of {len(members)}")
        entries.append({"name": m.name, "n_items": man.n_items, "manifest_sha256": sha256_file(m / MANIFEST)})
        total += man.n_items
    doc = {"format": SHARDS_FORMAT, "parent": parent, "count": len(members), "hash": HASH, "n_items": total,
           "members": entries}  # fmt: skip
    tmp = out / f".{SHARDS}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.write_text(json.dumps(doc, indent=2, ensure_ascii=False), encoding="utf-8")
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, out / SHARDS)
    return ShardSet(out, parent, len(members), tuple(e["name"] for e in entries), total)


def carried_files(path: Path, files: Iterable[str]) -> dict[str, Path]:
    """The parent's files every shard carries: everything but the index tensors and ids (the
    encoders, their ONNX graphs, the canaries, the training report)."""
    return {name: path / name for name in files if name not in (TENSORS, IDS)}


def shard_artifact(artifact: str | Path, shards: int, out: str | Path) -> ShardSet:
    """Split the artifact at `artifact` into `shards` shard artifacts under `out` (new, written
    whole into a temp directory beside it and renamed into place: a reader never sees half)."""
    check_count(shards)
    src, out = Path(artifact), Path(out)
    if out.exists():
        raise ArtifactError(f"{out}: already exists (shard sets are immutable, like versions)")
    manifest, index = read_artifact(src)
    if manifest.shard is not None:
        raise ArtifactError(f"{src}: is itself a shard ({manifest.version}); shard the whole artifact")
    training = dict(manifest.training) | {"sharded_from": manifest.version}
    return write_shards(out, split(index, shards), manifest.version, training, carried_files(src, manifest.files))


def write_shards(
    out: Path, parts: Sequence[IVFPQ], parent: str, training: dict[str, Any], extra_files: dict[str, Path | bytes]
) -> ShardSet:
    """`parts` (shard i = parts[i]) as the new shard set `out`: each an artifact with `extra_files`
    (the model) and `training`, then shards.json; all in a temp directory renamed to `out` once whole."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        S, total = len(parts), sum(p.n for p in parts)
        paths = [write_shard(tmp / shard_name(i, S), part, i, S, parent, total, training=training,
                             extra_files=extra_files) for i, part in enumerate(parts)]  # fmt: skip
        write_shard_set(tmp, paths, parent)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return read_shard_set(out)


def is_shard_set(path: str | Path) -> bool:
    return (Path(path) / SHARDS).is_file()


def read_shard_set(path: str | Path) -> ShardSet:
    """Parse and check `path/shards.json` against its members' manifests (each manifest's sha256,
    shard index and count); member files themselves are verified when a shard loads them."""
    path = Path(path)
    raw = read_json(path / SHARDS, SHARDS) if (path / SHARDS).is_file() else None
    if not isinstance(raw, dict) or raw.get("format") != SHARDS_FORMAT:
        raise ArtifactError(f"{path}: not a shard set (no {SHARDS} of format {SHARDS_FORMAT!r})")
    members, count = raw.get("members"), raw.get("count")
    if not isinstance(members, list) or not isinstance(count, int) or len(members) != count or count < 1:
        raise ArtifactError(f"{SHARDS}: 'members' must list 'count' shards")
    if raw.get("hash") != HASH:
        raise ArtifactError(f"{SHARDS}: hash {raw.get('hash')!r} is not {HASH!r} (this build routes ids by it)")
    names, total = [], 0
    for i, m in enumerate(members):
        name = m.get("name") if isinstance(m, dict) else None
        if not isinstance(name, str) or "/" in name or name.startswith("."):
            raise ArtifactError(f"{SHARDS}: members[{i}] has no valid name")
        mpath = path / name / MANIFEST
        if not mpath.is_file():
            raise ArtifactError(f"{SHARDS}: members[{i}] {name}: missing")
        if sha256_file(mpath) != m.get("manifest_sha256"):
            raise ArtifactError(f"{name}/{MANIFEST}: sha256 differs from {SHARDS} (replaced or corrupt)")
        man = read_manifest(path / name)
        if man.shard is None or man.shard["index"] != i or man.shard["count"] != count:
            raise ArtifactError(f"{name}: its manifest does not say it is shard {i} of {count}")
        names.append(name)
        total += man.n_items
    parent = raw.get("parent")
    if not isinstance(parent, str):
        raise ArtifactError(f"{SHARDS}: 'parent' must be a string")
    return ShardSet(path, parent, count, tuple(names), total)


# -- searching shards ------------------------------------------------------------------------------


def merge(
    parts: Sequence[tuple[Sequence[np.ndarray], Sequence[Sequence[str]]]], k: int, metric: str
) -> tuple[list[np.ndarray], list[list[str]]]:
    """Merge per-shard answers into one top-k per query.

    `parts`: one (scores, ids) per shard that answered, each per query (B of them) best first, as
    `Index.search` gives them. Returns per query at most k (scores, ids), best first: scores
    descending (ip) or ascending (l2), ties by id ascending. O(B * S * k log(S k)); the shards'
    own top-k did the heavy part."""
    if not parts:
        return [], []
    B = len(parts[0][0])
    sign = -1.0 if metric == "ip" else 1.0
    out_s: list[np.ndarray] = []
    out_i: list[list[str]] = []
    for q in range(B):
        cand = [(sign * float(s), i, float(s)) for scores, ids in parts for s, i in zip(scores[q], ids[q], strict=True)]
        best = heapq.nsmallest(k, cand)
        out_s.append(np.asarray([c[2] for c in best], dtype=np.float32))
        out_i.append([c[1] for c in best])
    return out_s, out_i


def entries_for(entries: Iterable[Any], shard: int, shards: int) -> list[Any]:
    """The item-log records (`index.wal.Entry`) as shard `shard` of `shards` applies them: each
    upsert and delete cut to the ids this shard owns (a record with none left keeps its sequence
    number as an empty write, so every shard's `applied_seq` advances alike)."""
    from .wal import Entry

    out = []
    for e in entries:
        if e.op == "upsert":
            items = e.body.get("items", [])
            own = shard_of([str(it["id"]) for it in items], shards) == shard if items else np.zeros(0, bool)
            out.append(Entry(e.seq, e.op, {**e.body, "items": [it for it, m in zip(items, own, strict=True) if m]}))
        elif e.op == "delete":
            ids = [str(i) for i in e.body.get("ids", [])]
            own = shard_of(ids, shards) == shard if ids else np.zeros(0, bool)
            out.append(Entry(e.seq, e.op, {**e.body, "ids": [i for i, m in zip(ids, own, strict=True) if m]}))
        else:
            out.append(e)
    return out


def quantizer_only(index: IVFPQ) -> IVFPQ:
    """`index` without its items: what a router holds to compute the probe once (rotation,
    centroids, codebooks: a few MB whatever the item count)."""
    return IVFPQ(index.metric, index.rotation, index.centroids, index.codebooks,
                 torch.zeros(0, index.code_size, dtype=torch.uint8), torch.zeros(index.nlist + 1, dtype=torch.int64),
                 np.empty(0, dtype=object), index.nbits)  # fmt: skip
