"""The FastAPI app: `create_app(settings)` builds one; `jointpq serve` runs it under uvicorn.

Routes: POST /search; GET /healthz, /readyz, /info, /metrics; POST /admin/reload, /admin/rollback
(bearer token). Every error is JSON ``{"error": ..., "detail": [{"field", "message"}]}`` naming
the field at fault; no stack trace ever leaves the process.
"""

# no `from __future__ import annotations`: FastAPI resolves the route's request model (built
# per settings inside create_app) from the live annotation object.
import asyncio
import contextlib
import hmac
import itertools
import logging
import secrets
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from typing import Any

import numpy as np
import orjson
from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import Response

from index import JointPQError
from index.pointer import PointerError

from .batching import Job, JobResult, MicroBatcher, run_jobs, split_job
from .holder import IndexHolder, Loaded, ReloadRefused
from .logs import ACCESS
from .metrics import Metrics
from .schemas import (
    SEARCH_EXAMPLES,
    ErrorResponse,
    InfoResponse,
    ReloadRequest,
    ReloadResponse,
    SearchResponse,
    search_request_model,
)
from .settings import Settings
from .watch import WatchStatus, watch_pointer

log = logging.getLogger("jointpq.service")
ROUTES = {"/search", "/healthz", "/readyz", "/info", "/metrics", "/admin/reload", "/admin/rollback"}


class ApiError(Exception):
    def __init__(self, status: int, error: str, field: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(error)
        self.status, self.error, self.field, self.headers = status, error, field, headers


def json_response(body: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(orjson.dumps(body, option=orjson.OPT_SERIALIZE_NUMPY), status, headers, "application/json")


def error_body(error: str, field: str | None = None) -> dict[str, Any]:
    return {"error": error, "detail": [{"field": field, "message": error}] if field else None}


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


class BodyTooLarge(Exception):  # noqa: N818 - reads as the outcome
    pass


class BodyTimeout(Exception):  # noqa: N818 - reads as the outcome
    """The body did not arrive within `body_timeout_s` (a slow client must not hold a slot)."""


class ClientGone(Exception):  # noqa: N818 - reads as the outcome
    """The client disconnected before its whole body arrived: nothing to search, no one to answer."""


CLIENT_CLOSED = 499  # nginx's status for a request whose client closed the connection first
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


def unsupported_media_type() -> Response:
    msg = "content-type must be application/json"
    return json_response(error_body(msg, "content-type"), 415)


class RequestMiddleware:
    """Pure ASGI (no per-request task overhead): body size limit (413), request id, latency and
    status metrics by route, and one JSON access-log line per request.

    `POST /search` goes from here straight to `search`, the handler the FastAPI route also calls:
    the same code and answers, minus Starlette's routing and exception layers, which measured
    ~50% more vector requests per second on one worker (docs/benchmarks.md)."""

    def __init__(
        self,
        app,
        metrics: Metrics,
        max_body: int,
        search: Callable[[bytes], Awaitable[Response]],
        body_timeout_s: float = 10.0,
    ):
        self.app, self.metrics, self.max_body, self.search = app, metrics, max_body, search
        self.body_timeout_s = body_timeout_s
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
        except BodyTooLarge:
            await json_response(error_body(f"request body exceeds {self.max_body} bytes", "body"), 413)(
                scope, receive, send_wrapped
            )
        except ClientGone:
            state["status"] = CLIENT_CLOSED  # logged and counted as such; there is no one to answer
        except BodyTimeout:
            msg = f"request body not received within {self.body_timeout_s:g} s"
            await json_response(error_body(msg, "body"), 408, {"connection": "close"})(scope, receive, send_wrapped)
        except Exception:
            log.exception("unhandled error", extra={"request_id": rid, "path": scope.get("path")})
            if not state["started"]:
                await json_response(error_body("internal error"), 500)(scope, receive, send_wrapped)
        finally:
            seconds = time.perf_counter() - t0
            route = "/search" if fast else getattr(scope.get("route"), "path", None)
            route = route if route in ROUTES else ("/docs" if scope["path"].startswith("/docs") else "other")
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
            raise BodyTooLarge
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
                        raise BodyTooLarge
                    chunks.append(chunk)
                    more = message.get("more_body", False)
        except TimeoutError:
            raise BodyTimeout from None
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


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings()
    metrics = Metrics()
    holder = IndexHolder(settings)
    executor = ThreadPoolExecutor(settings.search_threads, thread_name_prefix="jointpq-search")
    batcher = (
        MicroBatcher(
            executor,
            settings.search_threads,
            settings.batch_max_queries,
            settings.batch_wait_ms / 1000,
            metrics.observe_batch,
        )
        if settings.batching
        else None
    )
    started = time.time()
    watch = WatchStatus(enabled=settings.watch)
    SearchRequest = search_request_model(settings)

    async def swap_to(name: str, source: str) -> tuple[Loaded, Loaded | None]:
        try:
            new, old = await holder.reload(name)
        except ReloadRefused as e:
            metrics.reloads.labels("refused").inc()
            log.warning("reload refused", extra={"source": source, "artifact": name, "reason": e.reason})
            raise
        metrics.reloads.labels("ok").inc()
        metrics.serving(new.version)
        log.info("reloaded", extra={"source": source, "version": new.version, "previous": old and old.version})
        return new, old

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        if settings.torch_threads:
            import torch

            torch.set_num_threads(settings.torch_threads)
        try:
            name = holder.initial_name()
        except PointerError as e:  # start anyway, not ready: a fixed pointer (--watch) or a reload recovers
            log.error("cannot read the pointer file at start-up", extra={"error": str(e)})
            watch.fail(f"at start-up: {e}")
            name = None
        if name is None:
            log.warning("no artifact in %s: not ready until POST /admin/reload", settings.artifact_root)
        else:
            with contextlib.suppress(ReloadRefused):
                await swap_to(name, "startup")
        metrics.serving(holder.current.version if holder.current else None)
        if batcher is not None:
            await batcher.start()
        watcher = (
            asyncio.create_task(watch_pointer(settings, holder, swap_to, watch, metrics), name="jointpq-watch")
            if settings.watch
            else None
        )
        try:
            yield
        finally:
            if watcher is not None:
                watcher.cancel()
            if batcher is not None:
                await batcher.stop()
            executor.shutdown(wait=False, cancel_futures=True)

    app = FastAPI(
        title="jointpq",
        version="0.1.0",
        summary="Retrieval over a jointly learned IVF-PQ index (Poeem / JPQ).",
        lifespan=lifespan,
        responses={422: {"model": ErrorResponse, "description": "invalid request; `detail` names the field"}},
    )
    app.state.settings, app.state.holder, app.state.metrics = settings, holder, metrics
    metrics.watch_cache(lambda: holder.current.cache.stats() if holder.current and holder.current.cache else None)
    metrics.watch_watcher(lambda: watch.healthy(holder.current.name if holder.current else None))

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, e: ApiError) -> Response:
        return json_response(error_body(e.error, e.field), e.status, e.headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, e: RequestValidationError) -> Response:
        return invalid(list(e.errors()))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, e: StarletteHTTPException) -> Response:
        return json_response(error_body(str(e.detail)), e.status_code, getattr(e, "headers", None))

    # -- search ---------------------------------------------------------------------------------

    def batch_of(req: Any, one: str, many: str) -> tuple[list, str, bool]:
        """`[req.<one>]` or `req.<many>`, checked for emptiness (400) and size (413); the field to blame."""
        single = getattr(req, one) is not None
        items, field = ([getattr(req, one)], one) if single else (getattr(req, many), many)
        if not items:
            raise ApiError(400, f"{many} is empty: give at least one", field)
        if len(items) > settings.max_batch:
            raise ApiError(413, f"{many} holds {len(items)} {many}, at most {settings.max_batch}", field)
        return items, field, single

    def parse(req: Any, loaded: Loaded) -> tuple[list[str] | None, np.ndarray | None]:
        """The request's texts or vectors, checked against the serving artifact."""
        if req.query is not None or req.queries is not None:
            texts, field, single = batch_of(req, "query", "queries")
            for i, t in enumerate(texts):
                if not t.strip():
                    where = field if single else f"queries[{i}]"
                    raise ApiError(400, f"{where} is empty", where)
            if loaded.encoder is None:
                raise ApiError(400, f"artifact {loaded.version} has no query encoder: send vector or vectors", field)
            return texts, None
        rows, field, single = batch_of(req, "vector", "vectors")
        for i, row in enumerate(rows):
            if len(row) != loaded.dim:
                where = field if single else f"vectors[{i}]"
                raise ApiError(422, f"{where} has {len(row)} dimensions, the artifact expects {loaded.dim}", where)
        with np.errstate(over="ignore"):  # 1e39 is finite JSON and inf in float32: checked just below
            x = np.asarray(rows, dtype=np.float32)
        # Checked here, per request, before any batching: one bad vector must fail its own request
        # only, never the micro-batch it would have joined.
        norms = np.linalg.norm(x.astype(np.float64), axis=1)
        for i in np.flatnonzero(~np.isfinite(norms) | (norms > settings.max_vector_norm)):
            where = field if single else f"vectors[{i}]"
            what = (
                "values beyond float32's range (|x| > 3.4e38)"
                if not np.isfinite(x[i]).all()
                else (f"L2 norm {norms[i]:.3g}, above the limit {settings.max_vector_norm:.3g}")
            )
            raise ApiError(422, f"{where} has {what}", where)
        return None, x

    search_body = {
        "required": True,
        "content": {"application/json": {"schema": SearchRequest.model_json_schema(), "examples": SEARCH_EXAMPLES}},
    }

    @app.post(
        "/search",
        response_model=SearchResponse,
        responses={
            400: {"model": ErrorResponse, "description": "an empty query, or text for an artifact without an encoder"},
            413: {"model": ErrorResponse, "description": "too many queries in one request, or the body is too large"},
            503: {"model": ErrorResponse, "description": "no artifact loaded yet"},
        },
        openapi_extra={"requestBody": search_body},
        summary="Top-k item ids for text queries or query vectors",
    )
    async def search(request: Request) -> Response:
        if not is_json(request.scope["headers"]):
            return unsupported_media_type()
        return await answer_search(await request.body())

    async def run_piece(job: Job, after_another: bool) -> JobResult:
        """One engine call's worth of a request; pieces of one request run one after another."""
        if batcher is not None:
            return await batcher.submit(job)
        if job.texts is None and settings.inline_vector_search:
            if after_another:  # on the event loop: let it serve other requests between pieces
                await asyncio.sleep(0)
            return run_jobs([job], metrics.observe_batch)[0]
        loop = asyncio.get_running_loop()
        return (await loop.run_in_executor(executor, run_jobs, [job], metrics.observe_batch))[0]

    async def answer_search(body: bytes) -> Response:
        """The body goes to pydantic-core as bytes (the model is also the OpenAPI schema above):
        5x cheaper than FastAPI's JSON -> dict -> model for a 384-float vector. Errors come back
        as responses here, so the middleware's fast path needs no exception handlers."""
        t0 = time.perf_counter()
        try:
            req = SearchRequest.model_validate_json(body)
        except ValidationError as e:
            return invalid(e.errors(include_url=False))
        loaded = holder.current  # taken once: this request is answered by this artifact
        try:
            if loaded is None:
                raise ApiError(503, "not ready: no artifact loaded")
            texts, vectors = parse(req, loaded)
            job = Job(loaded, texts, vectors, req.k or settings.default_k, req.nprobe or settings.default_nprobe)
            try:
                pieces = split_job(job, settings.request_piece_queries, settings.request_piece_chars)
                result = JobResult.concat([await run_piece(p, i > 0) for i, p in enumerate(pieces)])
            except JointPQError as e:
                raise ApiError(400, str(e)) from None
        except ApiError as e:
            return json_response(error_body(e.error, e.field), e.status, e.headers)
        metrics.searched("text" if texts is not None else "vector", job.size)
        return json_response(
            {
                "version": loaded.version,
                "k": job.k,
                "nprobe": min(job.nprobe, loaded.nlist),
                "took_ms": round((time.perf_counter() - t0) * 1000, 3),
                "results": [{"ids": i, "scores": s} for s, i in zip(result.scores, result.ids, strict=True)],
            }
        )

    app.add_middleware(
        RequestMiddleware,
        metrics=metrics,
        max_body=settings.max_body_bytes,
        search=answer_search,
        body_timeout_s=settings.body_timeout_s,
    )

    # -- operations -------------------------------------------------------------------------------

    @app.get("/healthz", summary="Liveness: the process answers")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz", summary="Readiness: an artifact is loaded, warmed", responses={503: {"model": ErrorResponse}})
    async def readyz() -> Response:
        cur = holder.current
        if cur is None:
            return json_response(error_body("not ready: no artifact loaded"), 503)
        body: dict[str, Any] = {"status": "ready", "version": cur.version}
        if watch.enabled:  # shown, not gating: the loaded artifact serves whatever the pointer holds
            body["watch"] = "healthy" if watch.healthy(cur.name) else f"unhealthy: {watch.last_error or 'not running'}"
        return json_response(body)

    @app.get("/info", response_model=InfoResponse, summary="The artifact being served, device, backend, uptime")
    async def info() -> Response:
        cur, prev = holder.current, holder.previous
        public = {
            "artifact_root": str(settings.artifact_root),
            "device": settings.device,
            "backend": settings.backend,
            # the engine path requests really take (inline applies only with batching off)
            "engine_mode": "on" if settings.batching else ("inline" if settings.inline_vector_search else "off"),
            "batching": settings.batching,
            "batch_max_queries": settings.batch_max_queries,
            "batch_wait_ms": settings.batch_wait_ms,
            "inline_vector_search": settings.inline_vector_search,
            "search_threads": settings.search_threads,
            "torch_threads": settings.torch_threads,
            "workers": settings.workers,
            "default_k": settings.default_k,
            "max_k": settings.max_k,
            "default_nprobe": settings.default_nprobe,
            "max_batch": settings.max_batch,
            "query_cache_size": settings.query_cache_size,
            "query_cache_bytes": settings.query_cache_bytes,
            "max_vector_norm": settings.max_vector_norm,
            "request_piece_queries": settings.request_piece_queries,
            "request_piece_chars": settings.request_piece_chars,
            "header_timeout_s": settings.header_timeout_s,
            "body_timeout_s": settings.body_timeout_s,
            "timeout_keep_alive_s": settings.timeout_keep_alive_s,
            "limit_concurrency": settings.limit_concurrency,
            "watch": settings.watch,
            "admin": settings.admin_token is not None,
        }
        return json_response(
            {
                "ready": cur is not None,
                "artifact": cur.summary() if cur else None,
                "previous_version": prev.version if prev else None,
                "uptime_s": round(time.time() - started, 3),
                "watch": watch.to_json(cur.name if cur else None),
                "settings": public,
            }
        )

    @app.get("/metrics", summary="Prometheus metrics", response_class=Response)
    async def metrics_route() -> Response:
        from prometheus_client import CONTENT_TYPE_LATEST

        return Response(metrics.export(), media_type=CONTENT_TYPE_LATEST)

    # -- admin ------------------------------------------------------------------------------------

    bearer = HTTPBearer(auto_error=False, description="JOINTPQ_ADMIN_TOKEN")

    async def admin(credentials: HTTPAuthorizationCredentials | None = Depends(bearer)) -> None:  # noqa: B008
        if settings.admin_token is None:
            raise ApiError(404, "admin endpoints are disabled: set JOINTPQ_ADMIN_TOKEN to enable them")
        if credentials is None:
            challenge = {"WWW-Authenticate": "Bearer"}
            raise ApiError(401, "admin token required (Authorization: Bearer ...)", headers=challenge)
        expected = settings.admin_token.get_secret_value().encode()
        if not hmac.compare_digest(credentials.credentials.encode(), expected):
            raise ApiError(403, "wrong admin token")

    admin_errors = {
        400: {"model": ErrorResponse, "description": "the path leaves the artifact root"},
        401: {"model": ErrorResponse},
        403: {"model": ErrorResponse},
        404: {"model": ErrorResponse, "description": "no such artifact, or admin disabled"},
        409: {"model": ErrorResponse, "description": "nothing to roll back to"},
    }

    reload_body = {
        "required": True,
        "content": {"application/json": {"schema": ReloadRequest.model_json_schema()}},
    }

    @app.post(
        "/admin/reload",
        response_model=ReloadResponse,
        responses={
            **admin_errors,
            415: {"model": ErrorResponse, "description": "the body is not application/json"},
            422: {"model": ErrorResponse, "description": "an invalid body, or the artifact failed a check"},
        },
        dependencies=[Depends(admin)],
        openapi_extra={"requestBody": reload_body},
        summary="Load, validate and atomically swap in another artifact version",
    )
    async def reload(request: Request) -> Response:
        # The body is read here, after the `admin` dependency: no declared body parameter, so
        # FastAPI does not parse it first, and a caller without the token learns nothing from
        # a 422 about the body (or costs us a parse).
        if not is_json(request.scope["headers"]):
            return unsupported_media_type()
        try:
            req = ReloadRequest.model_validate_json(await request.body())
        except ValidationError as e:
            return invalid(e.errors(include_url=False))
        t0 = time.perf_counter()
        try:
            new, old = await swap_to(req.name, "admin")
        except ReloadRefused as e:
            raise ApiError(e.status, e.reason, "version" if req.version is not None else "path") from None
        return json_response(
            {
                "version": new.version,
                "previous": old.version if old else None,
                "took_ms": round((time.perf_counter() - t0) * 1000, 3),
                "checks": new.checks,
            }
        )

    @app.post(
        "/admin/rollback",
        response_model=ReloadResponse,
        responses=admin_errors,
        dependencies=[Depends(admin)],
        summary="Swap back to the previous artifact",
    )
    async def rollback() -> Response:
        t0 = time.perf_counter()
        try:
            cur, prev = await holder.rollback()
        except ReloadRefused as e:
            raise ApiError(e.status, e.reason) from None
        metrics.rollbacks.inc()
        metrics.serving(cur.version)
        return json_response(
            {
                "version": cur.version,
                "previous": prev.version,
                "took_ms": round((time.perf_counter() - t0) * 1000, 3),
                "checks": cur.checks,
            }
        )

    return app


def app_from_env() -> FastAPI:
    """uvicorn factory (`uvicorn service.app:app_from_env --factory`): settings from JOINTPQ_* env vars.
    Runs in every worker process, so each one sets up the JSON logging itself."""
    from .logs import configure_logging

    settings = Settings()
    configure_logging(settings.log_level)
    return create_app(settings)
