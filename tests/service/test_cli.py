"""The `jointpq` command, run for real as a subprocess (the installed console script)."""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import shutil
import subprocess
import sys

import numpy as np
import pytest

from service.cli import parser
from tests.conftest import ROOT, clustered


def _jointpq(*args, cwd=None):
    exe = shutil.which("jointpq")
    cmd = [exe, *args] if exe else [sys.executable, "-m", "service.cli", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=cwd)


@pytest.mark.slow  # two subprocesses, a build with OPQ (~7 s)
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


@pytest.mark.slow  # two subprocesses (~3 s)
def test_errors_are_one_clear_line(tmp_path):
    out = _jointpq("search", "--artifact", str(tmp_path / "missing"), "--queries", str(tmp_path / "q.npy"))
    assert out.returncode == 2
    assert out.stderr.strip() == f"error: {tmp_path / 'missing'}: not an artifact directory"
    np.save(tmp_path / "base.npy", clustered(100, 16))
    out = _jointpq(
        "build", "--vectors", str(tmp_path / "base.npy"), "--out", str(tmp_path / "a"), "--nlist", "8", "--m", "5"
    )
    assert out.returncode == 2 and "divisible by M=5" in out.stderr


def _subparsers() -> dict[str, argparse.ArgumentParser]:
    action = next(a for a in parser()._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


COMMANDS = sorted(_subparsers())
NO_EXAMPLE = {"demo"}  # `jointpq demo` takes no required argument: the README's first command


def help_examples(command: str) -> list[list[str]]:
    """Every example command line printed at the end of `jointpq COMMAND --help` (after
    "example:" or "examples:"), as argv (leading VAR=value assignments included, # comments cut)."""
    text = _subparsers()[command].format_help()
    head = re.search(r"^examples?:$", text, re.MULTILINE)
    if head is None:
        return []
    lines = [ln.strip() for ln in text[head.end() :].splitlines() if ln.strip()]
    assert lines, f"{command}: '{head.group()}' with nothing after it"
    out = []
    for argv in (shlex.split(ln, comments=True) for ln in lines):
        if argv and argv[0] == "torchrun":  # a launcher in front: `torchrun ... -m service.cli COMMAND ...`
            assert "service.cli" in argv, argv
            argv = ["jointpq", *argv[argv.index("service.cli") + 1 :]]
        if argv:  # a comment line explains the one above
            out.append(argv)
    return out


def help_example(command: str) -> list[str] | None:
    """The first example of `jointpq COMMAND --help`, or None when the help shows none."""
    examples = help_examples(command)
    return examples[0] if examples else None


def split_env(argv: list[str]) -> tuple[dict[str, str], list[str]]:
    env = {}
    while argv and re.fullmatch(r"[A-Z_][A-Z0-9_]*=.*", argv[0]):
        name, _, value = argv[0].partition("=")
        env[name] = value
        argv = argv[1:]
    return env, argv


def test_help_runs_from_the_console_script():
    out = _jointpq("--help")
    assert out.returncode == 0 and "usage: jointpq" in out.stdout
    for command in COMMANDS:
        assert command in out.stdout


@pytest.mark.parametrize("command", COMMANDS)
def test_help_example_parses_with_the_real_parser(command):
    """The example in COMMAND --help is a complete, valid command line for COMMAND: a renamed or
    removed flag, a bad choice or a missing required argument fails here."""
    from service.settings import Settings

    examples = help_examples(command)
    if command in NO_EXAMPLE:
        assert not examples, f"{command} now has an example: check it like the others"
        examples = [["jointpq", command]]
    assert examples, f"`jointpq {command} --help` shows no example"
    for argv in examples[1:]:  # the others: complete, valid command lines too
        assert argv[:2] == ["jointpq", command], argv
        assert parser().parse_args(argv[1:]).command == command
    env, argv = split_env(examples[0])
    assert argv[:2] == ["jointpq", command], argv
    assert set(env) <= {f"JOINTPQ_{f.upper()}" for f in Settings.model_fields}, env  # real settings only
    ns = parser().parse_args(argv[1:])  # argparse exits (a failure) on an unknown flag or bad value
    assert ns.command == command and callable(ns.func)
    if command == "serve":  # its settings must validate too (e.g. an admin token of >= 8 characters)
        from service.serve import apply_flags

        saved = {k: v for k, v in os.environ.items() if k.startswith("JOINTPQ_")}
        try:
            for k in saved:
                del os.environ[k]
            os.environ.update(env)
            apply_flags(ns)  # what `jointpq serve` does before it builds its Settings
            settings = Settings()
        finally:
            for k in [k for k in os.environ if k.startswith("JOINTPQ_")]:
                del os.environ[k]
            os.environ.update(saved)
        assert settings.admin_token is not None and str(settings.artifact_root) == "artifacts/demo"


def test_help_examples_form_a_chain():
    """Each example uses what the one before it makes: search / faiss-export read build's artifact,
    faiss-import reads export's file, eval reads train's artifact; train's data path is the shared
    data set seen from the repository root (where the examples are run)."""
    ex = {c: parser().parse_args(split_env(help_example(c))[1][1:]) for c in COMMANDS if c not in NO_EXAMPLE}
    assert ex["search"].artifact == ex["build"].out == ex["faiss-export"].artifact
    assert ex["faiss-import"].index == ex["faiss-export"].out
    assert ex["eval"].artifact == ex["train"].out and ex["eval"].data == ex["train"].data
    default_shared = ROOT.parent / "shared" / "data"
    if default_shared.is_dir():
        assert (ROOT / ex["train"].data).is_dir(), ex["train"].data


@pytest.mark.slow  # four subprocesses, a build with OPQ
def test_help_examples_run_as_written(tmp_path):
    """build -> search -> faiss-export -> faiss-import, each run verbatim from its --help (argv
    as printed, in a directory holding the files they name) on a small set of vectors."""
    pytest.importorskip("faiss")
    from index.vectors import write_vecs

    write_vecs(tmp_path / "base.fvecs", clustered(3000, 32))
    write_vecs(tmp_path / "queries.fvecs", clustered(4, 32, seed=5))
    results = {}
    for command in ("build", "search", "faiss-export", "faiss-import"):
        env, argv = split_env(help_example(command))
        assert not env, env  # none of these needs a setting
        out = _jointpq(*argv[1:], cwd=tmp_path)
        assert out.returncode == 0, (argv, out.stderr)
        results[command] = out.stdout
    assert json.loads(results["build"])["n_items"] == 3000
    rows = [json.loads(line) for line in results["search"].splitlines()]
    assert len(rows) == 4 and all(len(r["ids"]) == 10 for r in rows)
    assert (tmp_path / "sift.faiss").is_file()
    assert json.loads(results["faiss-import"].splitlines()[-1])["n_items"] == 3000


@pytest.mark.slow  # trains the demo artifact (~17 s)
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


@pytest.mark.slow  # four subprocesses (~10 s)
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


@pytest.mark.slow  # trains on SciFact (~14 s)
def test_train_then_eval_json(tmp_path):
    """The train -> eval round trip of the command line (auto mode: 809 labels -> poeem). With the
    hashed encoder, as when this test was written: with the default frozen MiniLM the run encodes the
    800 documents twice on the CPU (~80 s) and checks nothing more here; MiniLM through `jointpq
    train` is run by tests/model/test_readme_commands.py, MiniLM-head poeem by the demo builder in
    tests/service/test_encoder_runtime.py."""
    from tests.conftest import shared

    data = str(shared("scifact"))
    out = _jointpq(
        "train",
        "--data",
        data,
        "--out",
        str(tmp_path / "a"),
        "--encoder",
        "hashed",
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
