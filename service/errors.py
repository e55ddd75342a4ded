"""Every way a request fails, in one place: which exception becomes which HTTP status, and the
one JSON error body ``{"error": ..., "detail": [{"field", "message"}] | null}`` that names the
field at fault. No stack trace ever leaves the process: an exception not mapped here is a bug,
answered 500 ``internal error`` (`RequestMiddleware`) with the trace in the log only.

    ApiError             raised by request handling; carries its status, message, field, headers
    ├── BodyTooLarge     413: the body is past `max_body_bytes`
    └── BodyTimeout      408: the body did not arrive within `body_timeout_s`
    ClientGone           499 in logs and metrics only: the client left, no one to answer
    pydantic errors      422 naming every field (`invalid`)
    ReloadRefused        its own status: the holder knows why a candidate was refused (400 a
                         path leaving the root, 404 no such artifact, 409 nothing to roll back,
                         422 a failed check), `api_error` turns it into a response
    JointPQError         400 while answering a request (`api_error`): SearchError and its
                         DimensionMismatch, or text sent to an artifact without an encoder

The `jointpq` command line keeps its own, coarser rule (service/cli.py): any JointPQError,
ValueError or OSError is one ``error: ...`` line and exit status 2; it shares no status here.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import orjson
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import Request
from starlette.responses import Response

from index import JointPQError

from .holder import ReloadRefused

if TYPE_CHECKING:
    from fastapi import FastAPI

CLIENT_CLOSED = 499  # nginx's status for a request whose client closed the connection first
NOT_READY = "not ready: no artifact loaded"


class ApiError(Exception):
    def __init__(self, status: int, error: str, field: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(error)
        self.status, self.error, self.field, self.headers = status, error, field, headers


class BodyTooLarge(ApiError):  # noqa: N818 - reads as the outcome
    def __init__(self, limit: int):
        super().__init__(413, f"request body exceeds {limit} bytes", "body")


class BodyTimeout(ApiError):  # noqa: N818 - reads as the outcome
    """The body did not arrive within `body_timeout_s` (a slow client must not hold a slot)."""

    def __init__(self, seconds: float):
        super().__init__(408, f"request body not received within {seconds:g} s", "body", {"connection": "close"})


class ClientGone(Exception):  # noqa: N818 - reads as the outcome
    """The client disconnected before its whole body arrived: nothing to search, no one to answer."""


def json_response(body: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(orjson.dumps(body, option=orjson.OPT_SERIALIZE_NUMPY), status, headers, "application/json")


def error_body(error: str, field: str | None = None) -> dict[str, Any]:
    return {"error": error, "detail": [{"field": field, "message": error}] if field else None}


def error_response(e: ApiError) -> Response:
    return json_response(error_body(e.error, e.field), e.status, e.headers)


def internal_error() -> Response:
    return json_response(error_body("internal error"), 500)


def unsupported_media_type() -> Response:
    msg = "content-type must be application/json"
    return json_response(error_body(msg, "content-type"), 415)


def api_error(e: ReloadRefused | JointPQError, field: str | None = None) -> ApiError:
    """The ApiError a deliberate exception of the holder or the index core answers with, `field`
    naming what the client sent that caused it (see the module docstring for the statuses)."""
    if isinstance(e, ReloadRefused):
        return ApiError(e.status, e.reason, field)
    # an index that could not answer (e.g. a shard past its deadline, cluster.sharded) says its status
    return ApiError(getattr(e, "http_status", 400), str(e), field)


def field_name(loc: tuple) -> str:
    """('body', 'vectors', 3, 1) -> 'vectors[3][1]'; the whole body -> 'body'."""
    parts = [p for p in loc if p != "body"] if len(loc) > 1 else list(loc)
    out = ""
    for p in parts:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
    return out or "body"


def invalid(errors: list[dict]) -> Response:
    """422 naming every field at fault (pydantic's `loc`), the first few in the message too."""
    detail = [{"field": field_name(tuple(err["loc"])), "message": err["msg"]} for err in errors]
    summary = "; ".join(f"{d['field']}: {d['message']}" for d in detail[:5])
    return json_response({"error": f"invalid request: {summary}", "detail": detail}, 422)


async def _api_error(request: Request, e: ApiError) -> Response:
    return error_response(e)


async def _invalid(request: Request, e: RequestValidationError) -> Response:
    return invalid(list(e.errors()))


async def _http(request: Request, e: StarletteHTTPException) -> Response:
    return json_response(error_body(str(e.detail)), e.status_code, getattr(e, "headers", None))


def install_handlers(app: FastAPI) -> None:
    """The app's exception handlers: ApiError, FastAPI's request validation (422) and Starlette's
    HTTP errors (404 no such route, 405 wrong method) all answer with the JSON error body."""
    app.add_exception_handler(ApiError, _api_error)
    app.add_exception_handler(RequestValidationError, _invalid)
    app.add_exception_handler(StarletteHTTPException, _http)
