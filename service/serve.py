"""`jointpq serve`: run the service under uvicorn. Flags override the JOINTPQ_* environment (they
are written back into it, so every uvicorn worker process builds the same settings)."""

from __future__ import annotations

import argparse
import os
import sys
from typing import TYPE_CHECKING

from pydantic import ValidationError

if TYPE_CHECKING:
    from .settings import Settings

FLAGS = {  # flag dest -> env var
    "artifact_root": "JOINTPQ_ARTIFACT_ROOT",
    "artifact": "JOINTPQ_ARTIFACT",
    "host": "JOINTPQ_HOST",
    "port": "JOINTPQ_PORT",
    "workers": "JOINTPQ_WORKERS",
    "device": "JOINTPQ_DEVICE",
    "backend": "JOINTPQ_BACKEND",
    "log_level": "JOINTPQ_LOG_LEVEL",
    "torch_threads": "JOINTPQ_TORCH_THREADS",
}


def add_command(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "serve",
        help="run the HTTP search service (settings: JOINTPQ_* env vars, overridden by flags)",
        epilog="example:\n  JOINTPQ_ADMIN_TOKEN=change-me jointpq serve --artifact-root artifacts/demo --port 8000",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--artifact-root", help="directory of artifact versions (JOINTPQ_ARTIFACT_ROOT)")
    p.add_argument("--artifact", help="version to serve first (default: the CURRENT pointer, else the newest)")
    p.add_argument("--host")
    p.add_argument("--port", type=int)
    p.add_argument("--workers", type=int, help="uvicorn worker processes")
    p.add_argument("--device")
    p.add_argument("--backend", choices=("auto", "torch", "faiss"))
    p.add_argument("--torch-threads", type=int)
    p.add_argument("--log-level", choices=("debug", "info", "warning", "error"))
    p.add_argument("--watch", action="store_true", help="hot-reload when the pointer file changes")
    p.add_argument("--no-batching", action="store_true", help="one engine call per request")
    p.add_argument(
        "--inline-vector-search", action="store_true", help="with --no-batching: vector searches on the event loop"
    )
    p.set_defaults(func=run)


SWITCHES = {  # store_true flag dest -> (field, env value)
    "watch": ("watch", "true"),
    "no_batching": ("batching", "false"),
    "inline_vector_search": ("inline_vector_search", "true"),
}


def apply_flags(args: argparse.Namespace) -> dict[str, str]:
    """Write the given flags into the environment; returns field -> flag for error messages."""
    given: dict[str, str] = {}
    for dest, env in FLAGS.items():
        value = getattr(args, dest, None)
        if value is not None:
            os.environ[env] = str(value)
            given[dest] = "--" + dest.replace("_", "-")
    for dest, (field, value) in SWITCHES.items():
        if getattr(args, dest, False):
            os.environ[f"JOINTPQ_{field.upper()}"] = value
            given[field] = "--" + dest.replace("_", "-")
    return given


def settings_from_flags(args: argparse.Namespace) -> Settings | None:
    """`Settings` from JOINTPQ_* with the given flags written over them, or None after printing one
    `error:` line per bad value naming the flag (or variable) that set it (`jointpq serve [--cluster]`)."""
    from .settings import Settings, describe_errors

    given = apply_flags(args)
    try:
        return Settings()
    except ValidationError as e:
        for line in describe_errors(e, given):
            print(f"error: {line}", file=sys.stderr)
        return None


def run(args: argparse.Namespace) -> int:
    import uvicorn

    from .http_limits import export_for_workers, uvicorn_options
    from .logs import configure_logging

    settings = settings_from_flags(args)
    if settings is None:
        return 2
    configure_logging(settings.log_level)
    export_for_workers(settings)
    uvicorn.run("service.app:app_from_env", factory=True, **uvicorn_options(settings))
    return 0
