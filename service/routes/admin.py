"""Admin: hot-reload another artifact version, roll back to the previous one. Every route on
this router needs the admin bearer token (`service.deps.require_admin`)."""

# no `from __future__ import annotations`: FastAPI reads the routes' annotations at registration.
import time

from fastapi import APIRouter, Depends, Request
from pydantic import ValidationError
from starlette.responses import Response

from ..deps import HolderDep, MetricsDep, require_admin
from ..errors import api_error, invalid, json_response, unsupported_media_type
from ..holder import ReloadRefused, swap_to
from ..middleware import is_json
from ..schemas import ErrorResponse, ReloadRequest, ReloadResponse

router = APIRouter(prefix="/admin", dependencies=[Depends(require_admin)])

ADMIN_ERRORS = {
    400: {"model": ErrorResponse, "description": "the path leaves the artifact root"},
    401: {"model": ErrorResponse},
    403: {"model": ErrorResponse},
    404: {"model": ErrorResponse, "description": "no such artifact, or admin disabled"},
    409: {"model": ErrorResponse, "description": "nothing to roll back to"},
}

RELOAD_BODY = {
    "required": True,
    "content": {"application/json": {"schema": ReloadRequest.model_json_schema()}},
}


@router.post(
    "/reload",
    response_model=ReloadResponse,
    responses={
        **ADMIN_ERRORS,
        415: {"model": ErrorResponse, "description": "the body is not application/json"},
        422: {"model": ErrorResponse, "description": "an invalid body, or the artifact failed a check"},
    },
    openapi_extra={"requestBody": RELOAD_BODY},
    summary="Load, validate and atomically swap in another artifact version",
)
async def reload(request: Request, holder: HolderDep, metrics: MetricsDep) -> Response:
    # The body is read here, after the `require_admin` dependency: no declared body parameter,
    # so FastAPI does not parse it first, and a caller without the token learns nothing from
    # a 422 about the body (or costs us a parse).
    if not is_json(request.scope["headers"]):
        return unsupported_media_type()
    try:
        req = ReloadRequest.model_validate_json(await request.body())
    except ValidationError as e:
        return invalid(e.errors(include_url=False))
    t0 = time.perf_counter()
    try:
        new, old = await swap_to(holder, metrics, req.name, "admin")
    except ReloadRefused as e:
        raise api_error(e, "version" if req.version is not None else "path") from None
    return json_response(
        {
            "version": new.version,
            "previous": old.version if old else None,
            "took_ms": round((time.perf_counter() - t0) * 1000, 3),
            "checks": new.checks,
        }
    )


@router.post(
    "/rollback",
    response_model=ReloadResponse,
    responses=ADMIN_ERRORS,
    summary="Swap back to the previous artifact",
)
async def rollback(holder: HolderDep, metrics: MetricsDep) -> Response:
    t0 = time.perf_counter()
    try:
        cur, prev = await holder.rollback()
    except ReloadRefused as e:
        raise api_error(e) from None
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
