"""The artifact: one directory per version, written atomically, verified on every load.

Layout::

    <version>/
      manifest.json        format, dims, metric, counts, training metadata, sha256 + size of every file
      index.safetensors    rotation, centroids, codebooks, codes, offsets (see `ivfpq.IVFPQ`)
      item_ids.json        JSON list of n strings, row order (json.loads of 1M ids takes ~0.1 s)
      ...                  extra files (e.g. the query encoder), listed and checksummed the same way

No pickle anywhere: tensors in safetensors, everything else JSON. A load checks, in this order,
the manifest, each file's size and sha256, tensor shapes and dtypes against the manifest, and the
index's internal consistency, and raises one `ArtifactError` naming the file and the problem.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import stat
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .errors import ArtifactError
from .ivfpq import IVFPQ, METRICS, NBITS, code_size

FORMAT = "jointpq-ivfpq"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
TENSORS = "index.safetensors"
IDS = "item_ids.json"
_TENSOR_NAMES = ("rotation", "centroids", "codebooks", "codes", "offsets")
# Bounds on what a manifest may claim, checked before anything is sized from it: a crafted
# manifest must be refused with its field named, not reach an allocation or a division.
LIMITS = {"dim": 1 << 16, "nlist": 1 << 24, "M": 1 << 12, "nbits": 8, "n_items": 1 << 40}


@dataclass(frozen=True)
class Manifest:
    """What manifest.json says; enough to rebuild the index without any training-code default."""

    version: str
    metric: str
    dim: int
    nlist: int
    M: int
    nbits: int
    n_items: int
    created: str
    files: dict[str, dict[str, Any]]
    training: dict[str, Any] = field(default_factory=dict)
    format_version: int = FORMAT_VERSION
    # set on a shard of a larger artifact (`index.shard`): {"index": i, "count": S, "parent": version,
    # "hash": the id hash that assigned items, "parent_items": n of the whole}
    shard: dict[str, Any] | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "format_version": self.format_version,
            "version": self.version,
            "created": self.created,
            "metric": self.metric,
            "dim": self.dim,
            "nlist": self.nlist,
            "M": self.M,
            "nbits": self.nbits,
            "K": 1 << self.nbits,
            "code_size": code_size(self.M, self.nbits),
            "n_items": self.n_items,
            "training": self.training,
            "files": self.files,
        } | ({"shard": self.shard} if self.shard is not None else {})


def read_json(path: Path, what: str | None = None) -> Any:
    """Parse a JSON file of an artifact; any way it can be bad (unreadable, not UTF-8, not JSON,
    nested past the parser's depth, an integer over Python's 4300-digit limit) becomes one
    `ArtifactError` naming the file, so a crafted file is refused instead of crashing a loader."""
    what = what or path.name
    try:
        return json.loads(path.read_bytes().decode("utf-8"))
    except OSError as e:
        raise ArtifactError(f"{what}: unreadable ({e.strerror or e})") from None
    except UnicodeDecodeError as e:
        raise ArtifactError(f"{what}: not UTF-8 ({e.reason} at byte {e.start})") from None
    except RecursionError:
        raise ArtifactError(f"{what}: JSON nested too deeply") from None
    except ValueError as e:  # JSONDecodeError, and int() past sys.get_int_max_str_digits()
        raise ArtifactError(f"{what}: not valid JSON ({str(e)[:200]})") from None


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def _check_relpath(name: str) -> PurePosixPath:
    p = PurePosixPath(name)
    if p.is_absolute() or ".." in p.parts or not p.parts or name in (MANIFEST,):
        raise ArtifactError(f"{name}: not a valid file name inside an artifact")
    return p


def write_artifact(
    path: str | Path,
    index: IVFPQ,
    *,
    version: str | None = None,
    training: Mapping[str, Any] | None = None,
    extra_files: Mapping[str, bytes | str | Path] | None = None,
    overwrite: bool = False,
    shard: Mapping[str, Any] | None = None,
) -> Path:
    """Write `index` (plus extra files) as an artifact directory at `path`, atomically.

    Everything goes into a hidden temp directory beside `path` and is renamed into place only
    once complete and fsynced, so a reader never sees half an artifact. Returns the final path.
    """
    index.check()
    ids = [str(i) for i in index.ids]
    if len(set(ids)) != len(ids):
        raise ArtifactError(f"{IDS}: item ids are not unique ({len(ids) - len(set(ids))} duplicates)")
    path = Path(path)
    if path.exists() and not overwrite:
        raise ArtifactError(f"{path}: already exists (artifact versions are immutable; pass overwrite)")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        tensors = {name: getattr(index, name).detach().cpu().contiguous() for name in _TENSOR_NAMES}
        save_file(tensors, str(tmp / TENSORS), metadata={"format": FORMAT})
        (tmp / IDS).write_text(json.dumps(ids, ensure_ascii=False), encoding="utf-8")
        # safetensors creates its file 0600; give it the mode the umask gives every other file
        os.chmod(tmp / TENSORS, stat.S_IMODE((tmp / IDS).stat().st_mode))
        for name, content in (extra_files or {}).items():
            dest = tmp / _check_relpath(name)
            dest.parent.mkdir(parents=True, exist_ok=True)
            if isinstance(content, bytes):
                dest.write_bytes(content)
            else:
                shutil.copyfile(content, dest)
        files = {}
        for f in sorted(p for p in tmp.rglob("*") if p.is_file()):
            _fsync(f)
            files[f.relative_to(tmp).as_posix()] = {"sha256": sha256_file(f), "bytes": f.stat().st_size}
        manifest = Manifest(
            version=version or path.name,
            metric=index.metric,
            dim=index.d,
            nlist=index.nlist,
            M=index.M,
            nbits=index.nbits,
            n_items=index.n,
            created=datetime.now(UTC).isoformat(timespec="seconds"),
            files=files,
            training=dict(training or {}),
            shard=dict(shard) if shard is not None else None,
        )
        (tmp / MANIFEST).write_text(json.dumps(manifest.to_json(), indent=2, ensure_ascii=False), encoding="utf-8")
        _fsync(tmp / MANIFEST)
        if path.exists():  # overwrite: move the old one aside first; rename is atomic per step
            trash = path.parent / f".{path.name}.old-{uuid.uuid4().hex[:8]}"
            path.rename(trash)
            tmp.rename(path)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            tmp.rename(path)
        _fsync_dir(path.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def _fsync(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def read_manifest(path: str | Path) -> Manifest:
    """Parse and validate manifest.json of the artifact at `path` (no file is hashed here)."""
    path = Path(path)
    mpath = path / MANIFEST
    if not path.is_dir():
        raise ArtifactError(f"{path}: not an artifact directory")
    if not mpath.is_file():
        raise ArtifactError(f"{MANIFEST}: missing in {path}")
    raw = read_json(mpath, MANIFEST)
    if not isinstance(raw, dict):
        raise ArtifactError(f"{MANIFEST}: expected a JSON object")
    if raw.get("format") != FORMAT:
        raise ArtifactError(f"{MANIFEST}: format is {_short(raw.get('format'))}, expected {FORMAT!r}")
    if raw.get("format_version") != FORMAT_VERSION:
        got = _short(raw.get("format_version"))
        raise ArtifactError(f"{MANIFEST}: format_version {got} is not supported (this build reads {FORMAT_VERSION})")
    for key in ("dim", "nlist", "M", "nbits", "n_items"):
        v = raw.get(key)
        low = 0 if key == "n_items" else 1
        if not isinstance(v, int) or isinstance(v, bool) or not low <= v <= LIMITS[key]:
            bounds = f"[{low}, {LIMITS[key]}]"
            raise ArtifactError(f"{MANIFEST}: field {key!r} must be an integer in {bounds}, got {_short(v)}")
    if raw["nbits"] not in NBITS:
        raise ArtifactError(f"{MANIFEST}: field 'nbits' must be one of {NBITS}, got {raw['nbits']}")
    if raw["dim"] % raw["M"] or (raw["nbits"] == 4 and raw["M"] % 2):
        raise ArtifactError(f"{MANIFEST}: M={raw['M']} must divide dim={raw['dim']} (and be even for 4-bit codes)")
    if raw.get("metric") not in METRICS:
        raise ArtifactError(f"{MANIFEST}: field 'metric' must be one of {METRICS}, got {_short(raw.get('metric'))}")
    for key in ("version", "created"):
        if not isinstance(raw.get(key), str):
            raise ArtifactError(f"{MANIFEST}: field {key!r} must be a string, got {_short(raw.get(key))}")
    if not isinstance(raw.get("training") or {}, dict):
        raise ArtifactError(f"{MANIFEST}: field 'training' must be a JSON object")
    files = raw.get("files")
    if not isinstance(files, dict) or not all(
        isinstance(v, dict)
        and isinstance(v.get("sha256"), str)
        and isinstance(v.get("bytes"), int)
        and not isinstance(v.get("bytes"), bool)
        and v["bytes"] >= 0
        for v in files.values()
    ):
        raise ArtifactError(f"{MANIFEST}: field 'files' must map names to {{sha256, bytes >= 0}}")
    for name in files:
        _check_relpath(name)
    for required in (TENSORS, IDS):
        if required not in files:
            raise ArtifactError(f"{MANIFEST}: does not list {required}")
    shard = raw.get("shard")
    if shard is not None:
        _check_shard(shard, raw["n_items"])
    return Manifest(
        version=raw["version"],
        metric=raw["metric"],
        dim=raw["dim"],
        nlist=raw["nlist"],
        M=raw["M"],
        nbits=raw["nbits"],
        n_items=raw["n_items"],
        created=raw["created"],
        files=files,
        training=raw.get("training") or {},
        format_version=raw["format_version"],
        shard=shard,
    )


MAX_SHARDS = 4096


def _check_shard(shard: Any, n_items: int) -> None:
    """The manifest's `shard` record: which part of which parent this artifact is."""
    if not isinstance(shard, dict):
        raise ArtifactError(f"{MANIFEST}: field 'shard' must be a JSON object")
    count, index = shard.get("count"), shard.get("index")
    for key, v, low, high in (("count", count, 1, MAX_SHARDS), ("index", index, 0, MAX_SHARDS - 1)):
        if not isinstance(v, int) or isinstance(v, bool) or not low <= v <= high:
            raise ArtifactError(f"{MANIFEST}: field 'shard.{key}' must be an integer in [{low}, {high}], got {v!r:.60}")
    if index >= count:
        raise ArtifactError(f"{MANIFEST}: shard.index {index} is not below shard.count {count}")
    for key in ("parent", "hash"):
        if not isinstance(shard.get(key), str):
            raise ArtifactError(f"{MANIFEST}: field 'shard.{key}' must be a string, got {_short(shard.get(key))}")
    total = shard.get("parent_items")
    if not isinstance(total, int) or isinstance(total, bool) or not n_items <= total <= LIMITS["n_items"]:
        got = _short(total)
        raise ArtifactError(f"{MANIFEST}: field 'shard.parent_items' must be an integer >= n_items, got {got}")


def verify_files(path: str | Path, manifest: Manifest) -> None:
    """Check every listed file exists with the recorded size and sha256."""
    path = Path(path)
    for name, meta in manifest.files.items():
        f = path / _check_relpath(name)
        if not f.is_file():
            raise ArtifactError(f"{name}: missing (listed in {MANIFEST})")
        size = f.stat().st_size
        if size != meta["bytes"]:
            raise ArtifactError(
                f"{name}: size is {size} bytes, {MANIFEST} says {meta['bytes']} (truncated or replaced)"
            )
        if sha256_file(f) != meta["sha256"]:
            raise ArtifactError(f"{name}: sha256 mismatch (file is corrupt or was modified)")


def read_artifact(path: str | Path, *, verify: bool = True) -> tuple[Manifest, IVFPQ]:
    """Load and fully validate the artifact at `path`; raise `ArtifactError` on any problem."""
    path = Path(path)
    manifest = read_manifest(path)
    if verify:
        verify_files(path, manifest)
    try:
        tensors = load_file(str(path / TENSORS))
    except (SafetensorError, OSError, ValueError) as e:
        raise ArtifactError(f"{TENSORS}: unreadable ({e})") from None
    missing = [n for n in _TENSOR_NAMES if n not in tensors]
    if missing:
        raise ArtifactError(f"{TENSORS}: missing tensors {missing}")
    ids = _read_ids(path / IDS)
    m = manifest
    expect = {
        "rotation": ((m.dim, m.dim), torch.float32),
        "centroids": ((m.nlist, m.dim), torch.float32),
        "codebooks": ((m.M, 1 << m.nbits, m.dim // m.M), torch.float32),  # read_manifest bounded these
        "codes": ((m.n_items, code_size(m.M, m.nbits)), torch.uint8),
        "offsets": ((m.nlist + 1,), torch.int64),
    }
    for name, (shape, dtype) in expect.items():
        t = tensors[name]
        if tuple(t.shape) != shape or t.dtype != dtype:
            raise ArtifactError(
                f"{TENSORS}: tensor {name!r} is {tuple(t.shape)} {t.dtype}, {MANIFEST} implies {shape} {dtype}"
            )
    if len(ids) != m.n_items:
        raise ArtifactError(f"{IDS}: holds {len(ids)} ids, {MANIFEST} says n_items={m.n_items}")
    index = IVFPQ(metric=m.metric, ids=ids, nbits=m.nbits, **{n: tensors[n] for n in _TENSOR_NAMES})
    try:
        index.check()
    except ValueError as e:
        raise ArtifactError(f"{TENSORS}: {e}") from None
    return manifest, index


def _short(value: Any, limit: int = 60) -> str:
    """repr of a value from a file, cut short: an error message must not echo a megabyte back."""
    try:
        text = repr(value)
    except ValueError:  # an int past the str-conversion digit limit
        return f"<{type(value).__name__} too large to print>"
    return text if len(text) <= limit else text[:limit] + "..."


def _read_ids(path: Path) -> np.ndarray:
    ids = read_json(path, IDS)
    if not isinstance(ids, list) or not all(isinstance(i, str) for i in ids):
        raise ArtifactError(f"{IDS}: expected a JSON list of strings")
    if len(set(ids)) != len(ids):
        raise ArtifactError(f"{IDS}: item ids are not unique")
    out = np.empty(len(ids), dtype=object)
    out[:] = ids
    return out
