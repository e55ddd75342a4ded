"""Live items over real HTTP: POST /admin/items (upsert by vector or text), /admin/items/delete and
/admin/compact on small artifacts built here (seconds), served by uvicorn on loopback.

What is checked: a 200 means the next search sees the write (read-your-writes), a replaced id is
returned once, deleted ids never come back at any k or nprobe, every bad batch is a 4xx naming
its field and applies nothing, admin auth guards the three routes, concurrent searches never see
half a batch, /info and /metrics report the live state, and compaction under load keeps every
answer while it folds the log into a new published version."""

from __future__ import annotations

import asyncio
import json
import shutil
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families

from index.wal import WAL, scan
from tests.conftest import clustered
from tests.service.conftest import TOKEN, Server, admin, client

D, N, NLIST = 24, 1000, 16  # the vector artifact: 1000 items of 24 dims, l2, 16 cells
TEXT_N, TEXT_NLIST = 400, 8  # the text artifact: 400 hashed-encoder items of 32 dims, ip
MAX_K = 4096  # above every item count here, so "k = all items" is a legal request


# -- artifacts --------------------------------------------------------------------------------------
def base_vectors() -> np.ndarray:
    """The vector artifact's items, row i is id f"v{i}" (seeded: the same in every process)."""
    return clustered(N, D, seed=3)


def new_vectors(n: int, seed: int) -> np.ndarray:
    """Fresh item vectors: standard normal, away from the clustered base (each is its own top-1)."""
    return np.random.default_rng(seed).standard_normal((n, D)).astype(np.float32)


def build_vector_artifact(root: Path, version: str = "vec-v1") -> Path:
    """`root/version`: an l2 IVF-PQ over `base_vectors()` with a drift baseline, CURRENT at it."""
    from index import build_ivfpq, write_artifact
    from index.drift import baseline
    from index.pointer import publish

    x = base_vectors()
    ids = [f"v{i}" for i in range(N)]
    index = build_ivfpq(x, nlist=NLIST, M=8, metric="l2", ids=ids, niter=8, seed=0)
    write_artifact(root / version, index, training={"drift_baseline": baseline(index, torch.from_numpy(x), ids)})
    publish(root, version)
    return root / version


WORDS = ("protein", "cell", "gene", "tumor", "vitamin", "bone", "density", "receptor", "enzyme", "virus")


def build_text_artifact(root: Path, version: str = "text-v1") -> Path:
    """`root/version`: a hashed n-gram encoder (untrained, seeded) as both query and item tower
    (item_encoder/tower.json "shared", written by `model.towers.tower_files`), its items the
    encoder's embeddings of generated sentences. Does not move CURRENT."""
    from index import build_ivfpq, write_artifact
    from model.encoders import HashedNgramEncoder
    from model.towers import tower_files

    torch.manual_seed(0)
    enc = HashedNgramEncoder(dim=32, buckets=1 << 12, hidden=64, emb=32).eval()
    for layer in (enc.mlp[0], enc.mlp[2]):  # untrained: random biases would dominate (all texts alike)
        torch.nn.init.zeros_(layer.bias)
    rng = np.random.default_rng(1)
    texts = [" ".join(rng.choice(WORDS, 6)) + f" study {i}" for i in range(TEXT_N)]
    x = enc.encode(texts).numpy()
    files, tower = tower_files(enc, enc)
    index = build_ivfpq(x, nlist=TEXT_NLIST, M=8, ids=[f"t{i}" for i in range(TEXT_N)], niter=8, seed=0)
    write_artifact(root / version, index, training={"item_encoder": tower}, extra_files=files)
    return root / version


@pytest.fixture(scope="session")
def items_template(tmp_path_factory) -> Path:
    """A root with `vec-v1` (CURRENT), `text-v1` and `text-v1b` (the same model and items under
    another version name), no item log; copied per test (writes persist in the root)."""
    root = tmp_path_factory.mktemp("items-root")
    build_vector_artifact(root)
    build_text_artifact(root)
    build_text_artifact(root, "text-v1b")
    return root


@pytest.fixture
def root(items_template, tmp_path) -> Path:
    dst = tmp_path / "root"
    shutil.copytree(items_template, dst)
    return dst


# -- helpers ----------------------------------------------------------------------------------------
def live(c: httpx.Client) -> dict:
    return c.get("/info").json()["artifact"]["live"]


def upsert(c: httpx.Client, items: list[dict]) -> dict:
    r = c.post("/admin/items", json={"items": items}, headers=admin())
    assert r.status_code == 200, r.text
    return r.json()


def vec_items(ids: list[str], x: np.ndarray) -> list[dict]:
    return [{"id": i, "vector": v.tolist()} for i, v in zip(ids, x, strict=True)]


def search_ids(c: httpx.Client, x: np.ndarray, k: int = 10, nprobe: int = NLIST) -> list[list[str]]:
    r = c.post("/search", json={"vectors": np.asarray(x).tolist(), "k": k, "nprobe": nprobe})
    assert r.status_code == 200, r.text
    return [res["ids"] for res in r.json()["results"]]


def metric_values(text: str) -> dict[str, float]:
    return {s.name: s.value for fam in text_string_to_metric_families(text) for s in fam.samples if not s.labels}


# -- writes are searchable once answered -------------------------------------------------------------
def test_upsert_by_vector_is_top1_right_after_the_200(root, serve):
    s = serve(root, max_k=MAX_K)
    x = new_vectors(6, seed=10)
    with client(s) as c:
        assert live(c)["applied_seq"] == 0
        for n, (a, b) in enumerate(((0, 1), (1, 4), (4, 6)), start=1):  # batches of 1, 3 and 2 items
            ids = [f"new-{i}" for i in range(a, b)]
            out = upsert(c, vec_items(ids, x[a:b]))
            assert out == {"upserted": b - a, "seq": n, "version": "vec-v1", "items": N + b}
            assert [hits[0] for hits in search_ids(c, x[a:b])] == ids  # read-your-writes
        assert [hits[0] for hits in search_ids(c, x, nprobe=1)] == [f"new-{i}" for i in range(6)]
        st = live(c)
        assert st["delta_items"] == 6 and st["live_items"] == N + 6 and st["applied_seq"] == 3


def test_upsert_by_text_is_found_by_that_text(root, serve):
    assert (root / "text-v1" / "item_encoder" / "tower.json").is_file()
    s = serve(root, artifact="text-v1", max_k=MAX_K)
    texts = [
        "zebra migration across the serengeti grasslands in the dry season",
        "quantum error correction with surface codes on superconducting qubits",
    ]
    with client(s) as c:
        assert c.get("/info").json()["artifact"]["item_tower"] == "shared"
        before = c.post("/search", json={"queries": texts, "k": 10}).json()["results"]
        assert all(not any(i.startswith("note-") for i in r["ids"]) for r in before)
        out = upsert(c, [{"id": f"note-{i}", "text": t} for i, t in enumerate(texts)])
        assert out["upserted"] == 2 and out["items"] == TEXT_N + 2
        r = c.post("/search", json={"queries": texts, "k": 10})
        assert r.status_code == 200, r.text
        for i, res in enumerate(r.json()["results"]):
            assert f"note-{i}" in res["ids"], res


def test_text_upsert_needs_an_item_tower(root, serve):
    s = serve(root)  # vec-v1: written with no encoder at all
    with client(s) as c:
        r = c.post(
            "/admin/items",
            json={"items": [{"id": "ok", "vector": [0.0] * D}, {"id": "t", "text": "hello"}]},
            headers=admin(),
        )
        assert r.status_code == 422, r.text
        assert [d["field"] for d in r.json()["detail"]] == ["items[1].text"]
        assert "no item tower" in r.json()["error"]
        assert live(c)["applied_seq"] == 0 and live(c)["live_items"] == N
    assert not (root / WAL).exists()


def test_replacing_a_base_id_returns_it_once_at_its_new_place(root, serve):
    s = serve(root, max_k=MAX_K)
    x = base_vectors()
    new = new_vectors(1, seed=20)
    with client(s) as c:
        assert search_ids(c, x[5:6], k=1) == [["v5"]]
        out = upsert(c, vec_items(["v5"], new))
        assert out["items"] == N  # replaced, not added
        for q in (new, x[5:6]):
            hits = search_ids(c, q, k=N)[0]
            assert len(hits) == N and len(set(hits)) == N
            assert hits.count("v5") == 1
        assert search_ids(c, new, k=1) == [["v5"]]
        assert search_ids(c, x[5:6], k=1) != [["v5"]]  # its old place is empty
        st = live(c)
        assert st["deleted_base_items"] == 1 and st["delta_items"] == 1 and st["live_items"] == N


def test_deleted_ids_never_come_back(root, serve):
    s = serve(root, max_k=MAX_K)
    x = base_vectors()
    added = new_vectors(2, seed=30)
    with client(s) as c:
        upsert(c, vec_items(["d-new", "kept-new"], added))
        r = c.post("/admin/items/delete", json={"ids": ["v1", "v2", "nope-1", "v2", "d-new", "v3"]}, headers=admin())
        assert r.status_code == 200, r.text
        out = r.json()
        assert out["deleted"] == 4 and out["unknown"] == ["nope-1"] and out["items"] == N + 2 - 4
        assert out["seq"] == 2
        gone = {"v1", "v2", "v3", "d-new"}
        queries = np.concatenate([x[1:4], added, x[:1]])
        for nprobe in (1, NLIST):
            for hits in search_ids(c, queries, k=MAX_K, nprobe=nprobe):
                assert not gone & set(hits)
                if nprobe == NLIST:
                    assert len(hits) == N - 2  # every live item, once
        assert search_ids(c, added[1:], k=1) == [["kept-new"]]
        r = c.post("/admin/items/delete", json={"ids": ["v1"]}, headers=admin())
        assert r.json()["deleted"] == 0 and r.json()["unknown"] == ["v1"]
        st = live(c)
        assert st["deleted_base_items"] == 3 and st["delta_items"] == 1 and st["live_items"] == N - 2


# -- bad input: a 4xx naming the field, nothing applied ----------------------------------------------
V = [0.5] * D
RAW_NAN = b'{"items": [{"id": "a", "vector": [NaN' + b", 0.1" * (D - 1) + b"]}]}"
RAW_INF = b'{"items": [{"id": "a", "vector": [0.1' + b", 0.1" * (D - 2) + b", -Infinity]}]}"
JSON = {"content-type": "application/json"}
BAD = [  # (name, route, body (dict or raw bytes), headers, status, field the detail must name)
    ("empty id", "/admin/items", {"items": [{"id": "", "vector": V}]}, None, 422, "items[0].id"),
    ("id too long", "/admin/items", {"items": [{"id": "x" * 17, "vector": V}]}, None, 422, "items[0].id"),
    ("text too long", "/admin/items", {"items": [{"id": "a", "text": "t" * 65}]}, None, 422, "items[0].text"),
    ("text and vector", "/admin/items", {"items": [{"id": "a", "vector": V, "text": "t"}]}, None, 422, "items[0]"),
    ("neither", "/admin/items", {"items": [{"id": "ok", "vector": V}, {"id": "a"}]}, None, 422, "items[1]"),
    ("wrong dim", "/admin/items", {"items": [{"id": "ok", "vector": V}, {"id": "a", "vector": V[:5]}]}, None,
     422, "items[1].vector"),
    ("NaN", "/admin/items", RAW_NAN, JSON, 422, "items[0].vector[0]"),
    ("Infinity", "/admin/items", RAW_INF, JSON, 422, f"items[0].vector[{D - 1}]"),
    ("norm too large", "/admin/items", {"items": [{"id": "a", "vector": [1e16] * D}]}, None, 422, "items[0].vector"),
    ("text to a vector-only artifact", "/admin/items", {"items": [{"id": "ok", "vector": V}, {"id": "a", "text": "t"}]},
     None, 422, "items[1].text"),
    ("duplicate ids", "/admin/items", {"items": [{"id": "a", "vector": V}, {"id": "a", "vector": V}]}, None,
     422, "items[1].id"),
    ("over max_batch", "/admin/items", {"items": [{"id": f"a{i}", "vector": V} for i in range(5)]}, None,
     413, "items"),
    ("not JSON", "/admin/items", json.dumps({"items": [{"id": "a", "vector": V}]}).encode(),
     {"content-type": "text/plain"}, 415, "content-type"),
    ("no content type", "/admin/items", json.dumps({"items": [{"id": "a", "vector": V}]}).encode(), {},
     415, "content-type"),
    ("extra item field", "/admin/items", {"items": [{"id": "a", "vector": V, "score": 1}]}, None, 422,
     "items[0].score"),
    ("extra body field", "/admin/items", {"items": [{"id": "a", "vector": V}], "mode": "x"}, None, 422, "mode"),
    ("empty items", "/admin/items", {"items": []}, None, 422, "items"),
    ("id not a string", "/admin/items", {"items": [{"id": 7, "vector": V}]}, None, 422, "items[0].id"),
    ("broken JSON", "/admin/items", b'{"items": [', JSON, 422, "body"),
    ("delete empty ids", "/admin/items/delete", {"ids": []}, None, 422, "ids"),
    ("delete empty id", "/admin/items/delete", {"ids": ["v1", ""]}, None, 422, "ids[1]"),
    ("delete over max_batch", "/admin/items/delete", {"ids": [f"v{i}" for i in range(5)]}, None, 413, "ids"),
    ("delete not JSON", "/admin/items/delete", b'{"ids": ["v1"]}', {"content-type": "text/plain"}, 415,
     "content-type"),
]  # fmt: skip


@pytest.fixture(scope="module")
def strict_server(items_template, tmp_path_factory):
    """vec-v1 with small limits (4 items a batch, 16-char ids, 64-char texts); no test writes to it."""
    from service.settings import Settings

    root = tmp_path_factory.mktemp("strict") / "root"
    shutil.copytree(items_template, root)
    settings = Settings(
        artifact_root=root, device="cpu", admin_token=TOKEN, max_batch=4, max_id_chars=16, max_item_chars=64
    )
    with Server(settings) as s:
        yield s, root


@pytest.mark.parametrize(("name", "route", "body", "headers", "status", "field"), BAD, ids=[b[0] for b in BAD])
def test_bad_batch_is_refused_whole(strict_server, name, route, body, headers, status, field):
    s, root = strict_server
    with client(s) as c:
        before = live(c)
        kw = {"json": body} if isinstance(body, dict) else {"content": body}
        r = c.post(route, **kw, headers={**admin(), **(headers or {})})
        assert r.status_code == status, r.text
        out = r.json()
        assert field in [d["field"] for d in out["detail"]], out
        assert out["error"] and "Traceback" not in r.text
        assert live(c) == before
        assert before["applied_seq"] == 0 and before["live_items"] == N
        assert c.get("/readyz").status_code == 200
    assert not (root / WAL).exists()  # nothing was logged either


def test_unreadable_log_is_503_and_applies_nothing(root, serve):
    s = serve(root)
    (root / WAL).mkdir()  # the log cannot be read (nor written)
    with client(s) as c:
        for route, body in (
            ("/admin/items", {"items": [{"id": "a", "vector": V}]}),
            ("/admin/items/delete", {"ids": ["v1"]}),
        ):
            r = c.post(route, json=body, headers=admin())
            assert r.status_code == 503, r.text
            assert "not applied" in r.json()["error"] and WAL in r.json()["error"]
        assert live(c)["applied_seq"] == 0 and live(c)["live_items"] == N
        assert search_ids(c, base_vectors()[1:2], k=1) == [["v1"]]


# -- admin auth on the three routes ------------------------------------------------------------------
ROUTES = [
    ("/admin/items", {"items": [{"id": "auth", "vector": V}]}),
    ("/admin/items/delete", {"ids": ["v1"]}),
    ("/admin/compact", None),
]


def test_admin_auth_on_every_item_route(root, serve):
    on = serve(root)
    off = serve(root, admin_token=None)
    with client(on) as c, client(off) as c_off:
        for route, body in ROUTES:
            r = c.post(route, json=body)
            assert r.status_code == 401, (route, r.text)
            assert r.headers["www-authenticate"] == "Bearer" and "token required" in r.json()["error"]
            r = c.post(route, json=body, headers=admin("wrong-token-0000"))
            assert r.status_code == 403 and "wrong admin token" in r.json()["error"], (route, r.text)
            r = c.post(route, json=body, headers={"Authorization": f"Basic {TOKEN}"})
            assert r.status_code == 401, (route, r.text)
            r = c_off.post(route, json=body, headers=admin())
            assert r.status_code == 404 and "disabled" in r.json()["error"], (route, r.text)
        for cl in (c, c_off):
            st = cl.get("/info").json()["artifact"]
            assert st["version"] == "vec-v1" and st["live"]["applied_seq"] == 0 and st["live"]["live_items"] == N
    assert not (root / WAL).exists() and (root / "CURRENT").read_text().strip() == "vec-v1"


# -- concurrency: no torn batch, no 5xx --------------------------------------------------------------
def test_concurrent_searches_never_see_half_a_batch(root, serve):
    """50 batches of 5 items sharing one vector each, 200 searches for those vectors meanwhile: a
    search sees all 5 ids of a batch or none, and all 5 once the batch's 200 came back."""
    s = serve(root, max_k=MAX_K)
    nb, per = 50, 5
    x = new_vectors(nb, seed=40)
    batch_ids = [[f"b{b}-{j}" for j in range(per)] for b in range(nb)]
    acked: set[int] = set()

    async def run():
        async with httpx.AsyncClient(base_url=s.url, timeout=120) as c:

            async def write(b: int):
                await asyncio.sleep(b * 0.01)
                items = [{"id": i, "vector": x[b].tolist()} for i in batch_ids[b]]
                r = await c.post("/admin/items", json={"items": items}, headers=admin())
                if r.status_code == 200:
                    acked.add(b)
                return r

            async def read(i: int):
                await asyncio.sleep(i * 0.0035)
                b = (i * 7) % nb
                seen_acked = b in acked
                r = await c.post("/search", json={"vector": x[b].tolist(), "k": 10, "nprobe": NLIST})
                return b, seen_acked, r

            return await asyncio.gather(
                asyncio.gather(*(write(b) for b in range(nb))), asyncio.gather(*(read(i) for i in range(200)))
            )

    writes, reads = asyncio.run(run())
    assert [r.status_code for r in writes] == [200] * nb, [r.text for r in writes if r.status_code != 200][:3]
    assert sorted(r.json()["seq"] for r in writes) == list(range(1, nb + 1))
    assert all(r.status_code == 200 for _, _, r in reads), [r.text for _, _, r in reads if r.status_code != 200][:3]
    whole = 0
    for b, was_acked, r in reads:
        hits = set(r.json()["results"][0]["ids"])
        got = hits & set(batch_ids[b])
        assert got in (set(), set(batch_ids[b])), (b, sorted(got))
        if was_acked:
            assert got == set(batch_ids[b]), b  # answered before the search was sent: seen
        whole += bool(got)
    assert 0 < whole < len(reads)  # the searches overlapped the writes: some before a batch, some after
    with client(s) as c:
        for b, hits in enumerate(search_ids(c, x)):
            assert set(hits[:per]) == set(batch_ids[b])
        assert live(c)["live_items"] == N + nb * per


# -- /info and /metrics ------------------------------------------------------------------------------
def test_info_and_metrics_report_live_state_and_drift(root, serve):
    s = serve(root)
    x = new_vectors(4, seed=50)
    with client(s) as c:
        upsert(c, vec_items([f"m{i}" for i in range(4)], x))
        r = c.post("/admin/items/delete", json={"ids": ["v7", "m0"]}, headers=admin())
        assert r.status_code == 200
        art = c.get("/info").json()["artifact"]
        m = metric_values(c.get("/metrics").text)
    st = art["live"]
    assert st["base_items"] == N and st["deleted_base_items"] == 1 and st["delta_items"] == 3
    assert st["live_items"] == N + 2 and st["applied_seq"] == 2 and st["updates"] == 2
    assert st["cells"]["nlist"] == NLIST and art["n_items"] == N + 2
    drift = art["drift"]
    assert drift["trained"]["items"] == N and drift["trained"]["distortion_mean"] > 0
    assert drift["new_items"]["items"] == 3 and drift["new_items"]["distortion_mean"] > 0
    ratio = drift["new_items"]["distortion_mean"] / drift["trained"]["distortion_mean"]
    assert drift["distortion_ratio"] == pytest.approx(ratio, rel=1e-3)
    assert m["jointpq_live_items"] == N + 2
    assert m["jointpq_delta_items"] == 3
    assert m["jointpq_deleted_base_items"] == 1
    assert m["jointpq_applied_seq"] == 2
    assert m["jointpq_drift_distortion_ratio"] == pytest.approx(drift["distortion_ratio"])


# -- compaction under load ---------------------------------------------------------------------------
def test_compaction_under_load_keeps_every_answer(root, serve):
    s = serve(root, max_k=MAX_K)
    x = base_vectors()
    added = new_vectors(12, seed=60)
    with client(s) as c:
        upsert(c, vec_items([f"c{i}" for i in range(6)], added[:6]))
        upsert(c, vec_items([f"c{i}" for i in range(6, 12)] + ["v10"], np.concatenate([added[6:], added[:1] + 3])))
        r = c.post("/admin/items/delete", json={"ids": ["v11", "v12", "v13", "c5"]}, headers=admin())
        assert r.status_code == 200
        seq = r.json()["seq"]
        assert seq == 3
        queries = np.concatenate([added, x[8:16]])  # new, replaced, deleted and untouched items' vectors
        before = search_ids(c, queries)
        items_before = live(c)["live_items"]
    assert items_before == N + 11 - 3

    async def run():
        async with httpx.AsyncClient(base_url=s.url, timeout=120) as c:
            done = asyncio.Event()

            async def load(w: int) -> list[tuple[int, httpx.Response]]:
                out: list[tuple[int, httpx.Response]] = []

                async def one() -> None:
                    q = (w + len(out)) % len(queries)
                    body = {"vector": queries[q].tolist(), "k": 10, "nprobe": NLIST}
                    out.append((q, await c.post("/search", json=body)))

                while not done.is_set():  # before, during and right after the compaction
                    await one()
                for _ in range(3):
                    await one()
                return out

            async def compact() -> httpx.Response:
                await asyncio.sleep(0.05)
                try:
                    return await c.post("/admin/compact", headers=admin())
                finally:
                    done.set()

            return await asyncio.gather(compact(), *(load(w) for w in range(8)))

    r, *loads = asyncio.run(run())
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["compacted"] is True and out["version"] == f"vec-v1-c{seq}" and out["previous"] == "vec-v1"
    assert out["applied_seq"] == seq and out["log_records_kept"] == 0
    responses = [qr for rs in loads for qr in rs]
    assert [resp.status_code for _, resp in responses] == [200] * len(responses)
    assert {resp.json()["version"] for _, resp in responses} == {"vec-v1", f"vec-v1-c{seq}"}  # both served
    for q, resp in responses:  # every answer, from either version, is the same
        assert resp.json()["results"][0]["ids"] == before[q], (q, resp.json()["version"])
    with client(s) as c:
        assert search_ids(c, queries) == before
        art = c.get("/info").json()["artifact"]
        assert art["version"] == f"vec-v1-c{seq}"
        assert art["live"] | {"cells": None, "updates": None} == {
            "base_items": items_before, "deleted_base_items": 0, "delta_items": 0, "live_items": items_before,
            "applied_seq": seq, "cells": None, "updates": None,
        }  # fmt: skip
        assert art["compacted"]["parent"] == "vec-v1" and art["compacted"]["items"] == items_before
        r = c.post("/admin/compact", headers=admin())  # nothing new: nothing to do
        assert r.status_code == 200 and r.json()["compacted"] is False
        assert r.json()["version"] == f"vec-v1-c{seq}"
    assert (root / "CURRENT").read_text().strip() == f"vec-v1-c{seq}"
    assert (root / f"vec-v1-c{seq}" / "manifest.json").is_file()
    records = scan((root / WAL).read_bytes()).entries
    assert [(e.seq, e.op) for e in records] == [(seq, "mark")]


def test_writes_during_compaction_are_kept(root, serve):
    """Upserts racing a compaction land either in the folded version or in the kept log tail:
    after it, every acknowledged id is searchable, and the log holds only what came after."""
    s = serve(root, max_k=MAX_K)
    x = new_vectors(60, seed=70)
    with client(s) as c:
        upsert(c, vec_items(["pre"], x[:1]))

    async def run():
        async with httpx.AsyncClient(base_url=s.url, timeout=120) as c:

            async def write(i: int) -> httpx.Response:
                await asyncio.sleep(i * 0.005)
                return await c.post("/admin/items", json={"items": vec_items([f"w{i}"], x[i : i + 1])}, headers=admin())

            async def compact() -> httpx.Response:
                await asyncio.sleep(0.08)
                return await c.post("/admin/compact", headers=admin())

            return await asyncio.gather(compact(), *(write(i) for i in range(1, 60)))

    r, *writes = asyncio.run(run())
    assert r.status_code == 200 and r.json()["compacted"] is True, r.text
    assert [w.status_code for w in writes] == [200] * len(writes)
    folded = r.json()["applied_seq"]
    assert 1 <= folded < 60  # some writes were folded, some came after the view was taken
    want = ["pre"] + [f"w{i}" for i in range(1, 60)]
    with client(s) as c:
        # one more write, then everything is checked
        upsert(c, vec_items(["post"], new_vectors(1, seed=71)))
        assert [h[0] for h in search_ids(c, x)] == want
        assert live(c)["live_items"] == N + 61
    kept = scan((root / WAL).read_bytes()).entries
    assert kept[0].op == "mark" and kept[0].seq == folded
    assert [e.seq for e in kept[1:]] == list(range(folded + 1, 62))  # the tail after the fold, all of it
    fresh = serve(root, max_k=MAX_K)  # a new process's view: CURRENT (the folded version) + the kept tail
    with client(fresh) as c:
        assert c.get("/info").json()["artifact"]["version"] == f"vec-v1-c{folded}"
        assert [h[0] for h in search_ids(c, x)] == want
        assert live(c)["live_items"] == N + 61 and live(c)["applied_seq"] == 61


# -- found bugs --------------------------------------------------------------------------------------
def test_a_worker_behind_a_compaction_catches_up_before_it_writes(root, serve):
    """Two workers (two apps on one root, as `--workers 2`): A upserts X and compacts, usually
    before B read X from the log. B must not write past that gap (503, retry) and must end up
    serving X (from the compacted version CURRENT names) and its own write Z."""
    a = serve(root, watch_interval_s=600)
    b = serve(root, watch_interval_s=0.5)
    x = new_vectors(2, seed=80)
    with client(a) as ca, client(b) as cb:
        upsert(ca, vec_items(["x-on-a"], x[:1]))
        r = ca.post("/admin/compact", headers=admin())
        assert r.status_code == 200 and r.json()["version"] == "vec-v1-c1", r.text
        deadline = time.monotonic() + 30
        while True:
            r = cb.post("/admin/items", json={"items": vec_items(["z-on-b"], x[1:])}, headers=admin())
            if r.status_code == 200 or time.monotonic() > deadline:
                break
            assert r.status_code == 503 and "retry" in r.json()["error"], r.text
            time.sleep(0.1)
        assert r.status_code == 200 and r.json()["seq"] == 2, r.text
        assert search_ids(cb, x, k=1) == [["x-on-a"], ["z-on-b"]]
        assert live(cb)["live_items"] == N + 2 and live(cb)["applied_seq"] == 2
        upsert(ca, vec_items(["y-on-a"], new_vectors(1, seed=81)))  # A catches up at its own write
        assert search_ids(ca, x, k=1) == [["x-on-a"], ["z-on-b"]]


def test_a_log_that_cannot_be_written_is_503(root, serve):
    s = serve(root)
    (root / "items.wal.lock").mkdir()  # the log's lock file cannot be opened: no write can be logged
    with client(s) as c:
        r = c.post("/admin/items", json={"items": [{"id": "a", "vector": V}]}, headers=admin())
        if r.status_code == 200 or live(c)["applied_seq"] != 0:
            pytest.fail(f"setup: the write went through: {r.text}")
        assert r.status_code == 503 and "not applied" in r.json()["error"], r.text


def test_a_write_racing_a_reload_is_seen_by_the_next_search(root, serve):
    """An upsert whose texts take seconds to encode (the item tower runs in the engine's thread,
    after the route took `holder.current`) while POST /admin/reload swaps in `text-v1b` (the same
    model and items): its 200 must still mean the next search sees it."""
    s = serve(
        root, artifact="text-v1", watch_interval_s=600, max_item_chars=8_000_000, max_body_bytes=64 << 20,
        max_k=MAX_K,
    )  # fmt: skip
    words = " ".join(f"w{j}" for j in np.random.default_rng(90).integers(0, 10**6, 300_000))
    big = [f"doc{i} {words}" for i in range(8)]  # 2.4 MB each: most of a second of n-gram hashing each
    probe = np.random.default_rng(91).standard_normal(32).astype(np.float32)
    items = [{"id": "probe", "vector": probe.tolist()}] + [{"id": f"big{i}", "text": t} for i, t in enumerate(big)]

    async def run():
        async with httpx.AsyncClient(base_url=s.url, timeout=300) as c:
            up = asyncio.create_task(c.post("/admin/items", json={"items": items}, headers=admin()))
            await asyncio.sleep(0.5)  # the upsert is in its encoding by now (it takes seconds)
            if up.done():
                pytest.skip(f"could not set up the race: the upsert was answered first ({up.result().text[:100]})")
            rel = await c.post("/admin/reload", json={"version": "text-v1b"}, headers=admin())
            if up.done():
                pytest.skip("could not set up the race: the upsert was answered before the reload")
            w = await up
            found = await c.post("/search", json={"vector": probe.tolist(), "k": 1, "nprobe": TEXT_NLIST})
            return rel, w, found

    rel, w, found = asyncio.run(run())
    if rel.status_code != 200 or w.status_code != 200:
        pytest.fail(f"setup: reload {rel.text[:200]} upsert {w.text[:200]}")
    assert w.json()["version"] == "text-v1b"  # applied to the artifact served when it was logged
    assert found.json()["version"] == "text-v1b"
    assert found.json()["results"][0]["ids"] == ["probe"]  # acknowledged, so it must be seen
