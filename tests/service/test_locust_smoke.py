"""CI's load-test smoke run: locust headless for ~8 s against a real server with the project's
locustfile (text, batch, vector and invalid requests): zero unexpected failures."""

from __future__ import annotations

import csv
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT


@pytest.mark.slow  # locust for ~8 s, on the demo artifacts
def test_locust_headless_smoke(artifact_root, serve, tmp_path):
    exe = shutil.which("locust") or str(Path(sys.executable).parent / "locust")
    if not Path(exe).exists():
        pytest.skip("locust is not installed (dev extra)")
    srv = serve(artifact_root)
    cmd = [
        exe, "-f", str(ROOT / "loadtest" / "locustfile.py"), "--headless", "--only-summary", "-u", "8", "-r", "8",
        "-t", "8s", "--host", srv.url, "--csv", str(tmp_path / "smoke"), "--stop-timeout", "5",
    ]  # fmt: skip
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    with open(tmp_path / "smoke_stats.csv", newline="") as f:
        stats = {r["Name"]: r for r in csv.DictReader(f)}
    assert int(stats["Aggregated"]["Request Count"]) > 50, out.stderr[-2000:]
    assert int(stats["Aggregated"]["Failure Count"]) == 0, (tmp_path / "smoke_failures.csv").read_text()
    for name in ("/search text", "/search vector", "/search invalid"):
        assert int(stats[name]["Request Count"]) > 0, name
    assert out.returncode == 0, out.stderr[-2000:]
