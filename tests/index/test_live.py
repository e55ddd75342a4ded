"""LiveIndex: a base index + delta segment + tombstones. Upserted items are found, replaced and
deleted ones never come back at any k / nprobe, results equal a search of the compacted index,
the delta is scanned only in the cells the base probed, views are copy-on-write, counts add up,
and write-ahead-log replay applies records in order, once, re-encoding texts only across towers.
Both search backends (torch, Faiss) serve the base."""

from __future__ import annotations

import functools
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest
import torch

from index import IVFPQ, Index, build_ivfpq, faiss_interop
from index.live import LiveIndex, live, replay
from index.wal import Entry, WriteAheadLog, encode_vector
from tests.conftest import clustered

N_BASE, N_NEW, D, NLIST = 1500, 60, 16, 16
BACKENDS = [
    "torch",
    pytest.param("faiss", marks=pytest.mark.skipif(not faiss_interop.available(), reason="faiss is not installed")),
]
METRICS = ["ip", "l2"]


@functools.cache
def _vectors() -> tuple[np.ndarray, np.ndarray]:
    """(base (1500, 16), new (60, 16)): one clustered draw, so new items share the base's clusters."""
    x = clustered(N_BASE + N_NEW, D, seed=11)
    return x[:N_BASE], x[N_BASE:]


@functools.cache
def _ivfpq(metric: str) -> IVFPQ:
    xb, _ = _vectors()
    return build_ivfpq(xb, nlist=NLIST, M=8, nbits=8, metric=metric, niter=8, seed=0, ids=_base_ids())


def _base_ids() -> list[str]:
    return [f"b{i}" for i in range(N_BASE)]


def _new_ids(n: int = N_NEW, prefix: str = "n") -> list[str]:
    return [f"{prefix}{i}" for i in range(n)]


def _base(metric: str, backend: str) -> Index:
    return Index.in_memory(_ivfpq(metric), backend=backend)


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture(params=METRICS)
def metric(request: pytest.FixtureRequest) -> str:
    return request.param


def _no_duplicates(ids: list[list[str]]) -> None:
    for row in ids:
        assert len(row) == len(set(row)), f"an id returned twice: {row}"


def _mixed_view(metric: str, backend: str) -> tuple[LiveIndex, set[str], dict[str, np.ndarray], list[str]]:
    """A view after a mix of writes: 60 new items, 20 base items replaced, 100 base items and 5
    new ones deleted, 3 new ones replaced, unknown ids deleted. Returns (view, deleted ids, the
    current vector of every live id, the replaced base ids)."""
    xb, xn = _vectors()
    rng = np.random.default_rng(3)
    vec = {i: xb[r] for r, i in enumerate(_base_ids())}
    view = live(_base(metric, backend))
    view = view.upsert(_new_ids(), xn, applied_seq=1)
    vec.update(zip(_new_ids(), xn, strict=True))
    order = rng.permutation(N_BASE)
    replaced = [f"b{r}" for r in order[:20]]
    moved = xb[order[:20]] + rng.standard_normal((20, D)).astype(np.float32) * 2
    view = view.upsert(replaced, moved, applied_seq=2)
    vec.update(zip(replaced, moved, strict=True))
    gone = [f"b{r}" for r in order[20:120]] + ["n0", "n1", "n2", "n3", "n4"]
    view, unknown = view.delete([*gone, "ghost", "also-ghost"], applied_seq=3)
    assert unknown == ["ghost", "also-ghost"]
    again = ["n10", "n11", "n12"]
    moved2 = -xn[10:13]
    view = view.upsert(again, moved2, applied_seq=4)
    vec.update(zip(again, moved2, strict=True))
    for i in gone:
        del vec[i]
    return view, set(gone), vec, replaced


def _queries() -> np.ndarray:
    """Base vectors (some deleted or replaced above), new ones, and unrelated points."""
    xb, xn = _vectors()
    return np.concatenate([xb[::75], xn[::6], clustered(10, D, seed=21)]).astype(np.float32)


def _assert_same_results(got, want, k: int) -> None:
    """Same ids per query (an id may differ only where two items tie at the k-th score) and
    scores within 1e-4 (relative), position by position and id by id."""
    (gs, gi), (ws, wi) = got, want
    for q in range(len(wi)):
        assert len(gi[q]) == len(wi[q]), q
        scale = max(1.0, float(np.abs(ws[q]).max(initial=0.0)))
        tol = 1e-4 * scale
        np.testing.assert_allclose(gs[q], ws[q], rtol=0, atol=tol)
        g, w = dict(zip(gi[q], gs[q], strict=True)), dict(zip(wi[q], ws[q], strict=True))
        for i in g.keys() & w.keys():
            assert abs(g[i] - w[i]) <= tol, (q, i)
        if len(wi[q]) == k:  # only a tie at the cut may swap an item in or out
            for i in g.keys() ^ w.keys():
                s = g.get(i, w.get(i))
                assert abs(s - ws[q][-1]) <= tol, (q, i, s, ws[q][-1])
        else:
            assert g.keys() == w.keys(), q


# -- upsert -------------------------------------------------------------------------------------------


def test_upserted_items_are_found_by_searching_themselves(backend: str, metric: str) -> None:
    """Every new item is among the top 10 for its own vector at nprobe=1 (its cell is the
    query's best cell), the top hit for most of them, scored against its decoded x_hat. For ip
    an item is its own best match only when its norm dominates its neighbours', so the new items
    are given 1.5x the base's scale there."""
    _, xn = _vectors()
    x = xn * (1.5 if metric == "ip" else 1.0)
    view = live(_base(metric, backend)).upsert(_new_ids(), x)
    assert view.n_live == N_BASE + N_NEW and view.delta.n == N_NEW
    assert all(view.contains(i) for i in _new_ids())
    scores, ids = view.search(x, k=10, nprobe=1)
    _no_duplicates(ids)
    q = view.quantizer
    for j, (i, row) in enumerate(zip(_new_ids(), ids, strict=True)):
        assert i in row, (i, row)
        r = view.delta.row[i]
        x_hat = q.decode(view.delta.cells[r : r + 1], view.delta.codes[r : r + 1])[0].double().numpy()
        want = x[j] @ x_hat if metric == "ip" else ((x[j] - x_hat) ** 2).sum()
        assert abs(scores[j][row.index(i)] - want) <= 1e-4 * max(1.0, abs(want)), (i, want)
    top1 = np.mean([row[0] == i for i, row in zip(_new_ids(), ids, strict=True)])
    assert top1 >= 0.8, top1


def test_replacing_a_base_item_moves_it(backend: str, metric: str) -> None:
    """After upserting a base id with a far-away vector, its old vector no longer finds it, the
    new one does, and it appears at most once in any result (the base row is a tombstone)."""
    xb, _ = _vectors()
    base = _base(metric, backend)
    # for ip, an item its own vector finds: the longest one (a longer neighbour would outrank it)
    t = int(np.argmax((xb**2).sum(1))) if metric == "ip" else 7
    old, tid = xb[t], f"b{t}"
    # the new vector: (longer than) the base vector least like the old one
    far = int(np.argmin(xb @ old) if metric == "ip" else np.argmax(((xb - old) ** 2).sum(1)))
    new = xb[far] * 1.5
    _, before = live(base).search(old[None], k=10, nprobe=NLIST)
    assert tid in before[0]

    view = live(base).upsert([tid], new[None])
    assert view.n_dead == 1 and view.delta.n == 1 and view.n_live == N_BASE
    _, from_old = view.search(old[None], k=10, nprobe=NLIST)
    assert tid not in from_old[0]
    _, from_new = view.search(new[None], k=10, nprobe=NLIST)
    assert tid in from_new[0]
    _, every = view.search(np.stack([old, new, xb[100]]), k=N_BASE + 5, nprobe=NLIST)
    _no_duplicates(every)
    for row in every:
        assert row.count(tid) == 1 and len(row) == N_BASE

    # replacing a delta item again keeps one copy of it
    again = view.upsert([tid], old[None])
    assert again.delta.n == 1 and again.n_live == N_BASE
    _, ids = again.search(old[None], k=10, nprobe=NLIST)
    assert tid in ids[0]


# -- delete -------------------------------------------------------------------------------------------


def test_deleted_ids_are_never_returned(backend: str, metric: str) -> None:
    """Deleted ids (base and delta) never appear, not even for their own vectors, at small k and
    nprobe or at k = all items and nprobe = nlist; each query gets min(k, live items in its
    probed cells) hits, so tombstones never take a top-k slot."""
    view, gone, vec, _ = _mixed_view(metric, backend)
    xb, _ = _vectors()
    dead_vectors = xb[[int(i[1:]) for i in sorted(gone) if i.startswith("b")][:20]]
    queries = np.concatenate([dead_vectors, _queries()])
    sizes = view.cell_sizes()
    total = N_BASE + view.delta.n  # every row the view holds, tombstoned ones included
    for k, nprobe in [(1, 1), (5, 1), (10, 2), (40, 4), (total, NLIST)]:
        qs = queries if k < total else queries[::6]  # every row of every cell: a few queries do
        _, ids = view.search(qs, k=k, nprobe=nprobe)
        _no_duplicates(ids)
        assert not gone & set().union(*ids), (k, nprobe)
        probe = view.base.searcher.probe(qs, nprobe)
        want = torch.clamp(sizes[probe].sum(1), max=k).tolist()
        assert [len(r) for r in ids] == want, (k, nprobe)
        if k == total:
            assert all(set(row) == set(vec) and len(row) == view.n_live for row in ids)


def test_delete_reports_unknown_ids(backend: str) -> None:
    """delete returns the ids that were not live (each once, in order); they change nothing."""
    _, xn = _vectors()
    view = live(_base("l2", backend)).upsert(["n0", "n1"], xn[:2])
    view, unknown = view.delete(["b1", "nope", "b1", "n1", "nope", "x", "b2"])
    assert unknown == ["nope", "x"]
    assert not any(view.contains(i) for i in ("b1", "b2", "n1")) and view.contains("n0")
    assert view.n_dead == 2 and view.delta.n == 1 and view.n_live == N_BASE - 2 + 1
    again, unknown = view.delete(["b1", "n1", "n0"])
    assert unknown == ["b1", "n1"] and again.delta.n == 0 and again.n_dead == 2
    same, unknown = again.delete(["ghost"])
    assert unknown == ["ghost"] and same.stats() == again.stats()


# -- search equivalence -------------------------------------------------------------------------------


@pytest.mark.parametrize(("k", "nprobe"), [(10, 1), (10, 4), (50, NLIST)])
def test_search_equals_search_of_the_compacted_index(backend: str, metric: str, k: int, nprobe: int) -> None:
    """After upserts, replacements and deletes, a LiveIndex answers like Index.in_memory of its
    compacted() IVFPQ: same ids per query, scores within 1e-4."""
    view, _, vec, _ = _mixed_view(metric, backend)
    compact = view.compacted()
    assert compact.n == view.n_live and set(compact.ids) == set(vec)
    q = _queries()
    got = view.search(q, k=k, nprobe=nprobe)
    want = Index.in_memory(compact, backend=backend).search(q, k=k, nprobe=nprobe)
    _no_duplicates(got[1])
    _assert_same_results(got, want, k)
    assert sum(len(r) for r in got[1]) > 0


def test_delta_is_scanned_only_in_the_cells_the_base_probed(backend: str, metric: str) -> None:
    """An item upserted into a cell the query's probe skips is not returned at nprobe=1 (even at
    k = every item), but is at nprobe=nlist; one upserted into the probed cell is returned."""
    xb, _ = _vectors()
    ivf = _ivfpq(metric)
    base = _base(metric, backend)
    q = xb[0]
    probed = int(base.searcher.probe(q[None], 1)[0, 0])
    cells = ivf.cells()
    # a vector of another cell's item: the quantizer puts the copy in that cell too
    other = int(str(ivf.ids[next(r for r, c in enumerate(cells.tolist()) if c != probed)])[1:])
    view = live(base).upsert(["elsewhere", "here"], np.stack([xb[other], q]))
    enc = dict(zip(view.delta.ids, view.delta.cells.tolist(), strict=True))
    assert enc["elsewhere"] != probed and enc["here"] == probed

    everything = N_BASE + 2
    _, ids = view.search(q[None], k=everything, nprobe=1)
    assert "here" in ids[0] and "elsewhere" not in ids[0]
    in_cell = {str(i) for i, c in zip(ivf.ids, cells.tolist(), strict=True) if c == probed}
    assert set(ids[0]) == in_cell | {"here"}
    _, ids = view.search(q[None], k=everything, nprobe=NLIST)
    assert {"here", "elsewhere"} <= set(ids[0]) and len(ids[0]) == everything


# -- copy-on-write ------------------------------------------------------------------------------------


def test_a_view_is_unchanged_by_later_writes(backend: str, metric: str) -> None:
    """Copy-on-write: results, stats and membership of a view taken before writes (upserts,
    deletes of base and delta items, replacements) are exactly what they were, also when the
    views are searched in turn (the Faiss searcher caches one tombstone bitmap)."""
    _, xn = _vectors()
    q = _queries()
    v0 = live(_base(metric, backend)).upsert(_new_ids(30), xn[:30])
    v0, _ = v0.delete(["b3"])
    r0, s0 = v0.search(q, k=20, nprobe=4), v0.stats()
    v1, _ = v0.delete(["b5", "b6", "n0", "n1"])
    r1 = v1.search(q, k=20, nprobe=4)
    v2 = v1.upsert(["b8", "n2", "fresh"], xn[40:43])
    v3, _ = v2.delete(["b9", "fresh"])
    for _ in range(2):  # interleaved: no view sees another's tombstones
        for v, r in ((v0, r0), (v1, r1)):
            s, i = v.search(q, k=20, nprobe=4)
            assert i == r[1]
            for a, b in zip(s, r[0], strict=True):
                np.testing.assert_array_equal(a, b)
        v3.search(q, k=20, nprobe=4)
    assert v0.stats() == s0
    assert all(v0.contains(i) for i in ("b5", "b6", "b8", "b9", "n0", "n1"))
    assert not v0.contains("b3") and not v0.contains("fresh")
    assert v1.contains("b9") and not v1.contains("fresh")
    assert (v0.n_dead, v1.n_dead, v2.n_dead, v3.n_dead) == (1, 3, 4, 5)
    assert (v0.delta.n, v1.delta.n, v2.delta.n, v3.delta.n) == (30, 28, 30, 29)


# -- counts -------------------------------------------------------------------------------------------


def test_stats_and_cell_sizes_count_live_items(backend: str) -> None:
    """stats() counts base, deleted, delta and live items; cell_sizes() is the live items per
    cell: base cells of the surviving base rows plus the quantizer's cells of the delta vectors."""
    view, _, vec, replaced = _mixed_view("l2", backend)
    st = view.stats()
    assert st["base_items"] == N_BASE
    assert st["deleted_base_items"] == 100 + 20  # deleted + replaced base rows
    assert st["delta_items"] == N_NEW - 5 + 20
    assert st["live_items"] == len(vec) == N_BASE - 100 + N_NEW - 5
    assert st["applied_seq"] == 4

    ivf = _ivfpq("l2")
    base_cell = dict(zip(ivf.ids, ivf.cells().tolist(), strict=True))
    delta_ids = [i for i in _new_ids() if i in vec] + replaced
    assert sorted(delta_ids) == sorted(view.delta.ids)
    delta_cells, _ = view.quantizer.encode(torch.from_numpy(np.stack([vec[i] for i in delta_ids])))
    cells = [base_cell[i] for i in vec if i not in delta_ids] + delta_cells.tolist()
    want = torch.bincount(torch.tensor(cells), minlength=NLIST)
    assert torch.equal(view.cell_sizes(), want)
    assert torch.equal(view.compacted().list_sizes(), want)
    assert st["cells"]["nlist"] == NLIST and st["cells"]["empty_cells"] == int((want == 0).sum())
    assert st["cells"]["max_over_mean"] == round(float(want.max()) / float(want.double().mean()), 4)
    unchanged = live(_base("l2", backend)).stats()
    assert unchanged["live_items"] == N_BASE and unchanged["delta_items"] == 0
    assert torch.equal(live(_base("l2", backend)).cell_sizes(), ivf.list_sizes())


# -- replay -------------------------------------------------------------------------------------------


def _log(tmp_path: Path, records: Sequence[tuple[str, dict]]) -> list[Entry]:
    """Write records through a real WriteAheadLog and read them back."""
    wal = WriteAheadLog(tmp_path, fsync=False)
    for seq, (op, body) in enumerate(records, start=1):
        _, e = wal.append(op, body, after=seq - 1)
        assert e.seq == seq
    return WriteAheadLog(tmp_path).read_all()


def _items(ids: Sequence[str], x: np.ndarray, texts: Sequence[str | None] | None = None) -> list[dict]:
    out = []
    for j, i in enumerate(ids):
        it = {"id": i, "vector": encode_vector(x[j])}
        if texts is not None and texts[j] is not None:
            it["text"] = texts[j]
        out.append(it)
    return out


def _codes_of(view: LiveIndex, item_id: str) -> tuple[int, torch.Tensor]:
    r = view.delta.row[item_id]
    return int(view.delta.cells[r]), view.delta.codes[r]


def _encoded(view: LiveIndex, x: np.ndarray) -> tuple[int, torch.Tensor]:
    c, j = view.quantizer.encode(torch.from_numpy(np.asarray(x, np.float32)[None]))
    return int(c[0]), j[0]


def _same_code(a: tuple[int, torch.Tensor], b: tuple[int, torch.Tensor]) -> bool:
    return a[0] == b[0] and torch.equal(a[1], b[1])


def _assert_encoded_as(view: LiveIndex, item_id: str, x: np.ndarray) -> None:
    assert _same_code(_codes_of(view, item_id), _encoded(view, x)), item_id


def test_replay_applies_records_in_seq_order_once(tmp_path: Path, backend: str) -> None:
    """Replaying logged records gives the view the same writes in seq order would: a later
    upsert of an id wins, a delete after an upsert removes it, deletes of unknown ids are
    no-ops; applied_seq ends at the last record; replaying again changes nothing."""
    xb, xn = _vectors()
    entries = _log(
        tmp_path,
        [
            ("upsert", {"items": _items(["n0", "n1"], xn[:2])}),
            ("delete", {"ids": ["b5", "ghost"]}),
            ("upsert", {"items": _items(["n0", "b6"], np.stack([xn[5], xb[900]]))}),
            ("delete", {"ids": ["n1", "never-there"]}),
            ("upsert", {"items": []}),
        ],
    )
    assert [e.seq for e in entries] == [1, 2, 3, 4, 5]
    start = live(_base("ip", backend))
    view = replay(start, entries)
    assert view.applied_seq == 5
    assert set(view.delta.ids) == {"n0", "b6"} and view.n_dead == 2  # b5 deleted, b6 replaced
    assert not view.contains("n1") and not view.contains("b5") and not view.contains("ghost")
    _assert_encoded_as(view, "n0", xn[5])  # the later vector
    _assert_encoded_as(view, "b6", xb[900])

    by_hand = start.upsert(["n0", "n1"], xn[:2])
    by_hand, _ = by_hand.delete(["b5", "ghost"])
    by_hand = by_hand.upsert(["n0", "b6"], np.stack([xn[5], xb[900]]))
    by_hand, _ = by_hand.delete(["n1", "never-there"])
    q = _queries()
    assert view.search(q, k=10, nprobe=4)[1] == by_hand.search(q, k=10, nprobe=4)[1]

    again = replay(view, entries)  # everything is <= applied_seq
    assert again.stats() == view.stats() and again.delta.ids == view.delta.ids
    assert start.applied_seq == 0 and not start.changed  # replay built new views


def test_replay_skips_records_at_or_below_applied_seq(tmp_path: Path) -> None:
    """A version that already contains records 1..3 (applied_seq=3) applies only 4 and 5."""
    xb, xn = _vectors()
    entries = _log(
        tmp_path,
        [
            ("upsert", {"items": _items(["n0"], xn[:1])}),
            ("delete", {"ids": ["b5"]}),
            ("upsert", {"items": _items(["n1"], xn[1:2])}),
            ("delete", {"ids": ["b6"]}),
            ("upsert", {"items": _items(["n2", "b7"], np.stack([xn[2], xb[3]]))}),
        ],
    )
    view = replay(live(_base("l2", "torch"), applied_seq=3), entries)
    assert view.applied_seq == 5
    assert view.contains("b5") and not view.contains("n0") and not view.contains("n1")
    assert not view.contains("b6") and set(view.delta.ids) == {"n2", "b7"}
    _assert_encoded_as(view, "b7", xb[3])
    assert replay(live(_base("l2", "torch"), applied_seq=5), entries).changed is False
    # a mark (trim point) only advances the sequence
    marked = replay(view, [Entry(6, "mark", {"op": "mark"})])
    assert marked.applied_seq == 6 and marked.stats()["live_items"] == view.stats()["live_items"]


def test_replay_reencodes_texts_only_for_another_tower(tmp_path: Path) -> None:
    """Logged texts are encoded again with this version's item tower only when the record's
    tower fingerprint differs from this version's; logged vectors without text never are."""
    _, xn = _vectors()
    calls: list[list[str]] = []
    by_text = {"alpha": -xn[20] * 2, "gamma": xn[30] + 3}

    def encode_texts(texts: list[str]) -> np.ndarray:
        calls.append(list(texts))
        return np.stack([by_text[t] for t in texts]).astype(np.float32)

    ids = ["t0", "v1", "t2"]
    entries = _log(
        tmp_path,
        [
            ("upsert", {"items": _items(ids, xn[:3], ["alpha", None, "gamma"]), "tower": "tower-A"}),
            ("upsert", {"items": _items(["v3"], xn[3:4]), "tower": "tower-A"}),
        ],
    )
    base = live(_base("ip", "torch"))
    # the re-encoded vectors get other codes than the logged ones: the checks below can tell them apart
    assert not _same_code(_encoded(base, xn[0]), _encoded(base, by_text["alpha"]))
    assert not _same_code(_encoded(base, xn[2]), _encoded(base, by_text["gamma"]))

    same = replay(base, entries, encode_texts, tower="tower-A")
    assert calls == []
    for i, x in zip(ids, xn[:3], strict=True):
        _assert_encoded_as(same, i, x)

    other = replay(base, entries, encode_texts, tower="tower-B")
    assert calls == [["alpha", "gamma"]]  # once, only the items that came as text
    _assert_encoded_as(other, "t0", by_text["alpha"])
    _assert_encoded_as(other, "v1", xn[1])
    _assert_encoded_as(other, "t2", by_text["gamma"])
    _assert_encoded_as(other, "v3", xn[3])
    assert other.applied_seq == same.applied_seq == 2


def test_replay_of_deletes_of_unknown_ids_is_a_no_op(tmp_path: Path, backend: str) -> None:
    """Deleting ids that are not there changes no item and no result, only applied_seq."""
    entries = _log(tmp_path, [("delete", {"ids": ["ghost", "b99999"]}), ("delete", {"ids": []})])
    start = live(_base("l2", backend))
    view = replay(start, entries)
    assert view.applied_seq == 2 and not view.changed
    assert {k: v for k, v in view.stats().items() if k != "applied_seq"} == {
        k: v for k, v in start.stats().items() if k != "applied_seq"
    }
    q = _queries()
    s1, i1 = view.search(q, k=10, nprobe=4)
    s0, i0 = start.search(q, k=10, nprobe=4)
    assert i1 == i0
    for a, b in zip(s1, s0, strict=True):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("metric", METRICS)
def test_two_tier_delta_across_many_writes_equals_its_compaction(
    backend: str, metric: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With a tiny fresh tier (FRESH_MIN 4), 40 small writes seal the delta several times while
    replacing and deleting items in both tiers: every view searches like its own compaction, and
    the delta's live ids, counts and per-cell sizes follow the writes."""
    import index.live as live_mod

    monkeypatch.setattr(live_mod, "FRESH_MIN", 4)
    rng = np.random.default_rng(5)
    _, xn = _vectors()
    view = live(_base(metric, backend))
    want: dict[str, int] = {}  # live delta id -> row of xn it holds
    sealings = 0
    for step in range(40):
        ids = [f"t{int(j)}" for j in rng.integers(0, 25, 3)]
        ids = list(dict.fromkeys(ids))
        rows = rng.integers(0, len(xn), len(ids))
        before = view.delta.sealed
        view = view.upsert(ids, xn[rows])
        sealings += view.delta.sealed is not before
        want.update(zip(ids, rows.tolist(), strict=True))
        if step % 5 == 4:
            gone = [i for i in list(want)[:2]] + [f"b{step}"]
            view, _ = view.delete(gone)
            for i in gone:
                want.pop(i, None)
        assert set(view.delta.ids) == set(want) and view.delta.n == len(want)
    assert sealings >= 3
    assert int(view.cell_sizes().sum()) == view.n_live
    compact = Index.in_memory(view.compacted(), backend=backend)
    queries = xn[:20]
    _, got = view.search(queries, k=50, nprobe=NLIST)
    _, ref = compact.search(queries, k=50, nprobe=NLIST)
    for g, r in zip(got, ref, strict=True):
        assert g[:40] == r[:40] or sorted(g[:40]) == sorted(r[:40])
    for i, r in want.items():  # every live delta item is found by its own vector, once
        _, hits = view.search(xn[r][None], k=view.n_live, nprobe=NLIST)
        assert hits[0].count(i) == 1
