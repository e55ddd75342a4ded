"""The ASGI layer around the app: request ids, body limits (size 413, arrival time 408), the
JSON-only rule for POST bodies (415), latency and status metrics by route, one JSON access-log
line per request, and the fast path that hands POST /search straight to the search engine."""

from __future__ import annotations

import asyncio
import itertools
import logging
import secrets
import time
from collections.abc import Awaitable, Callable, Collection
from typing import Any

from starlette.responses import Response

from .errors import (
    CLIENT_CLOSED,
    BodyTimeout,
    BodyTooLarge,
    ClientGone,
    error_response,
    internal_error,
    unsupported_media_type,
)
from .logs import ACCESS
from .metrics import Metrics

log = logging.getLogger("jointpq.service")
JSON_TYPES = (b"application/json",)


def is_json(headers: list[tuple[bytes, bytes]]) -> bool:
    """Whether the request says its body is JSON (`application/json`, any parameters, or a
    `+json` type). Why insist: a browser on any site may POST `text/plain` or a form to us
    without a CORS preflight; a JSON-only endpoint refuses those, so no page can drive it."""
    for name, value in headers:
        if name == b"content-type":
            media = value.split(b";", 1)[0].strip().lower()
            return media in JSON_TYPES or (media.startswith(b"application/") and media.endswith(b"+json"))
    return False


class RequestMiddleware:
    """Pure ASGI (no per-request task overhead): body size limit (413), request id, latency and
    status metrics by route, and one JSON access-log line per request.

    `POST /search` goes from here straight to `search` (`SearchEngine.answer`), the handler the
    FastAPI route also calls: the same code and answers, minus Starlette's routing and exception
    layers, which measured ~50% more vector requests per second on one worker
    (docs/benchmarks.md). `routes` are the paths metrics label by name; any other is "other"
    (or "/docs"), so a scan of random paths cannot grow the label set."""

    def __init__(
        self,
        app: Any,
        metrics: Metrics,
        max_body: int,
        search: Callable[[bytes], Awaitable[Response]],
        routes: Collection[str],
        body_timeout_s: float = 10.0,
    ):
        self.app, self.metrics, self.max_body, self.search = app, metrics, max_body, search
        self.routes, self.body_timeout_s = frozenset(routes), body_timeout_s
        # request ids: a random per-process prefix and a counter (uuid4 reads os.urandom per call)
        self._id_prefix, self._ids = secrets.token_hex(4), itertools.count(1)

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        t0 = time.perf_counter()
        state = {"status": 500, "started": False}
        rid = f"{self._id_prefix}-{next(self._ids):x}"
        fast = scope["path"] == "/search" and scope["method"] == "POST"

        async def send_wrapped(message) -> None:
            if message["type"] == "http.response.start":
                state["status"], state["started"] = message["status"], True
                message.setdefault("headers", [])
                message["headers"] = [*message["headers"], (b"x-request-id", rid.encode())]
            await send(message)

        try:
            if fast and not is_json(scope["headers"]):
                await unsupported_media_type()(scope, receive, send_wrapped)
                return
            body = await self._read_body(scope, receive) if scope["method"] in ("POST", "PUT", "PATCH") else None
            if fast:
                await (await self.search(body))(scope, receive, send_wrapped)
            else:
                await self.app(scope, receive if body is None else replay(body, receive), send_wrapped)
        except (BodyTooLarge, BodyTimeout) as e:
            await error_response(e)(scope, receive, send_wrapped)
        except ClientGone:
            state["status"] = CLIENT_CLOSED  # logged and counted as such; there is no one to answer
        except Exception:
            log.exception("unhandled error", extra={"request_id": rid, "path": scope.get("path")})
            if not state["started"]:
                await internal_error()(scope, receive, send_wrapped)
        finally:
            seconds = time.perf_counter() - t0
            route = "/search" if fast else getattr(scope.get("route"), "path", None)
            route = route if route in self.routes else ("/docs" if scope["path"].startswith("/docs") else "other")
            self.metrics.request_done(route, scope["method"], state["status"], seconds)
            if route != "/metrics" and ACCESS.isEnabledFor(logging.INFO):
                ACCESS.info(
                    "request",
                    extra={
                        "request_id": rid,
                        "method": scope["method"],
                        "path": scope["path"],
                        "status": state["status"],
                        "latency_ms": round(seconds * 1000, 3),
                        "client": (scope.get("client") or ("", 0))[0],
                    },
                )

    async def _read_body(self, scope, receive) -> bytes:
        """The whole body, up to the limit (requests here are small): BodyTooLarge past it,
        ClientGone if the client leaves before the end (a cut body is never searched),
        BodyTimeout if it is not all in within `body_timeout_s` (a slow client holds no slot)."""
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_body:
            raise BodyTooLarge(self.max_body)
        chunks, size, more = [], 0, True
        try:
            async with asyncio.timeout(self.body_timeout_s):
                while more:
                    message = await receive()
                    if message["type"] == "http.disconnect":
                        raise ClientGone
                    chunk = message.get("body", b"")
                    size += len(chunk)
                    if size > self.max_body:
                        raise BodyTooLarge(self.max_body)
                    chunks.append(chunk)
                    more = message.get("more_body", False)
        except TimeoutError:
            raise BodyTimeout(self.body_timeout_s) from None
        return b"".join(chunks)


def replay(body: bytes, receive) -> Callable[[], Awaitable[dict]]:
    """An ASGI `receive` that hands the app the body already read, then defers to the server's."""
    sent = False

    async def receive_again() -> dict:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return receive_again
