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
from .errors import ArtifactError, JointPQError

POINTER = "CURRENT"
SHARDS = "shards.json"  # a shard set's index file (index.shard.SHARDS; not imported: shard imports artifact too)


NAME_MAX = 255  # bytes per path component (ext4, xfs, APFS); longer names fail in the OS with ENAMETOOLONG
PATH_MAX = 4096
_POINTER_MAX = 8192  # a pointer file holds one name: read no more than this


class BadArtifactName(JointPQError):  # noqa: N818 - reads as the condition
    """An artifact name or path that cannot name a version: empty, too long, unreadable."""


class PathOutsideRoot(BadArtifactName):
    """A requested artifact path resolves outside the artifact root (by `..`, absolute, or a link)."""


class PointerError(JointPQError):
    """The pointer file exists but does not hold a usable version name."""


def check_name(name: object) -> str:
    """`name` if it can name something inside a root, else BadArtifactName saying why. Checked
    before any file-system call, which would fail with an OSError for an over-long name."""
    if not isinstance(name, str) or not name.strip() or "\x00" in name:
        raise BadArtifactName("the artifact name is empty, not a string, or holds a NUL byte")
    raw = name.encode("utf-8", "surrogatepass")
    if len(raw) > PATH_MAX or any(len(part.encode("utf-8", "surrogatepass")) > NAME_MAX for part in name.split("/")):
        raise BadArtifactName(
            f"the artifact name is too long ({len(raw)} bytes;"
            f" at most {NAME_MAX} per path component, {PATH_MAX} in all)"
        )
    return name


def resolve_in_root(root: str | Path, name: str) -> Path:
    """`name` (a version or a relative path) as a real path inside `root`; BadArtifactName (or
    its PathOutsideRoot) otherwise."""
    check_name(name)
    base = Path(root).resolve()
    try:
        target = (base / name).resolve()  # an absolute `name` replaces base: caught below
    except (OSError, RuntimeError, ValueError) as e:  # link loops, encoding errors
        raise BadArtifactName(f"{name[:80]!r} cannot be resolved ({e})") from None
    if target == base or not target.is_relative_to(base):
        raise PathOutsideRoot(f"{name[:80]!r} is not inside the artifact root")
    return target


def check_links_inside(root: str | Path, path: Path) -> None:
    """Refuse a version directory holding a symbolic link, at any depth, that resolves outside
    `root`: the checksums prove a file's content, not where it lives, and a link could make the
    service read (and answer from) any file the process can open."""
    base = Path(root).resolve()
    for dirpath, dirnames, filenames in os.walk(path, followlinks=False):
        for entry in (*dirnames, *filenames):
            p = Path(dirpath) / entry
            if p.is_symlink() and not p.resolve().is_relative_to(base):
                raise PathOutsideRoot(f"{p.relative_to(path).as_posix()} is a link that leaves the artifact root")


def read_pointer(root: str | Path, pointer: str = POINTER) -> str | None:
    """The version the pointer file names, or None when there is no pointer file (or it is
    empty). PointerError when it cannot name a version (not UTF-8, too long, NUL bytes)."""
    path = Path(root) / pointer
    try:
        with open(path, "rb") as f:
            raw = f.read(_POINTER_MAX + 1)
    except FileNotFoundError:
        return None
    except OSError as e:
        raise PointerError(f"{pointer}: unreadable ({e.strerror or e})") from None
    if len(raw) > _POINTER_MAX:
        raise PointerError(f"{pointer}: larger than {_POINTER_MAX} bytes; it must hold one version name")
    try:
        text = raw.decode("utf-8").strip()
    except UnicodeDecodeError as e:
        raise PointerError(f"{pointer}: not UTF-8 ({e.reason} at byte {e.start})") from None
    if not text:
        return None
    try:
        return check_name(text)
    except BadArtifactName as e:
        raise PointerError(f"{pointer}: {e}") from None


def publish(root: str | Path, version: str, pointer: str = POINTER) -> Path:
    """Point `root/pointer` at `version` (an artifact inside root, or a shard set of one for the
    sharded service: `index.shard`), atomically."""
    target = resolve_in_root(root, version)
    if not (target / MANIFEST).is_file() and not (target / SHARDS).is_file():
        raise ArtifactError(f"{target}: not an artifact (no {MANIFEST}) nor a shard set (no {SHARDS})")
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
    """What a service should serve from `root`: the pointer's version, else the newest artifact.
    PointerError when a pointer file exists but is unusable (never silently the newest instead)."""
    return read_pointer(root, pointer) or latest_version(root)
