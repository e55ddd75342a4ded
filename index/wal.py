"""The write-ahead log of live item updates: an acknowledged write survives a crash.

One append-only file per artifact root (`items.wal`). Every accepted batch becomes one record,
written and fsync'd *before* the service answers 200; state (the in-memory delta) comes second.
A version records the last sequence number it contains (`applied_seq` in its manifest), so
replay after a restart or a reload applies exactly the records after it.

Record layout (little-endian), a frame per batch::

    magic b"JPQW" | seq u64 | length u32 | crc32 u32 | payload (length bytes, UTF-8 JSON)

crc32 covers seq, length and the payload. A crash mid-append leaves an incomplete or
checksum-failing record at the *end* of the file: readers stop before it (it may also be a
write in progress by another worker) and the next appender, holding the lock, cuts it off with
a log line. A bad record followed by good ones is corruption, not a crash, and is refused
(`WalCorrupt`) rather than skipped.

Appends from several processes (uvicorn workers) are serialised with an exclusive `flock` on
`items.wal.lock`; under that lock the appender first reads what the others wrote, so sequence
numbers are dense and every worker applies records in sequence order. `trim(upto)` (after a
compaction published a version containing them) rewrites the file without the old records,
starting with a `mark` record that carries the sequence so numbering continues.

Payloads (`op`): ``upsert`` {"items": [{"id", "vector": base64 float32 LE, "text"?}], "tower"?},
``delete`` {"ids": [...]}, ``mark`` {} (trim point).
"""

from __future__ import annotations

import base64
import fcntl
import json
import logging
import os
import struct
import threading
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .errors import JointPQError

log = logging.getLogger("jointpq.wal")

WAL = "items.wal"
LOCK = "items.wal.lock"
MAGIC = b"JPQW"
_HEAD = struct.Struct("<4sQII")  # magic, seq, payload length, crc32
MAX_PAYLOAD = 256 << 20  # a length field above this is garbage, not a record to allocate for
OPS = ("upsert", "delete", "mark")


class WalError(JointPQError):
    """The log cannot be read or written (the message says which file and why)."""


class WalCorrupt(WalError):  # noqa: N818 - reads as the condition
    """A damaged record that is not the torn tail of a crash: an operator must look."""


class WalBehind(WalError):  # noqa: N818 - reads as the condition
    """The reader's state is older than a trim: the records it lacks now live only in the
    compacted version (reload it) and must not be skipped over."""


@dataclass(frozen=True)
class Entry:
    seq: int
    op: str
    body: dict[str, Any]


def encode_vector(v: np.ndarray) -> str:
    """(d,) float -> base64 of float32 little-endian: exact, and 4 bytes a dim instead of ~20 in JSON."""
    return base64.b64encode(np.asarray(v, dtype="<f4").tobytes()).decode("ascii")


def decode_vector(s: str, dim: int) -> np.ndarray:
    raw = base64.b64decode(s.encode("ascii"), validate=True)
    if len(raw) != 4 * dim:
        raise WalCorrupt(f"{WAL}: a vector holds {len(raw) // 4} dims, the index has {dim}")
    return np.frombuffer(raw, dtype="<f4").astype(np.float32)


def _frame(seq: int, payload: bytes) -> bytes:
    crc = zlib.crc32(struct.pack("<QI", seq, len(payload)) + payload)
    return _HEAD.pack(MAGIC, seq, len(payload), crc) + payload


@dataclass
class Scan:
    """What one read of the file found: records, where the readable part ends, and a tail that
    is incomplete or fails its checksum (None when the file ends cleanly)."""

    entries: list[Entry]
    end: int  # offset after the last good record
    tail: str | None = None


def scan(data: bytes, origin: int = 0) -> Scan:
    """Parse the records in `data` (the file's bytes from offset `origin`, which messages
    report); see the module docstring for the torn-tail rule. `Scan.end` is relative to data."""
    entries, pos, n = [], 0, len(data)
    while pos < n:
        if n - pos < _HEAD.size:
            return Scan(entries, pos, f"{n - pos} bytes of an incomplete record header at offset {origin + pos}")
        magic, seq, length, crc = _HEAD.unpack_from(data, pos)
        if magic != MAGIC or length > MAX_PAYLOAD:
            if _good_record_after(data, pos + 1):
                raise WalCorrupt(f"{WAL}: damaged record at offset {origin + pos} followed by valid ones")
            return Scan(entries, pos, f"garbage at offset {origin + pos} ({n - pos} bytes)")
        body_end = pos + _HEAD.size + length
        if body_end > n:
            if _good_record_after(data, pos + 1):  # a damaged length field, not a crash's tail
                bad = f"record seq {seq} at offset {origin + pos} has a bad length"
                raise WalCorrupt(f"{WAL}: {bad}, valid ones follow")
            where = f"a record of {length} bytes at offset {origin + pos}"
            return Scan(entries, pos, f"{where} cut at {n - pos - _HEAD.size}")
        payload = data[pos + _HEAD.size : body_end]
        if zlib.crc32(struct.pack("<QI", seq, length) + payload) != crc:
            if _good_record_after(data, pos + 1):
                where = f"record seq {seq} at offset {origin + pos}"
                raise WalCorrupt(f"{WAL}: {where} fails its checksum, valid ones follow")
            return Scan(entries, pos, f"record seq {seq} at offset {origin + pos} fails its checksum")
        try:
            obj = json.loads(payload.decode("utf-8"))
        except (UnicodeDecodeError, ValueError) as e:
            bad = f"{WAL}: record seq {seq} at offset {origin + pos} passes its checksum but is not JSON ({e})"
            raise WalCorrupt(bad) from None
        if not isinstance(obj, dict) or obj.get("op") not in OPS:
            raise WalCorrupt(f"{WAL}: record seq {seq} at offset {origin + pos} has no valid 'op'")
        entries.append(Entry(seq, obj["op"], obj))
        pos = body_end
    return Scan(entries, pos)


def _good_record_after(data: bytes, pos: int) -> bool:
    """Whether a complete, checksum-valid record starts anywhere after `pos` (bounded search)."""
    i = data.find(MAGIC, pos)
    while i != -1:
        if len(data) - i >= _HEAD.size:
            _, seq, length, crc = _HEAD.unpack_from(data, i)
            end = i + _HEAD.size + length
            payload = data[i + _HEAD.size : end] if length <= MAX_PAYLOAD and end <= len(data) else None
            if payload is not None and zlib.crc32(struct.pack("<QI", seq, length) + payload) == crc:
                return True
        i = data.find(MAGIC, i + 1)
    return False


class WriteAheadLog:
    """The log of one artifact root. Thread-safe within a process; process-safe via `flock`.

    `read_new()` tails the file from where this object last stopped (detecting a trim by the
    file's inode), returning records with seq > `after`."""

    def __init__(self, root: str | Path, fsync: bool = True):
        self.root = Path(root)
        self.path, self.lock_path = self.root / WAL, self.root / LOCK
        self.fsync = fsync
        self._mutex = threading.Lock()
        self._inode: int | None = None
        self._head = b""  # the file's first record header: with the inode, tells a trimmed file apart
        self._offset = 0  # bytes of the file (that inode) already read
        self._last = 0  # highest seq seen (marks included): the next append is _last + 1
        self.trimmed_upto = 0  # records <= this were trimmed (folded into a compacted version)

    # -- locking -----------------------------------------------------------------------------------
    @contextmanager
    def locked(self) -> Iterator[None]:
        """Exclusive across threads and processes (flock on the lock file)."""
        self.root.mkdir(parents=True, exist_ok=True)
        with self._mutex:
            fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
                yield
            finally:
                os.close(fd)  # releases the flock

    # -- reading -----------------------------------------------------------------------------------
    def _read(self, offset: int) -> tuple[bytes, int]:
        """(the file's bytes from `offset`, or from 0 when it was replaced (trim) or shrank;
        the offset they start at)."""
        try:
            with open(self.path, "rb") as f:
                st = os.fstat(f.fileno())
                head = f.read(_HEAD.size)
                # a trim replaces the file; the file system may hand the new one the old inode, but
                # its first record (a mark at the trim point) differs from the old file's
                if st.st_ino != self._inode or head != self._head or st.st_size < offset:
                    offset = 0
                self._inode, self._head = st.st_ino, head
                f.seek(offset)
                return f.read(), offset
        except FileNotFoundError:
            self._inode = None
            return b"", 0
        except OSError as e:
            raise WalError(f"{self.path}: unreadable ({e.strerror or e})") from None

    def _scan_new(self, after: int) -> Scan:
        """Scan the records a reader at `after` has not seen. Records sit in seq order, so all
        bytes before `_offset` hold seqs <= `_last`: a reader at `after >= _last` starts there
        (only new bytes are read); one further behind (a just-loaded version) rereads from 0."""
        data, base = self._read(self._offset if after >= self._last else 0)
        found = scan(data, base)
        if base == 0:
            self._last = 0
        if found.entries:
            self._last = max(self._last, found.entries[-1].seq)
        marks = [e.seq for e in found.entries if e.op == "mark"]
        if marks:
            self.trimmed_upto = max(self.trimmed_upto, *marks)
        self._offset = base + found.end
        found.end = self._offset
        return found

    def read_all(self, after: int = 0) -> list[Entry]:
        """Every complete record with seq > `after` (start-up, reload); a torn tail is left out
        with a log line."""
        with self._mutex:
            found = self._scan_new(after)
        if found.tail:
            log.warning("%s: ignoring %s (a write that never completed)", self.path, found.tail)
        return [e for e in found.entries if e.seq > after and e.op != "mark"]

    def read_new(self, after: int) -> list[Entry]:
        """Records with seq > `after` not yet applied by a reader at `after` (cheap to poll:
        usually only the bytes appended since the last read are read)."""
        with self._mutex:
            found = self._scan_new(after)
        return [e for e in found.entries if e.seq > after and e.op != "mark"]

    def last_seq(self) -> int:
        with self._mutex:
            self._scan_new(self._last)
            return self._last

    # -- writing -----------------------------------------------------------------------------------
    def append(self, op: str, body: dict[str, Any], after: int) -> tuple[list[Entry], Entry]:
        """Append one record and fsync it. Returns (records with seq > `after` that other
        processes wrote since this object last read: apply them before this one, the new
        record). Under the lock, a torn tail left by a crash is cut off first (logged)."""
        if op not in OPS:
            raise WalError(f"unknown op {op!r}")
        with self.locked():
            found = self._scan_new(after)
            if found.tail:
                log.warning("%s: dropping %s (a write that never completed; it was never acknowledged)",
                            self.path, found.tail)  # fmt: skip
                self._truncate(found.end)
            if self.trimmed_upto > after:
                raise WalBehind(
                    f"{self.path}: records up to {self.trimmed_upto} were folded into a compacted version;"
                    f" this reader is at {after}: reload the current version first"
                )
            missed = [e for e in found.entries if e.seq > after and e.op != "mark"]
            entry = Entry(self._last + 1, op, {**body, "op": op})
            payload = json.dumps(entry.body, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
            frame = _frame(entry.seq, payload)
            new_file = not self.path.exists()
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            try:
                written = os.write(fd, frame)
                if written != len(frame):
                    raise WalError(f"{self.path}: short write ({written} of {len(frame)} bytes)")
                if self.fsync:
                    os.fsync(fd)
                if new_file or self._inode is None:
                    self._inode, self._head = os.fstat(fd).st_ino, frame[: _HEAD.size]
            finally:
                os.close(fd)
            if new_file and self.fsync:
                _fsync_dir(self.root)
            self._offset += len(frame)
            self._last = entry.seq
            return missed, entry

    def _truncate(self, size: int) -> None:
        with open(self.path, "r+b") as f:
            f.truncate(size)
            if self.fsync:
                os.fsync(f.fileno())

    def trim(self, upto: int) -> int:
        """Drop the records with seq <= `upto` (folded into a published version): the file is
        rewritten (temp + fsync + rename) starting with a `mark` at `upto`. Returns records kept."""
        with self.locked():
            found = self._scan_new(-1)
            # never rewind: a trim to an older point than an earlier trim keeps the earlier mark
            mark = max([upto] + [e.seq for e in found.entries if e.op == "mark"])
            keep = [e for e in found.entries if e.seq > mark and e.op != "mark"]
            tmp = self.path.with_name(self.path.name + ".tmp")
            with open(tmp, "wb") as f:
                f.write(_frame(mark, json.dumps({"op": "mark"}).encode()))
                for e in keep:
                    f.write(_frame(e.seq, json.dumps(e.body, ensure_ascii=False, separators=(",", ":")).encode()))
                f.flush()
                if self.fsync:
                    os.fsync(f.fileno())
            os.replace(tmp, self.path)
            if self.fsync:
                _fsync_dir(self.root)
            self._offset, self._inode = 0, None  # re-read the new file from its start next time
            return len(keep)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
