"""Following the artifact root's pointer file (`--watch`): poll it, hot-reload when the name in
it changes, and say how that is going.

The watcher must outlive anything the pointer or the artifact it names can hold (bytes that are
not UTF-8, a 300-character name, a manifest nested 100k deep): every failure of one check is
logged, counted (`jointpq_watch_errors`) and shown in `/info` and `/readyz`, and the next check
runs as usual, so a fixed pointer is picked up without a restart. The watcher never takes the
service out of readiness: the artifact already loaded keeps serving, and a replica marked
unready over a bad pointer would take every replica that watches it out of the load balancer.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from index.pointer import read_pointer

from .holder import IndexHolder, Loaded, ReloadRefused
from .metrics import Metrics
from .settings import Settings

log = logging.getLogger("jointpq.service")

SwapTo = Callable[[str, str], Awaitable[tuple[Loaded, Loaded | None]]]


@dataclass
class WatchStatus:
    """What the watcher last saw; `healthy` means it reads the pointer and serves what it names."""

    enabled: bool
    running: bool = False
    checks: int = 0
    errors: int = 0
    pointer: str | None = None  # the name last read from the pointer file
    last_error: str | None = None  # why the last check failed, or why the named version was refused
    last_error_at: float | None = None

    def fail(self, reason: str) -> None:
        self.errors += 1
        self.last_error, self.last_error_at = reason[:500], time.time()

    def healthy(self, serving: str | None) -> bool:
        if not self.enabled:
            return True
        following = self.pointer is None or self.pointer == serving
        return self.running and self.last_error is None and following

    def to_json(self, serving: str | None) -> dict[str, Any]:
        return {
            "enabled": self.enabled,
            "healthy": self.healthy(serving),
            "running": self.running,
            "pointer": self.pointer,
            "checks": self.checks,
            "errors": self.errors,
            "last_error": self.last_error,
            "last_error_at": self.last_error_at,
        }


async def watch_pointer(
    settings: Settings, holder: IndexHolder, swap_to: SwapTo, status: WatchStatus, metrics: Metrics
) -> None:
    """Poll the pointer file every `watch_interval_s`; reload when the name in it changes (a
    refused version is not retried until the pointer names another). Runs until cancelled."""
    seen = holder.current.name if holder.current else None
    status.running = True
    try:
        while True:
            await asyncio.sleep(settings.watch_interval_s)
            status.checks += 1
            try:
                name = read_pointer(settings.artifact_root, settings.pointer_file)
                status.pointer = name
                if name and name != seen:
                    seen = name
                    await swap_to(name, "watch")
                    status.last_error = None
                elif name is None or name == (holder.current.name if holder.current else None):
                    status.last_error = None  # a refusal of the same name stays shown until it changes
            except asyncio.CancelledError:
                raise
            except ReloadRefused as e:  # swap_to logged and counted it
                status.fail(f"the pointer names {name!r}, which was refused: {e.reason}")
            except Exception as e:  # the loop must live on: log, count, show, check again next time
                status.fail(f"{type(e).__name__}: {e}")
                metrics.watch_errors.inc()
                log.error("pointer watch check failed", exc_info=True, extra={"error": status.last_error})
    finally:
        status.running = False
