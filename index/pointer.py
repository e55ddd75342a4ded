"""The artifact root: a directory of immutable artifact versions plus a pointer file naming the
one to serve. Publishing a version rewrites the pointer atomically (temp file + rename), so a
watching service never reads half a name.

    artifacts/
      CURRENT            "scifact-v2\\n"
      scifact-v1/        manifest.json, index.safetensors, ...
      scifact-v2/

Paths that come from outside (a reload request, the pointer file) are resolved with
`resolve_in_root`, which refuses anything that leaves the root (``..``, absolute paths,
symlinks pointing out).
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path

from .artifact import MANIFEST
from .errors import JointPQError

POINTER = "CURRENT"


class PathOutsideRoot(JointPQError):  # noqa: N818 - reads as the condition
    """A requested artifact path resolves outside the artifact root."""


def resolve_in_root(root: str | Path, name: str) -> Path:
    """`name` (a version or a relative path) as a real path inside `root`, or PathOutsideRoot."""
    if not isinstance(name, str) or not name.strip() or "\x00" in name:
        raise PathOutsideRoot("the artifact name is empty or not a string")
    base = Path(root).resolve()
    target = (base / name).resolve()  # an absolute `name` replaces base: caught below
    if target == base or not target.is_relative_to(base):
        raise PathOutsideRoot(f"{name!r} is not inside the artifact root")
    return target


def read_pointer(root: str | Path, pointer: str = POINTER) -> str | None:
    """The version the pointer file names, or None when there is no pointer file."""
    path = Path(root) / pointer
    try:
        text = path.read_text(encoding="utf-8").strip()
    except FileNotFoundError:
        return None
    return text or None


def publish(root: str | Path, version: str, pointer: str = POINTER) -> Path:
    """Point `root/pointer` at `version` (which must be an artifact inside root), atomically."""
    target = resolve_in_root(root, version)
    if not (target / MANIFEST).is_file():
        raise JointPQError(f"{target}: not an artifact (no {MANIFEST})")
    path = Path(root) / pointer
    tmp = path.with_name(f".{pointer}.tmp-{uuid.uuid4().hex[:8]}")
    tmp.write_text(version + "\n", encoding="utf-8")
    os.replace(tmp, path)
    return path


def latest_version(root: str | Path) -> str | None:
    """The newest artifact directory in root (by manifest mtime), for roots without a pointer."""
    base = Path(root)
    if not base.is_dir():
        return None
    found = [p for p in base.iterdir() if p.is_dir() and not p.name.startswith(".") and (p / MANIFEST).is_file()]
    if not found:
        return None
    return max(found, key=lambda p: ((p / MANIFEST).stat().st_mtime, p.name)).name


def current_version(root: str | Path, pointer: str = POINTER) -> str | None:
    """What a service should serve from `root`: the pointer's version, else the newest artifact."""
    return read_pointer(root, pointer) or latest_version(root)
