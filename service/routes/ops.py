"""Operations: liveness, readiness, what is being served, Prometheus metrics."""

# no `from __future__ import annotations`: FastAPI reads the routes' annotations at registration.
import time
from typing import Any

from fastapi import APIRouter, Request
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.responses import Response

from ..deps import HolderDep, MetricsDep, SettingsDep, WatchDep
from ..errors import NOT_READY, error_body, json_response
from ..schemas import ErrorResponse, InfoResponse

router = APIRouter()


@router.get("/healthz", summary="Liveness: the process answers")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


@router.get("/readyz", summary="Readiness: an artifact is loaded, warmed", responses={503: {"model": ErrorResponse}})
async def readyz(holder: HolderDep, watch: WatchDep) -> Response:
    cur = holder.current
    if cur is None:
        return json_response(error_body(NOT_READY), 503)
    body: dict[str, Any] = {"status": "ready", "version": cur.version}
    if watch.enabled:  # shown, not gating: the loaded artifact serves whatever the pointer holds
        body["watch"] = "healthy" if watch.healthy(cur.name) else f"unhealthy: {watch.last_error or 'not running'}"
    return json_response(body)


@router.get("/info", response_model=InfoResponse, summary="The artifact being served, device, backend, uptime")
async def info(request: Request, holder: HolderDep, settings: SettingsDep, watch: WatchDep) -> Response:
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
        "encoder_runtime": settings.encoder_runtime,
        "encoder_threads": settings.encoder_threads,
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
            "uptime_s": round(time.time() - request.app.state.started, 3),
            "watch": watch.to_json(cur.name if cur else None),
            "settings": public,
        }
    )


@router.get("/metrics", summary="Prometheus metrics", response_class=Response)
async def metrics_route(metrics: MetricsDep) -> Response:
    return Response(metrics.export(), media_type=CONTENT_TYPE_LATEST)
