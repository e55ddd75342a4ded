"""The item-update write-ahead log: dense sequence numbers, readers that tail the file, a torn
tail dropped (and logged) rather than failing, mid-file damage refused, trim keeping numbering,
exact vector round trips, and appends serialised across real OS processes by the flock."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from index.wal import _HEAD, WAL, WalCorrupt, WriteAheadLog, decode_vector, encode_vector, scan

ROOT = Path(__file__).resolve().parents[2]


def _fill(wal: WriteAheadLog, n: int, start: int = 0) -> list[int]:
    """Append `n` delete records (ids x<start>..) from `wal`; returns their seqs."""
    seqs = []
    for i in range(start, start + n):
        _, e = wal.append("delete", {"ids": [f"x{i}"]}, after=wal.last_seq())
        seqs.append(e.seq)
    return seqs


def _frames(path: Path) -> list[tuple[int, int]]:
    """(offset, size) of every record of a clean log file."""
    data = path.read_bytes()
    out, pos = [], 0
    while pos < len(data):
        _, _, length, _ = _HEAD.unpack_from(data, pos)
        out.append((pos, _HEAD.size + length))
        pos += _HEAD.size + length
    return out


@pytest.fixture
def wal_log(caplog: pytest.LogCaptureFixture) -> Iterator[pytest.LogCaptureFixture]:
    """caplog wired to the `jointpq.wal` logger directly, so it sees WARNINGs even after a test
    elsewhere ran `service.logs.configure_logging` (which stops `jointpq` propagating to root)."""
    logger = logging.getLogger("jointpq.wal")
    logger.addHandler(caplog.handler)
    caplog.set_level(logging.WARNING, logger="jointpq.wal")
    try:
        yield caplog
    finally:
        logger.removeHandler(caplog.handler)


def _warnings(caplog: pytest.LogCaptureFixture, word: str) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.name == "jointpq.wal" and r.levelno == logging.WARNING and word in r.getMessage()
    ]


# -- sequence numbers and readers ---------------------------------------------------------------------


def test_append_returns_dense_seqs_and_read_all_filters_by_after(tmp_path: Path) -> None:
    """Seqs run 1, 2, 3, ... one per append; read_all(after=N) is exactly the records > N, with
    their bodies (op included) as appended."""
    wal = WriteAheadLog(tmp_path, fsync=False)
    assert wal.read_all() == [] and wal.last_seq() == 0
    seqs = []
    for i in range(6):
        missed, e = wal.append("upsert" if i % 2 else "delete", {"ids": [f"x{i}"]}, after=i)
        assert missed == []  # nobody else wrote
        seqs.append(e.seq)
    assert seqs == [1, 2, 3, 4, 5, 6]
    fresh = WriteAheadLog(tmp_path)
    for after in (0, 1, 4, 6, 10):
        got = fresh.read_all(after=after)
        assert [e.seq for e in got] == list(range(after + 1, 7))
    every = fresh.read_all()
    assert [e.body["ids"] for e in every] == [[f"x{i}"] for i in range(6)]
    assert [e.op for e in every] == ["delete", "upsert"] * 3
    assert all(e.body["op"] == e.op for e in every)
    assert fresh.last_seq() == 6


def test_second_log_object_sees_records_via_read_new_and_as_missed(tmp_path: Path) -> None:
    """Two objects on one directory (two workers): each one's records reach the other through
    read_new, and an append returns what the other wrote since as `missed`, in seq order."""
    a, b = WriteAheadLog(tmp_path, fsync=False), WriteAheadLog(tmp_path, fsync=False)
    _fill(a, 3)
    assert [e.seq for e in b.read_new(after=0)] == [1, 2, 3]
    assert b.read_new(after=3) == []  # nothing new: polling is idempotent
    _fill(a, 2, start=3)
    missed, e = b.append("delete", {"ids": ["from-b"]}, after=3)
    assert [m.seq for m in missed] == [4, 5] and [m.body["ids"] for m in missed] == [["x3"], ["x4"]]
    assert e.seq == 6
    # a learns of b's record the same two ways
    assert [x.seq for x in a.read_new(after=5)] == [6]
    missed, e = a.append("delete", {"ids": ["y"]}, after=5)
    assert [m.seq for m in missed] == [6] and e.seq == 7
    # a reader further behind (a freshly loaded version) re-reads from the start
    assert [x.seq for x in b.read_new(after=2)] == [3, 4, 5, 6, 7]


def test_reader_waits_for_a_record_still_being_written(tmp_path: Path, wal_log: pytest.LogCaptureFixture) -> None:
    """A half-written record at the end (another worker mid-append) is not returned by read_new,
    and once its remaining bytes land the same reader returns it: its offset stayed before it."""
    a = WriteAheadLog(tmp_path, fsync=False)
    _fill(a, 2)
    whole = (tmp_path / WAL).read_bytes()
    _fill(a, 1, start=2)
    third = (tmp_path / WAL).read_bytes()[len(whole) :]
    (tmp_path / WAL).write_bytes(whole + third[:25])  # header and 5 payload bytes of seq 3
    reader = WriteAheadLog(tmp_path)
    assert [e.seq for e in reader.read_new(after=0)] == [1, 2]
    with open(tmp_path / WAL, "ab") as f:
        f.write(third[25:])
    assert [e.seq for e in reader.read_new(after=2)] == [3]
    assert reader.read_new(after=3) == []
    assert _warnings(wal_log, "") == []  # read_new never logs a tail


# -- torn tails and damage ----------------------------------------------------------------------------


@pytest.mark.parametrize("cut", ["1", "half_payload", "payload_all", "header_less_1", "all_but_1"])
def test_truncated_tail_is_ignored_then_cut_off_by_next_append(
    tmp_path: Path, wal_log: pytest.LogCaptureFixture, cut: str
) -> None:
    """A crash mid-append (the last record cut short by 1..size-1 bytes): read_all returns the
    good records with a WARNING; the next append cuts the tail off (another WARNING), after
    which the file parses cleanly and the new seq follows the last good one."""
    wal = WriteAheadLog(tmp_path, fsync=False)
    _fill(wal, 3)
    path = tmp_path / WAL
    _, size = _frames(path)[-1]
    plen = size - _HEAD.size
    drop = {
        "1": 1,
        "half_payload": plen // 2,
        "payload_all": plen,  # only the header is left
        "header_less_1": plen + 1,  # an incomplete header
        "all_but_1": size - 1,
    }[cut]
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - drop])

    reader = WriteAheadLog(tmp_path)
    assert [e.seq for e in reader.read_all()] == [1, 2]
    assert len(_warnings(wal_log, "ignoring")) >= 1
    assert not _warnings(wal_log, "dropping")
    assert path.stat().st_size == len(data) - drop  # a reader never changes the file

    missed, e = WriteAheadLog(tmp_path).append("delete", {"ids": ["after-crash"]}, after=2)
    assert missed == [] and e.seq == 3
    assert len(_warnings(wal_log, "dropping")) >= 1
    found = scan(path.read_bytes())
    assert found.tail is None
    assert [x.seq for x in found.entries] == [1, 2, 3]
    assert found.entries[-1].body["ids"] == ["after-crash"]


@pytest.mark.parametrize(
    "garbage",
    [
        b"\x00",
        b"JPQ",
        b"\x00" * 64,
        b"not a record, just noise bytes at the end of the file",
        b"JPQW" + b"\x07" * 30,
    ],
    ids=["one-zero", "partial-magic", "zeros", "text", "magic-then-junk"],
)
def test_garbage_tail_is_ignored_then_cut_off_by_next_append(
    tmp_path: Path, wal_log: pytest.LogCaptureFixture, garbage: bytes
) -> None:
    """Junk bytes after the last record (a torn write of unknown shape) are skipped with a WARNING
    by read_all, and the next append cuts them off and continues the numbering."""
    wal = WriteAheadLog(tmp_path, fsync=False)
    _fill(wal, 3)
    path = tmp_path / WAL
    clean = path.read_bytes()
    path.write_bytes(clean + garbage)

    assert [e.seq for e in WriteAheadLog(tmp_path).read_all()] == [1, 2, 3]
    assert len(_warnings(wal_log, "ignoring")) >= 1
    # the object that wrote the good records (its offset is at their end) appends next
    missed, e = wal.append("delete", {"ids": ["next"]}, after=3)
    assert missed == [] and e.seq == 4
    assert len(_warnings(wal_log, "dropping")) >= 1
    data = path.read_bytes()
    assert data.startswith(clean) and len(scan(data[len(clean) :]).entries) == 1  # the junk is gone
    found = scan(data)
    assert found.tail is None and [x.seq for x in found.entries] == [1, 2, 3, 4]


def test_checksum_failing_last_record_is_a_torn_tail(tmp_path: Path, wal_log: pytest.LogCaptureFixture) -> None:
    """A complete last record whose checksum fails (a torn sector) is a tail, not corruption."""
    wal = WriteAheadLog(tmp_path, fsync=False)
    _fill(wal, 3)
    path = tmp_path / WAL
    data = bytearray(path.read_bytes())
    data[-3] ^= 0x01
    path.write_bytes(bytes(data))
    assert [e.seq for e in WriteAheadLog(tmp_path).read_all()] == [1, 2]
    assert any("checksum" in m for m in _warnings(wal_log, "ignoring"))
    _, e = WriteAheadLog(tmp_path).append("delete", {"ids": ["z"]}, after=2)
    assert e.seq == 3 and [x.seq for x in scan(path.read_bytes()).entries] == [1, 2, 3]


@pytest.mark.parametrize(
    ("where", "xor"),
    [
        pytest.param(0, 0xFF, id="magic"),
        pytest.param(5, 0x01, id="seq"),
        pytest.param(17, 0x40, id="crc"),
        pytest.param(_HEAD.size + 3, 0x01, id="payload"),
        pytest.param(12, 0xFF, id="length-low-byte"),
        pytest.param(13, 0x01, id="length-second-byte"),
    ],
)
def test_damaged_middle_record_is_refused(tmp_path: Path, where: int, xor: int) -> None:
    """One flipped byte (anywhere in its frame) in record 2 of 4, valid records after it: not a
    crash's torn tail but corruption, so readers raise WalCorrupt and an append refuses to touch
    the file (it must not cut the valid records off as a tail)."""
    wal = WriteAheadLog(tmp_path, fsync=False)
    _fill(wal, 4)
    path = tmp_path / WAL
    off, _ = _frames(path)[1]
    data = bytearray(path.read_bytes())
    data[off + where] ^= xor
    path.write_bytes(bytes(data))
    with pytest.raises(WalCorrupt):
        WriteAheadLog(tmp_path).read_all()
    with pytest.raises(WalCorrupt):
        WriteAheadLog(tmp_path).read_new(after=0)
    with pytest.raises(WalCorrupt):
        WriteAheadLog(tmp_path, fsync=False).append("delete", {"ids": ["x"]}, after=0)
    assert path.read_bytes() == bytes(data)


def test_valid_frame_with_bad_json_or_op_is_refused(tmp_path: Path) -> None:
    """A record whose checksum passes but whose payload is not a JSON object with a known op was
    written wrong, not torn: WalCorrupt, even as the last record."""
    from index.wal import _frame

    wal = WriteAheadLog(tmp_path, fsync=False)
    _fill(wal, 1)
    path = tmp_path / WAL
    good = path.read_bytes()
    for payload in (b"{not json", b'{"op": "rename"}', b"[1, 2]"):
        path.write_bytes(good + _frame(2, payload))
        with pytest.raises(WalCorrupt):
            WriteAheadLog(tmp_path).read_all()


# -- trim ---------------------------------------------------------------------------------------------


def test_trim_keeps_later_records_and_numbering(tmp_path: Path) -> None:
    """trim(upto) drops records <= upto and keeps the rest byte-for-byte in content; numbering
    continues after the last record; every reader (fresh, or one that read the old file) learns
    trimmed_upto, and one behind the trim point sees the gap through it."""
    a = WriteAheadLog(tmp_path, fsync=False)
    behind, current = WriteAheadLog(tmp_path, fsync=False), WriteAheadLog(tmp_path, fsync=False)
    _fill(a, 5)
    before = {e.seq: e.body for e in a.read_all()}
    assert [e.seq for e in behind.read_new(after=0)][:2] == [1, 2]
    assert [e.seq for e in current.read_new(after=0)] == [1, 2, 3, 4, 5]

    assert a.trim(3) == 2
    fresh = WriteAheadLog(tmp_path)
    kept = fresh.read_all()
    assert [e.seq for e in kept] == [4, 5]
    assert [e.body for e in kept] == [before[4], before[5]]
    assert fresh.trimmed_upto == 3 and fresh.last_seq() == 5
    assert WriteAheadLog(tmp_path).read_all(after=4)[0].seq == 5

    _, e = a.append("delete", {"ids": ["new"]}, after=5)
    assert e.seq == 6
    assert [x.seq for x in current.read_new(after=5)] == [6]  # the replaced file is noticed
    assert current.trimmed_upto == 3
    # a reader at seq 2 cannot get 3 from the log any more: trimmed_upto says so
    assert [x.seq for x in behind.read_new(after=2)] == [4, 5, 6]
    assert behind.trimmed_upto == 3 > 2
    _, e = WriteAheadLog(tmp_path).append("delete", {"ids": ["again"]}, after=6)
    assert e.seq == 7


def test_trim_of_everything_keeps_the_numbering(tmp_path: Path) -> None:
    """Trimming every record leaves just the mark: no records to read, but the next seq still
    follows the last one ever written (a new object reads it from the mark)."""
    a = WriteAheadLog(tmp_path, fsync=False)
    _fill(a, 4)
    assert a.trim(4) == 0
    fresh = WriteAheadLog(tmp_path)
    assert fresh.read_all() == [] and fresh.last_seq() == 4 and fresh.trimmed_upto == 4
    _, e = fresh.append("delete", {"ids": ["x"]}, after=4)
    assert e.seq == 5
    assert [x.seq for x in WriteAheadLog(tmp_path).read_all()] == [5]


def test_trim_to_an_older_point_never_rewinds_numbering(tmp_path: Path) -> None:
    """trim(2) after trim(4) (a slower compaction publishing late) drops nothing new, keeps the
    trim point at 4 and the next seq at 5: sequence numbers are never issued twice."""
    a = WriteAheadLog(tmp_path, fsync=False)
    _fill(a, 4)
    a.trim(4)
    a.trim(2)
    fresh = WriteAheadLog(tmp_path)
    assert fresh.read_all() == []
    assert fresh.trimmed_upto == 4
    _, e = fresh.append("delete", {"ids": ["x"]}, after=fresh.last_seq())
    assert e.seq == 5


def test_reader_survives_two_trims_between_its_reads(tmp_path: Path) -> None:
    """A worker that polls rarely (two compactions between two polls) still gets exactly the new
    records and the latest trim point."""
    a, reader = WriteAheadLog(tmp_path, fsync=False), WriteAheadLog(tmp_path, fsync=False)
    _fill(a, 6)
    assert [e.seq for e in reader.read_new(after=0)] == [1, 2, 3, 4, 5, 6]
    seen = (tmp_path / WAL).stat().st_ino
    a.trim(3)
    a.trim(5)
    if (tmp_path / WAL).stat().st_ino != seen:
        pytest.skip("this file system did not reuse the inode: the case cannot be built here")
    _fill(a, 8, start=6)  # the new file grows past the reader's old offset
    assert [e.seq for e in reader.read_new(after=6)] == list(range(7, 15))
    assert reader.trimmed_upto == 5


# -- vectors ------------------------------------------------------------------------------------------


def test_vector_round_trip_is_exact() -> None:
    """encode_vector / decode_vector keep every float32 bit (signed zero, extremes, subnormals,
    infinities), and float64 input is stored as its float32 value."""
    rng = np.random.default_rng(0)
    specials = np.array(
        [0.0, -0.0, 1e-45, -1e-45, 1.17e-38, 3.4028235e38, -3.4028235e38, np.inf, -np.inf, np.pi], dtype=np.float32
    )
    for v in (specials, rng.standard_normal(384).astype(np.float32), np.zeros(0, np.float32)):
        back = decode_vector(encode_vector(v), len(v))
        assert back.dtype == np.float32 and back.tobytes() == v.tobytes()
    nan = np.array([np.nan, 1.0], dtype=np.float32)
    assert decode_vector(encode_vector(nan), 2).tobytes() == nan.tobytes()
    v64 = rng.standard_normal(16)
    assert decode_vector(encode_vector(v64), 16).tobytes() == v64.astype(np.float32).tobytes()
    with pytest.raises(WalCorrupt, match="holds 10 dims, the index has 9"):
        decode_vector(encode_vector(specials), 9)


def test_vectors_survive_the_log(tmp_path: Path) -> None:
    """An upsert record's vectors read back from the file bit for bit."""
    rng = np.random.default_rng(1)
    x = rng.standard_normal((5, 24)).astype(np.float32)
    items = [{"id": f"i{j}", "vector": encode_vector(x[j])} for j in range(5)]
    WriteAheadLog(tmp_path, fsync=False).append("upsert", {"items": items, "tower": "t"}, after=0)
    (e,) = WriteAheadLog(tmp_path).read_all()
    back = np.stack([decode_vector(it["vector"], 24) for it in e.body["items"]])
    assert back.tobytes() == x.tobytes() and e.body["tower"] == "t"


# -- processes ----------------------------------------------------------------------------------------

# Loads index/wal.py (and index/errors.py) as the `index` package without running
# index/__init__.py, which imports torch (~3 s a process): the code under test is the same file.
_WORKER = textwrap.dedent(
    """
    import json, sys, time, types
    from pathlib import Path
    pkg = types.ModuleType("index"); pkg.__path__ = [sys.argv[1]]; sys.modules["index"] = pkg
    from index.wal import WriteAheadLog
    root, name = Path(sys.argv[2]), sys.argv[3]
    wal = WriteAheadLog(root)
    (root / f"ready-{name}").touch()
    deadline = time.monotonic() + 120
    while not (root / "go").exists() and time.monotonic() < deadline:
        time.sleep(0.002)
    applied, own = [], []
    for i in range(50):
        missed, e = wal.append("delete", {"ids": [f"{name}-{i}"]}, after=applied[-1] if applied else 0)
        applied += [m.seq for m in missed] + [e.seq]
        own.append(e.seq)
    print(json.dumps({"own": own, "applied": applied}))
    """
)


def test_concurrent_appends_from_four_processes_get_dense_unique_seqs(tmp_path: Path) -> None:
    """4 OS processes append 50 records each at once: the file holds 200 records, seqs 1..200
    each exactly once, each record's body is one process's, and every process saw the records
    in strict seq order with no gap (missed ones, then its own)."""
    names = [f"w{i}" for i in range(4)]
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _WORKER, str(ROOT / "index"), str(tmp_path), n],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for n in names
    ]
    try:
        deadline = time.monotonic() + 120
        while not all((tmp_path / f"ready-{n}").exists() for n in names):
            assert all(p.poll() is None for p in procs), [p.communicate()[1] for p in procs if p.poll() is not None]
            assert time.monotonic() < deadline, "workers did not start"
            time.sleep(0.01)
        (tmp_path / "go").touch()
        outs = [p.communicate(timeout=120) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert all(p.returncode == 0 for p in procs), [err for _, err in outs]
    results = [json.loads(out) for out, _ in outs]

    entries = WriteAheadLog(tmp_path).read_all()
    assert [e.seq for e in entries] == list(range(1, 201))
    assert sorted(s for r in results for s in r["own"]) == list(range(1, 201))
    by_seq = {e.seq: e.body["ids"][0] for e in entries}
    for n, r in zip(names, results, strict=True):
        assert [by_seq[s] for s in r["own"]] == [f"{n}-{i}" for i in range(50)]
        assert r["applied"] == list(range(1, r["applied"][-1] + 1))
    assert max(r["applied"][-1] for r in results) == 200
    assert scan((tmp_path / WAL).read_bytes()).tail is None
    assert os.path.exists(tmp_path / "items.wal.lock")
