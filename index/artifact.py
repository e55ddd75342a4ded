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
from .ivfpq import IVFPQ, code_size

FORMAT = "jointpq-ivfpq"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
TENSORS = "index.safetensors"
IDS = "item_ids.json"
_TENSOR_NAMES = ("rotation", "centroids", "codebooks", "codes", "offsets")


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
        }


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
    try:
        raw = json.loads(mpath.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ArtifactError(f"{MANIFEST}: not valid JSON ({e})") from None
    if not isinstance(raw, dict):
        raise ArtifactError(f"{MANIFEST}: expected a JSON object")
    if raw.get("format") != FORMAT:
        raise ArtifactError(f"{MANIFEST}: format is {raw.get('format')!r}, expected {FORMAT!r}")
    if raw.get("format_version") != FORMAT_VERSION:
        got = raw.get("format_version")
        raise ArtifactError(f"{MANIFEST}: format_version {got!r} is not supported (this build reads {FORMAT_VERSION})")
    ints = ("dim", "nlist", "M", "nbits", "n_items")
    for key in ints:
        if not isinstance(raw.get(key), int) or isinstance(raw.get(key), bool) or raw[key] < 0:
            raise ArtifactError(f"{MANIFEST}: field {key!r} must be a non-negative integer, got {raw.get(key)!r}")
    for key in ("version", "metric", "created"):
        if not isinstance(raw.get(key), str):
            raise ArtifactError(f"{MANIFEST}: field {key!r} must be a string, got {raw.get(key)!r}")
    files = raw.get("files")
    if not isinstance(files, dict) or not all(
        isinstance(v, dict) and isinstance(v.get("sha256"), str) and isinstance(v.get("bytes"), int)
        for v in files.values()
    ):
        raise ArtifactError(f"{MANIFEST}: field 'files' must map names to {{sha256, bytes}}")
    for required in (TENSORS, IDS):
        if required not in files:
            raise ArtifactError(f"{MANIFEST}: does not list {required}")
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
    )


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
        "codebooks": ((m.M, 1 << m.nbits, m.dim // m.M if m.M else 0), torch.float32),
        "codes": ((m.n_items, code_size(m.M, m.nbits) if m.nbits in (4, 8) else -1), torch.uint8),
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


def _read_ids(path: Path) -> np.ndarray:
    try:
        ids = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ArtifactError(f"{IDS}: unreadable ({e})") from None
    if not isinstance(ids, list) or not all(isinstance(i, str) for i in ids):
        raise ArtifactError(f"{IDS}: expected a JSON list of strings")
    if len(set(ids)) != len(ids):
        raise ArtifactError(f"{IDS}: item ids are not unique")
    out = np.empty(len(ids), dtype=object)
    out[:] = ids
    return out
