"""What every bench script shares, typed so that a slip fails loudly instead of measuring the wrong thing.

Why this exists: `bench/service.py` once passed `True`/`False` where the service wrapper took a mode
string, so its "batching on vs off" comparison ran with batching off both times and printed two
honest-looking rows; `bench/search.py` silently skipped siftsmall when the shared data was not where
it guessed. So here:

- `Batching` is the one spelling of an engine mode; `batching_mode` checks it at runtime (a bool is a
  TypeError, an unknown string a ValueError), and `Service` refuses to measure a server whose `/info`
  reports another mode than the one asked for. Rows are labelled with the mode the server reported.
- `require_shared` resolves shared data like the test suite (`JOINTPQ_SHARED_DATA`, else
  `../shared/data` beside the project) and exits non-zero naming the path and the variable.
- `parse_args` gives every script the same `--tiny` (alias `--smoke`): small data, one seed, short
  runs through the real code paths, for tests; explicit flags still win over the tiny defaults.
- `Report` and `markdown_table` print rows (or JSON lines) and the final tables the same way everywhere.

Bench scripts run as `python bench/x.py`, so bench/ is sys.path[0] and they `import harness`; importing it
also puts the project root on sys.path (for a checkout without `pip install -e .`).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, get_args

import httpx

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

SHARED_ENV = "JOINTPQ_SHARED_DATA"
DEMO_DATA = ROOT / "data" / "scifact-demo"
TINY_ROOT = ROOT / "artifacts" / "bench-tiny"
TINY_VERSION = "tiny-v1"

Batching = Literal["on", "off", "inline"]
BATCHING_MODES: tuple[Batching, ...] = get_args(Batching)


# --- engine modes --------------------------------------------------------------------------------


def batching_mode(value: object) -> Batching:
    """`value` as a `Batching` mode, or raise: TypeError for anything but a str (a bool in particular,
    which a truthiness test would silently turn into "off"), ValueError for an unknown string."""
    if not isinstance(value, str):
        raise TypeError(f"batching mode must be one of {BATCHING_MODES}, got {type(value).__name__} {value!r}")
    if value not in BATCHING_MODES:
        raise ValueError(f"batching mode must be one of {BATCHING_MODES}, got {value!r}")
    return value  # type: ignore[return-value]  # narrowed by the membership test above


def batching_env(mode: Batching) -> dict[str, str]:
    """The service's environment for `mode` (service/settings.py: `batching`, `inline_vector_search`)."""
    mode = batching_mode(mode)
    return {
        "JOINTPQ_BATCHING": "true" if mode == "on" else "false",
        "JOINTPQ_INLINE_VECTOR_SEARCH": "true" if mode == "inline" else "false",
    }


def served_batching(settings: Mapping[str, Any]) -> Batching:
    """The mode a server really runs, from `/info`'s public settings: the app uses the batcher
    whenever `batching` is on, and inline vector search only without it (service/engine.py)."""
    if "engine_mode" in settings:  # the server says which path it takes (newer servers)
        return batching_mode(settings["engine_mode"])
    on, inline = settings.get("batching"), settings.get("inline_vector_search")
    if not isinstance(on, bool) or not isinstance(inline, bool):
        raise ValueError(f"/info settings lack boolean batching / inline_vector_search: {dict(settings)}")
    return "on" if on else "inline" if inline else "off"


def parse_modes(choice: str) -> list[Batching]:
    """A `--batching` choice (a mode, `both` = on + off, `all`) as the modes to run, validated."""
    named = {"both": ["on", "off"], "all": list(BATCHING_MODES)}.get(choice, [choice])
    return [batching_mode(m) for m in named]


# --- the real service ----------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def bin_path(name: str) -> str:
    """A console script of this venv (`jointpq`, `locust`) even when its bin/ is not on PATH."""
    local = Path(sys.executable).parent / name
    return str(local) if local.exists() else name


class Service:
    """`jointpq serve` as a subprocess (the real command, real uvicorn workers) on a loopback port.

    Arguments after `root` are keyword-only so a mode cannot land in another parameter's slot.
    On entry it waits for /readyz, then reads /info: `batching` is the mode the server reports,
    and a server that does not run the requested mode is an error, not a mislabelled row."""

    def __init__(
        self, root: Path, *, workers: int = 1, batching: Batching, token: str, version: str | None = None,
        torch_threads: int | None = None, watch: bool = False, ready_timeout_s: float = 300,
        env: Mapping[str, str] | None = None,
    ):  # fmt: skip
        self.requested: Batching = batching_mode(batching)
        self.batching: Batching | None = None
        self.info: dict[str, Any] = {}
        self.ready_timeout_s = ready_timeout_s
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        extra = env
        env = {
            **os.environ,
            **batching_env(self.requested),
            "JOINTPQ_ARTIFACT_ROOT": str(root),
            "JOINTPQ_WORKERS": str(workers),
            "JOINTPQ_ADMIN_TOKEN": token,
            "JOINTPQ_DEVICE": "cpu",
            "JOINTPQ_LOG_LEVEL": "warning",
            "JOINTPQ_PORT": str(self.port),
        }
        if version:
            env["JOINTPQ_ARTIFACT"] = version
        if watch:  # every worker follows the root's CURRENT pointer
            env["JOINTPQ_WATCH"], env["JOINTPQ_WATCH_INTERVAL_S"] = "true", "0.5"
        if torch_threads:  # torch's default is one thread per core in every worker process
            env["JOINTPQ_TORCH_THREADS"] = str(torch_threads)
        env.update(extra or {})  # further JOINTPQ_* settings of the run (encoder runtime, cache, batcher)
        # stderr to a file, not a pipe: an undrained pipe fills at 64 KB and stalls the server mid-measurement
        self.log = tempfile.TemporaryFile("w+")  # noqa: SIM115 -- lives as long as the server, closed in __exit__
        self.proc = subprocess.Popen([bin_path("jointpq"), "serve"], env=env, stderr=self.log)

    def __enter__(self) -> Service:
        try:
            self._wait_ready()
            self.info = httpx.get(f"{self.url}/info", timeout=10).json()
            self.batching = served_batching(self.info["settings"])
            if self.batching != self.requested:
                raise RuntimeError(f"asked for batching {self.requested!r}, the server runs {self.batching!r}")
        except BaseException:
            self.__exit__()
            raise
        return self

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.ready_timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                self.log.seek(0)
                raise RuntimeError(f"service exited: {self.log.read()[-2000:]}")
            try:
                if httpx.get(f"{self.url}/readyz", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        raise RuntimeError(f"service not ready after {self.ready_timeout_s:.0f} s")

    def __exit__(self, *exc: object) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()


def tiny_artifact(root: Path = TINY_ROOT) -> Path:
    """`root` holding a small text artifact (hashed n-gram encoder, poeem, one short epoch on the shipped
    SciFact subset), built by the demo's own builder once and reused: --tiny service benches need an
    encoder for text queries but not a good one. Returns `root`."""
    from index.pointer import current_version
    from service.demo import build_demo

    if current_version(root) is None:
        build_demo(
            root, DEMO_DATA, "hashed", version=TINY_VERSION, epochs=1, max_seconds=1, dim=32, M=8, nlist=16,
            warm_items=1024, warmup_steps=2, hard_negatives=0,
        )  # fmt: skip
    return root


def artifact_root(root: Path | None, tiny: bool) -> tuple[Path, str]:
    """(root, version to serve) for the service benches: `root` if given, else the tiny artifact with
    --tiny, else the demo's; exits non-zero when the root holds no artifact."""
    from index.pointer import current_version

    root = root or (tiny_artifact() if tiny else ROOT / "artifacts" / "demo")
    version = current_version(root)
    if version is None:
        raise SystemExit(f"error: no artifact in {root}: run `jointpq demo --no-serve` first (or give --root)")
    return root, version


# --- shared data ---------------------------------------------------------------------------------


def shared_data_dir() -> Path:
    """Where shared data sets live: $JOINTPQ_SHARED_DATA, else ../shared/data beside the project
    (the same rule as tests/conftest.py, so a bench and the tests read the same files)."""
    env = os.environ.get(SHARED_ENV)
    return Path(env) if env else ROOT.parent / "shared" / "data"


def require_shared(name: str) -> Path:
    """Path of shared data set `name`; missing, exit non-zero saying where it looked and how to point
    elsewhere (a benchmark that skips its data prints a table that looks complete and is not)."""
    path = shared_data_dir() / name
    if not path.exists():
        how = f"{SHARED_ENV}={os.environ[SHARED_ENV]}" if os.environ.get(SHARED_ENV) else f"{SHARED_ENV} is unset"
        raise SystemExit(
            f"error: shared data set {name!r} not found at {path} ({how}); set {SHARED_ENV} to the directory "
            f"that holds {name}/"
        )
    return path


# --- command line --------------------------------------------------------------------------------


def parse_args(
    parser: argparse.ArgumentParser, tiny: Mapping[str, Any], argv: Sequence[str] | None = None
) -> argparse.Namespace:
    """Parse with a `--tiny` / `--smoke` flag added: when given, `tiny` replaces the defaults (small data,
    one seed, short runs) and the command line is parsed again, so flags given explicitly still win."""
    parser.add_argument(
        "--tiny", "--smoke", action="store_true",
        help="seconds-long end-to-end run on small data through the real code paths (tests use it)",
    )  # fmt: skip
    args = parser.parse_args(argv)
    unknown = set(tiny) - set(vars(args))
    if unknown:
        raise ValueError(f"tiny defaults for options the parser does not have: {sorted(unknown)}")
    if args.tiny:
        parser.set_defaults(**tiny)
        args = parser.parse_args(argv)
    return args


# --- output --------------------------------------------------------------------------------------


def kv_line(row: Mapping[str, Any]) -> str:
    """`k=v k=v`, floats to 2 decimals: the default human line of a row."""
    return " ".join(f"{k}={v:.2f}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items())


class Report:
    """Rows as they come: one JSON object per line with `as_json`, else `line(row)` (None prints
    nothing); every row is kept in `rows` for the summary tables."""

    def __init__(self, as_json: bool, line: Callable[[dict[str, Any]], str | None] = kv_line):
        self.as_json, self.line = as_json, line
        self.rows: list[dict[str, Any]] = []

    def __call__(self, row: dict[str, Any]) -> None:
        self.rows.append(row)
        text = json.dumps(row) if self.as_json else self.line(row)
        if text is not None:
            print(text, flush=True)


def markdown_table(header: Sequence[str], rows: Iterable[Sequence[object]]) -> str:
    """A GitHub markdown table (the form docs/benchmarks.md quotes)."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)
