"""`jointpq serve --cluster` flags: checked in one line before anything starts (no Ray started here)."""

from __future__ import annotations

import pytest

from service.cli import main


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--shards", "2"], "error: --shards go with --cluster (sharded serving on Ray Serve)"),
        (["--replicas", "2", "--on-partial", "503"], "error: --replicas, --on-partial go with --cluster"),
        (["--cluster", "--shards", "0"], "error: --shards must be > 0, got 0"),
        (["--cluster", "--replicas", "-1"], "error: --replicas must be > 0, got -1"),
        (["--cluster", "--shard-deadline-s", "0"], "error: --shard-deadline-s must be > 0, got 0.0"),
    ],
)
def test_cluster_flags_are_checked_in_one_line(flags, message, capsys):
    pytest.importorskip("ray", reason="the cluster extra is not installed")
    assert main(["serve", *flags]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(message) and "\n" not in err, err


def test_the_serve_help_shows_the_cluster_flags(capsys):
    with pytest.raises(SystemExit):
        main(["serve", "--help"])
    out = capsys.readouterr().out
    for flag in ("--cluster", "--shards", "--replicas", "--address", "--on-partial", "--shard-deadline-s"):
        assert flag in out
