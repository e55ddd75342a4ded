"""The `jointpq` command, run for real as a subprocess (the installed console script)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest

from tests.conftest import clustered


def _jointpq(*args, cwd=None):
    exe = shutil.which("jointpq")
    cmd = [exe, *args] if exe else [sys.executable, "-m", "service.cli", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=cwd)


def test_build_then_search(tmp_path):
    np.save(tmp_path / "base.npy", clustered(2000, 16))
    np.save(tmp_path / "q.npy", clustered(3, 16, seed=5))
    (tmp_path / "ids.txt").write_text("\n".join(f"sku-{i}" for i in range(2000)))
    out = _jointpq(
        "build",
        "--vectors",
        str(tmp_path / "base.npy"),
        "--ids",
        str(tmp_path / "ids.txt"),
        "--out",
        str(tmp_path / "art"),
        "--nlist",
        "8",
        "--m",
        "4",
        "--metric",
        "l2",
        "--opq",
    )
    assert out.returncode == 0, out.stderr
    summary = json.loads(out.stdout)
    assert summary["n_items"] == 2000 and summary["M"] == 4
    manifest = json.loads((tmp_path / "art" / "manifest.json").read_text())
    assert manifest["training"]["mode"] == "two-step" and manifest["training"]["opq"] is True
    out = _jointpq("search", "--artifact", str(tmp_path / "art"), "--queries", str(tmp_path / "q.npy"), "--k", "3")
    assert out.returncode == 0, out.stderr
    rows = [json.loads(line) for line in out.stdout.splitlines()]
    assert len(rows) == 3 and all(len(r["ids"]) == 3 and r["ids"][0].startswith("sku-") for r in rows)


def test_errors_are_one_clear_line(tmp_path):
    out = _jointpq("search", "--artifact", str(tmp_path / "missing"), "--queries", str(tmp_path / "q.npy"))
    assert out.returncode == 2
    assert out.stderr.strip() == f"error: {tmp_path / 'missing'}: not an artifact directory"
    np.save(tmp_path / "base.npy", clustered(100, 16))
    out = _jointpq(
        "build", "--vectors", str(tmp_path / "base.npy"), "--out", str(tmp_path / "a"), "--nlist", "8", "--m", "5"
    )
    assert out.returncode == 2 and "divisible by M=5" in out.stderr


@pytest.mark.parametrize("command", ["build", "search", "demo", "serve", "train"])
def test_help_shows_a_working_example(command):
    out = _jointpq(command, "--help")
    assert out.returncode == 0 and "usage: jointpq" in out.stdout
    if command != "demo":
        assert "example:" in out.stdout


def test_demo_trains_once_then_reuses(tmp_path):
    """`jointpq demo` trains on the shipped SciFact subset, publishes, and reuses it next time."""
    args = ("demo", "--root", str(tmp_path / "demo"), "--encoder", "hashed", "--max-seconds", "2", "--no-serve")
    out = _jointpq(*args)
    assert out.returncode == 0, out.stderr
    assert "trained" in out.stdout and "nDCG@10" in out.stdout
    assert (tmp_path / "demo" / "CURRENT").read_text().strip() == "scifact-demo-v1"
    manifest = json.loads((tmp_path / "demo" / "scifact-demo-v1" / "manifest.json").read_text())
    assert manifest["training"]["mode"] == "poeem" and "canary.json" in manifest["files"]
    again = _jointpq(*args)
    assert again.returncode == 0 and "serving the existing artifact" in again.stdout


def test_faiss_export_then_import_round_trips(tmp_path):
    pytest.importorskip("faiss")
    from index import load_index

    np.save(tmp_path / "base.npy", clustered(2000, 16))
    q = clustered(5, 16, seed=9)
    assert (
        _jointpq(
            "build",
            "--vectors",
            str(tmp_path / "base.npy"),
            "--out",
            str(tmp_path / "a"),
            "--nlist",
            "8",
            "--m",
            "4",
            "--opq",
        ).returncode
        == 0
    )
    out = _jointpq("faiss-export", "--artifact", str(tmp_path / "a"), "--out", str(tmp_path / "a.faiss"))
    assert out.returncode == 0, out.stderr
    ids = tmp_path / "ids.txt"
    ids.write_text("\n".join(load_index(tmp_path / "a", backend="torch").ids.tolist()))  # Faiss label = row
    out = _jointpq(
        "faiss-import", "--index", str(tmp_path / "a.faiss"), "--ids", str(ids), "--out", str(tmp_path / "b")
    )
    assert out.returncode == 0, out.stderr
    a = load_index(tmp_path / "a", backend="torch").search(q, k=10, nprobe=8)[1]
    b = load_index(tmp_path / "b", backend="torch").search(q, k=10, nprobe=8)[1]
    assert a == b


def test_train_then_eval_json(tmp_path):
    from tests.conftest import shared

    data = str(shared("scifact"))
    out = _jointpq(
        "train",
        "--data",
        data,
        "--out",
        str(tmp_path / "a"),
        "--max-docs",
        "800",
        "--epochs",
        "2",
        "--nlist",
        "8",
        "--m",
        "8",
        "--max-seconds",
        "5",
    )
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout.splitlines()[-1])["steps"] > 0
    out = _jointpq(
        "eval", "--artifact", str(tmp_path / "a"), "--data", data, "--max-docs", "800", "--nprobe", "1", "8", "--json"
    )
    assert out.returncode == 0, out.stderr
    rows = [json.loads(line) for line in out.stdout.splitlines()]
    assert [r["nprobe"] for r in rows] == [1, 8]
    assert set(rows[0]) == {"nprobe", "recall@10", "recall@100", "ndcg@10", "mrr@10"}
    assert all(0 <= r[k] <= 1 for r in rows for k in r if k != "nprobe")
