"""Connection limits for uvicorn: the one way the service is started (`jointpq serve` and the
tests' in-process servers) so both run with the same protections.

uvicorn closes a keep-alive connection that stays idle after a response (`timeout_keep_alive`)
and can refuse requests past `limit_concurrency`, but a connection that never sends a request,
or sends half a request line and headers, stays open forever: a few hundred of them hold a
worker's file descriptors (slowloris). `HeaderTimeoutProtocol` gives every request head a
deadline, from the connection's start or the request's first byte, that trickling bytes do
not extend. The body has its own deadline in the app (`RequestMiddleware`, 408).

A reverse proxy in front (nginx, an ingress) should still set its own client timeouts and
connection caps (nginx: `client_header_timeout`, `client_body_timeout`, `keepalive_timeout`,
`limit_conn`): it is where slow clients should be absorbed, before a Python worker.
"""

from __future__ import annotations

import asyncio
import os
from typing import Any

import uvicorn
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from .settings import Settings

DEFAULT_HEADER_TIMEOUT_S = 10.0


class HeaderTimeoutProtocol(HttpToolsProtocol):
    """httptools protocol whose request heads must arrive within `config.header_timeout_s`."""

    _header_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm_header_timer()

    def on_message_begin(self) -> None:
        super().on_message_begin()
        if self._header_timer is None:  # a pipelined or keep-alive request: its own deadline
            self._arm_header_timer()

    def on_headers_complete(self) -> None:
        self._cancel_header_timer()
        super().on_headers_complete()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_header_timer()
        super().connection_lost(exc)

    def _arm_header_timer(self) -> None:
        self._header_timer = self.loop.call_later(header_timeout(self.config), self._header_timed_out)

    def _cancel_header_timer(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _header_timed_out(self) -> None:
        self._header_timer = None
        if not self.transport.is_closing():
            self.transport.close()


def header_timeout(config: uvicorn.Config) -> float:
    """The deadline for request heads: `config.header_timeout_s` where the config was built
    here in-process (tests), else JOINTPQ_HEADER_TIMEOUT_S, which `jointpq serve` exports so
    that every worker process uvicorn spawns reads the same value."""
    value = getattr(config, "header_timeout_s", None)
    if value is None:
        value = float(os.environ.get("JOINTPQ_HEADER_TIMEOUT_S", DEFAULT_HEADER_TIMEOUT_S))
        config.header_timeout_s = value  # once per process, not per connection
    return value


def uvicorn_options(settings: Settings) -> dict[str, Any]:
    """uvicorn keyword arguments for `settings`: our protocol, keep-alive and concurrency
    limits, and logging left to us (one JSON access line per request comes from the app).
    Worker processes read the header deadline from JOINTPQ_HEADER_TIMEOUT_S: `jointpq serve`
    exports it (`export_for_workers`)."""
    return {
        "host": settings.host,
        "port": settings.port,
        "workers": settings.workers,
        "http": HeaderTimeoutProtocol,
        "timeout_keep_alive": settings.timeout_keep_alive_s,
        "limit_concurrency": settings.limit_concurrency,
        "log_config": None,
        "access_log": False,
        "timeout_graceful_shutdown": 10,
    }


def export_for_workers(settings: Settings) -> None:
    """Put what the protocol reads from the environment there, for the worker processes uvicorn
    spawns (they rebuild the app from JOINTPQ_* variables)."""
    os.environ["JOINTPQ_HEADER_TIMEOUT_S"] = str(settings.header_timeout_s)


def in_process_config(settings: Settings, app: Any) -> uvicorn.Config:
    """A config serving `app` (an app object) in this process, one worker, same limits."""
    config = uvicorn.Config(app, **{**uvicorn_options(settings), "workers": 1}, lifespan="on")
    config.header_timeout_s = settings.header_timeout_s
    return config
