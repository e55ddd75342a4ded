"""A settings error names what the user set: the environment variable, or the flag and its
variable when the value came from a flag (pydantic-settings alone says "JOINTPQ_: Value error")."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest
from pydantic import ValidationError

from service.settings import Settings, describe_errors


def _serve(tmp_path, *flags: str, **env: str) -> subprocess.CompletedProcess:
    exe = shutil.which("jointpq")
    cmd = [exe] if exe else [sys.executable, "-m", "service.cli"]
    clean = {k: v for k, v in os.environ.items() if not k.startswith("JOINTPQ_")}
    return subprocess.run(
        [*cmd, "serve", "--artifact-root", str(tmp_path), *flags],
        env={**clean, **env},
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_short_admin_token_names_its_variable_and_never_echoes_it(tmp_path):
    r = _serve(tmp_path, JOINTPQ_ADMIN_TOKEN="short")
    assert r.returncode == 2
    assert r.stderr.strip() == "error: JOINTPQ_ADMIN_TOKEN: must be at least 8 characters, got 5"
    assert "short" not in r.stderr.replace("must be at least", "")


def test_a_bad_flag_names_the_flag_and_its_variable(tmp_path):
    r = _serve(tmp_path, "--port", "70000")
    assert r.returncode == 2
    assert r.stderr.strip() == "error: --port (JOINTPQ_PORT): Input should be less than or equal to 65535"


@pytest.mark.parametrize(
    ("env", "line"),
    [
        ({"JOINTPQ_WORKERS": "zero"}, "JOINTPQ_WORKERS: Input should be a valid integer, unable to parse string"),
        (
            {"JOINTPQ_DEFAULT_NPROBE": "9", "JOINTPQ_MAX_NPROBE": "8"},
            "JOINTPQ_DEFAULT_NPROBE (9) exceeds JOINTPQ_MAX_NPROBE (8)",
        ),
        ({"JOINTPQ_BACKEND": "gpu"}, "JOINTPQ_BACKEND: Input should be 'auto', 'torch' or 'faiss'"),
    ],
)
def test_describe_errors_names_the_variable(monkeypatch, env, line):
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    with pytest.raises(ValidationError) as e:
        Settings()
    assert describe_errors(e.value)[0].startswith(line), describe_errors(e.value)
