"""Live items: upsert and delete single items in the running service, and fold the changes into a
new artifact version (compaction). Every route needs the admin bearer token.

The write path (`service.items.ItemWriter`): validate the whole batch, encode its texts with the
served artifact's item tower in the engine's thread pool (never on the event loop), append it to
the write-ahead log and fsync, apply it to the served view, answer. A refused batch changes
nothing; an answered one survives kill -9 and is seen by every later search on this worker.
"""

# no `from __future__ import annotations`: FastAPI reads the routes' annotations at registration.
import asyncio
import time
from typing import Any

from fastapi import APIRouter, Depends, Request
from pydantic import BaseModel, ValidationError
from starlette.responses import Response

from index import JointPQError
from index.pointer import publish

from ..deps import EngineDep, HolderDep, MetricsDep, SettingsDep, require_admin
from ..errors import NOT_READY, ApiError, error_body, invalid, json_response, unsupported_media_type
from ..holder import ReloadRefused, swap_to
from ..items import ItemError
from ..middleware import is_json
from ..schemas import CompactResponse, DeleteResponse, ErrorResponse, UpsertResponse

ITEM_ERRORS: dict[int | str, dict[str, Any]] = {
    401: {"model": ErrorResponse},
    403: {"model": ErrorResponse},
    404: {"model": ErrorResponse, "description": "admin disabled"},
    413: {"model": ErrorResponse, "description": "more items than max_batch, or the body is too large"},
    415: {"model": ErrorResponse, "description": "the body is not application/json"},
    422: {"model": ErrorResponse, "description": "a bad item; `detail` names it (nothing of the batch is applied)"},
    503: {"model": ErrorResponse, "description": "no artifact loaded yet, or the item log cannot be written"},
}


async def _parse(request: Request, model: type[BaseModel], many: str, max_batch: int) -> Any:
    """The validated body, or an error Response: 415 not JSON, 413 over `max_batch`, 422 naming the field."""
    if not is_json(request.scope["headers"]):
        return unsupported_media_type()
    try:
        return model.model_validate_json(await request.body())
    except ValidationError as e:
        errors = e.errors(include_url=False)
        if any(err["type"] == "too_long" and tuple(err["loc"]) == (many,) for err in errors):
            return json_response(error_body(f"at most {max_batch} {many} per request", many), 413)
        return invalid(errors)


def _loaded(holder: Any) -> Any:
    cur = holder.current
    if cur is None:
        raise ApiError(503, NOT_READY)
    return cur


async def _run(engine: Any, fn: Any, *args: Any) -> Any:
    """Run a blocking write in the engine's thread pool; its refusals become 4xx/503 naming the field."""
    loop = asyncio.get_running_loop()
    try:
        return await loop.run_in_executor(engine.executor, fn, *args)
    except ItemError as e:
        raise ApiError(e.status, str(e), e.field) from None
    except JointPQError as e:  # the log could not be read: nothing was acknowledged
        raise ApiError(503, f"item update not applied: {e}") from None
    except OSError as e:  # the log could not be written (disk full, read-only, permissions)
        raise ApiError(503, f"item update not applied: the item log cannot be written ({e.strerror or e})") from None


def router(upsert_model: type[BaseModel], delete_model: type[BaseModel]) -> APIRouter:
    """The router for one app: the request schemas carry its settings' limits."""
    r = APIRouter(prefix="/admin", dependencies=[Depends(require_admin)])
    compacting = asyncio.Lock()  # one compaction at a time per app (each writes a version)

    async def write(request: Request, holder: Any, engine: Any, settings: Any, metrics: Any, op: str) -> Response:
        """Parse, then run the writer's `op` in the engine's pool; counted and timed by op."""
        model, many, done = (upsert_model, "items", "upserted") if op == "upsert" else (delete_model, "ids", "deleted")
        req = await _parse(request, model, many, settings.max_batch)
        if isinstance(req, Response):
            return req
        loaded = _loaded(holder)
        t0 = time.perf_counter()
        out = await _run(engine, getattr(holder.writer, op), loaded, getattr(req, many))
        metrics.item_updates.labels(op).inc(out[done])
        metrics.item_update_latency.observe(time.perf_counter() - t0)
        return json_response(out)

    async def upsert_items(
        request: Request, holder: HolderDep, engine: EngineDep, settings: SettingsDep, metrics: MetricsDep
    ) -> Response:
        return await write(request, holder, engine, settings, metrics, "upsert")

    async def delete_items(
        request: Request, holder: HolderDep, engine: EngineDep, settings: SettingsDep, metrics: MetricsDep
    ) -> Response:
        return await write(request, holder, engine, settings, metrics, "delete")

    async def compact(holder: HolderDep, settings: SettingsDep, metrics: MetricsDep) -> Response:
        async with compacting:
            return await _compact(holder, settings, metrics)

    async def _compact(holder: Any, settings: Any, metrics: Any) -> Response:
        from ..compaction import write_compacted

        loaded = _loaded(holder)
        t0 = time.perf_counter()
        view = loaded.live.view
        if not hasattr(view, "compacted"):  # a sharded version (cluster/): its items live in the shards
            raise ApiError(409, f"{loaded.version} is served sharded: compact it offline (`jointpq compact"
                                " --artifact-root ...` on its root; the watching cluster then loads the result)")
        if not view.changed:
            return json_response(
                {"compacted": False, "version": loaded.version, "took_ms": round(1e3 * (time.perf_counter() - t0), 3)}
            )
        try:
            out = await asyncio.to_thread(write_compacted, settings.artifact_root, loaded.path, view)
            publish(settings.artifact_root, out.name, settings.pointer_file)
            new, old = await swap_to(holder, metrics, out.name, "compact")
            kept = await asyncio.to_thread(holder.writer.wal.trim, view.applied_seq)
        except ReloadRefused as e:
            raise ApiError(e.status, f"compaction refused: {e.reason}") from None
        except (JointPQError, ValueError, OSError) as e:
            raise ApiError(503, f"compaction failed, still serving {loaded.version}: {e}") from None
        return json_response(
            {
                "compacted": True,
                "version": new.version,
                "previous": old.version if old else None,
                "applied_seq": view.applied_seq,
                "log_records_kept": kept,
                "took_ms": round(1e3 * (time.perf_counter() - t0), 3),
            }
        )

    def body(model: type[BaseModel]) -> dict[str, Any]:
        content = {"application/json": {"schema": model.model_json_schema()}}
        return {"requestBody": {"required": True, "content": content}}

    r.add_api_route(
        "/items", upsert_items, methods=["POST"], response_model=UpsertResponse, responses=ITEM_ERRORS,
        openapi_extra=body(upsert_model),
        summary="Upsert items (text or vector): logged, fsync'd, searchable once answered",
    )  # fmt: skip
    r.add_api_route(
        "/items/delete", delete_items, methods=["POST"], response_model=DeleteResponse, responses=ITEM_ERRORS,
        openapi_extra=body(delete_model), summary="Delete items by id (unknown ids are reported, not an error)",
    )  # fmt: skip
    r.add_api_route(
        "/compact", compact, methods=["POST"], response_model=CompactResponse, responses=ITEM_ERRORS,
        summary="Fold the item-update log into a new artifact version, publish it, swap to it, trim the log",
    )  # fmt: skip
    return r
