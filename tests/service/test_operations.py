"""/healthz, /readyz, /info, /metrics (parsed with prometheus-client's own parser), the JSON
access log, a short schemathesis run against the OpenAPI schema, and `jointpq serve` itself."""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.service.conftest import TOKEN, admin, client


def samples(text: str) -> dict[tuple, float]:
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


@pytest.mark.slow  # the demo artifacts
def test_health_info_and_metrics_count_what_was_done(artifact_root, serve, queries):
    s = serve(artifact_root)
    with client(s) as c:
        assert c.get("/healthz").json() == {"status": "ok"}
        assert c.get("/readyz").json() == {"status": "ready", "version": "text-v1"}
        info = c.get("/info").json()
        art = info["artifact"]
        assert art["version"] == "text-v1" and art["dim"] == 64 and art["nlist"] == 32 and art["M"] == 16
        assert art["mode"] == "poeem" and art["encoder"]["kind"] == "hashed" and art["device"] == "cpu"
        assert info["uptime_s"] >= 0 and info["settings"]["admin"] is True
        assert "admin_token" not in json.dumps(info) and TOKEN not in json.dumps(info)
        for q in queries[:5]:
            assert c.post("/search", json={"query": q}).status_code == 200
        assert c.post("/search", json={"queries": queries[:3]}).status_code == 200
        assert c.post("/search", json={"query": ""}).status_code == 400
        assert c.post("/admin/reload", json={"version": "text-v2"}, headers=admin()).status_code == 200
        assert c.post("/admin/reload", json={"version": "nope"}, headers=admin()).status_code == 404
        m = samples(c.get("/metrics").text)
    assert m[("jointpq_http_requests_total", (("method", "POST"), ("route", "/search"), ("status", "200")))] == 6
    assert m[("jointpq_http_requests_total", (("method", "POST"), ("route", "/search"), ("status", "400")))] == 1
    assert m[("jointpq_queries_total", (("kind", "text"),))] == 8
    assert m[("jointpq_reloads_total", (("result", "ok"),))] == 2  # startup + admin
    assert m[("jointpq_reloads_total", (("result", "refused"),))] == 1
    assert m[("jointpq_artifact_info", (("version", "text-v2"),))] == 1
    assert m[("jointpq_ready", ())] == 1
    assert m[("jointpq_http_request_duration_seconds_count", (("route", "/search"),))] == 7
    assert m[("jointpq_batch_queries_sum", ())] == 8
    assert m[("jointpq_search_duration_seconds_count", ())] >= 1


@pytest.mark.slow  # the demo artifacts
def test_one_json_access_line_per_request(artifact_root, serve, caplog):
    from service.logs import JsonFormatter

    caplog.set_level(logging.INFO, logger="jointpq.access")  # for the whole test: the line is
    s = serve(artifact_root)  # written after the response is sent, maybe after the client is done
    with client(s) as c:
        r = c.post("/search", json={"query": "x", "k": 0})
    rid = r.headers["x-request-id"]
    deadline = time.monotonic() + 5
    while True:
        recs = [rec for rec in caplog.records if rec.name == "jointpq.access" and rec.request_id == rid]
        if recs or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert len(recs) == 1
    line = json.loads(JsonFormatter().format(recs[0]))
    assert line["status"] == 422 and line["path"] == "/search" and line["method"] == "POST"
    assert line["latency_ms"] > 0 and line["request_id"] == r.headers["x-request-id"]


def _jointpq_serve(root, port, *extra):
    exe = shutil.which("jointpq")
    cmd = [exe] if exe else [sys.executable, "-m", "service.cli"]
    env = {**os.environ, "JOINTPQ_ADMIN_TOKEN": TOKEN}
    args = ["serve", "--artifact-root", str(root), "--port", str(port), "--device", "cpu", *extra]
    return subprocess.Popen([*cmd, *args], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.mark.slow  # `jointpq serve --workers 2` on the demo artifacts
def test_jointpq_serve_command(artifact_root, queries):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    proc = _jointpq_serve(artifact_root, port, "--workers", "2")
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read() if proc.poll() else ""
            time.sleep(0.2)
        r = httpx.post(f"http://127.0.0.1:{port}/search", json={"query": queries[0], "k": 3}, timeout=30)
        assert r.status_code == 200 and len(r.json()["results"][0]["ids"]) == 3
    finally:
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=30)
    logs = [json.loads(line) for line in err.splitlines() if line.startswith("{")]
    assert any(e.get("path") == "/search" and e.get("status") == 200 for e in logs), err[-2000:]


def test_serve_rejects_bad_settings(tmp_path):
    exe = shutil.which("jointpq")
    cmd = [exe] if exe else [sys.executable, "-m", "service.cli"]
    env = {**os.environ, "JOINTPQ_DEFAULT_K": "5000"}
    r = subprocess.run([*cmd, "serve", "--artifact-root", str(tmp_path)], env=env, capture_output=True, text=True)
    assert r.returncode == 2, r.stderr
    assert r.stderr.strip() == "error: JOINTPQ_DEFAULT_K (5000) exceeds JOINTPQ_MAX_K (1000)"
