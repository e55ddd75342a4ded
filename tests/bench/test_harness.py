"""bench/harness.py: the types that stop a bench from measuring one thing and labelling it another."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from bench.harness import (
    BATCHING_MODES,
    SHARED_ENV,
    Service,
    batching_env,
    batching_mode,
    markdown_table,
    parse_args,
    parse_modes,
    require_shared,
    served_batching,
)


@pytest.mark.parametrize("value", [True, False, 1, None])
def test_a_bool_or_other_non_string_is_not_a_batching_mode(value):
    with pytest.raises(TypeError, match="batching mode"):
        batching_mode(value)


@pytest.mark.parametrize("value", ["true", "ON", "both", ""])
def test_an_unknown_string_is_not_a_batching_mode(value):
    with pytest.raises(ValueError, match="batching mode"):
        batching_mode(value)


def test_modes_map_to_the_service_environment():
    assert BATCHING_MODES == ("on", "off", "inline")
    assert batching_env("on") == {"JOINTPQ_BATCHING": "true", "JOINTPQ_INLINE_VECTOR_SEARCH": "false"}
    assert batching_env("off") == {"JOINTPQ_BATCHING": "false", "JOINTPQ_INLINE_VECTOR_SEARCH": "false"}
    assert batching_env("inline") == {"JOINTPQ_BATCHING": "false", "JOINTPQ_INLINE_VECTOR_SEARCH": "true"}
    with pytest.raises(TypeError):
        batching_env(True)  # type: ignore[arg-type]


def test_the_served_mode_is_read_from_info_settings():
    assert served_batching({"batching": True, "inline_vector_search": False}) == "on"
    assert served_batching({"batching": True, "inline_vector_search": True}) == "on"  # the batcher wins (app.py)
    assert served_batching({"batching": False, "inline_vector_search": True}) == "inline"
    assert served_batching({"batching": False, "inline_vector_search": False}) == "off"
    assert served_batching({"engine_mode": "inline", "batching": False}) == "inline"  # the server's own word wins
    with pytest.raises(ValueError, match="batching mode"):
        served_batching({"engine_mode": "turbo"})
    with pytest.raises(ValueError, match="inline_vector_search"):
        served_batching({"batching": False})
    with pytest.raises(ValueError):
        served_batching({"batching": "false", "inline_vector_search": False})


def test_parse_modes_expands_the_cli_choices():
    assert parse_modes("both") == ["on", "off"]
    assert parse_modes("all") == ["on", "off", "inline"]
    assert parse_modes("inline") == ["inline"]
    with pytest.raises(ValueError):
        parse_modes("sometimes")


def test_service_refuses_a_bool_mode_before_starting_anything(tmp_path):
    with pytest.raises(TypeError, match="batching mode"):
        Service(tmp_path, batching=True, token="t" * 16)  # type: ignore[arg-type]
    with pytest.raises(TypeError):  # the old positional slip no longer fits the signature at all
        Service(tmp_path, 1, True, "t" * 16)  # type: ignore[misc]


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser()
    p.add_argument("--n", type=int, default=1000)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    return p


def test_tiny_replaces_defaults_but_not_explicit_flags():
    tiny = {"n": 10, "seeds": [0]}
    assert vars(parse_args(_parser(), tiny, [])) == {"n": 1000, "seeds": [0, 1, 2], "tiny": False}
    assert vars(parse_args(_parser(), tiny, ["--tiny"])) == {"n": 10, "seeds": [0], "tiny": True}
    assert vars(parse_args(_parser(), tiny, ["--smoke", "--n", "5"])) == {"n": 5, "seeds": [0], "tiny": True}


def test_tiny_defaults_for_an_unknown_option_are_a_bug():
    with pytest.raises(ValueError, match="nq"):
        parse_args(_parser(), {"nq": 5}, ["--tiny"])


def test_missing_shared_data_exits_naming_the_path_and_the_variable(tmp_path, monkeypatch):
    monkeypatch.setenv(SHARED_ENV, str(tmp_path))
    with pytest.raises(SystemExit) as e:
        require_shared("siftsmall")
    assert str(tmp_path / "siftsmall") in str(e.value.code) and SHARED_ENV in str(e.value.code)
    (tmp_path / "siftsmall").mkdir()
    assert require_shared("siftsmall") == tmp_path / "siftsmall"


def test_shared_data_defaults_beside_the_project(monkeypatch):
    monkeypatch.delenv(SHARED_ENV, raising=False)
    with pytest.raises(SystemExit) as e:
        require_shared("no-such-data-set")
    root = Path(__file__).resolve().parents[2]
    assert str(root.parent / "shared" / "data" / "no-such-data-set") in str(e.value.code)
    assert f"{SHARED_ENV} is unset" in str(e.value.code)


def test_markdown_table():
    assert markdown_table(("a", "b"), [(1, "x"), (2.5, "y")]) == "| a | b |\n|---|---|\n| 1 | x |\n| 2.5 | y |"
