"""The FastAPI app: `create_app(settings)` builds one; `jointpq serve` runs it under uvicorn.

Routes: POST /search; GET /healthz, /readyz, /info, /metrics; POST /admin/reload, /admin/rollback
(bearer token). Every error is JSON ``{"error": ..., "detail": [{"field", "message"}]}`` naming
the field at fault; no stack trace ever leaves the process.

Where things are: the routers in service/routes/, their dependencies in service/deps.py, errors
and their statuses in service/errors.py, search parsing and execution in service/engine.py, the
ASGI middleware (body limits, metrics, access log, the /search fast path) in service/middleware.py.
Here: the per-app objects (on `app.state`, where the routers read them), lifespan, wiring.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from index.pointer import PointerError

from .engine import SearchEngine
from .errors import install_handlers
from .holder import IndexHolder, ReloadRefused, swap_to
from .items import follow_log, live_status
from .metrics import Metrics
from .middleware import RequestMiddleware
from .routes import admin, items, ops, search
from .schemas import ErrorResponse, item_models
from .settings import Settings
from .watch import WatchStatus, watch_pointer

log = logging.getLogger("jointpq.service")


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    """Start-up: torch threads, the first artifact (the configured one, else the pointer's; the
    app starts unready rather than not at all when there is none or it is refused), the batcher,
    the pointer watcher. Shutdown stops them in reverse."""
    settings: Settings = app.state.settings
    holder: IndexHolder = app.state.holder
    metrics: Metrics = app.state.metrics
    engine: SearchEngine = app.state.engine
    watch: WatchStatus = app.state.watch
    swap = functools.partial(swap_to, holder, metrics)
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
            await swap(name, "startup")
    metrics.serving(holder.current.version if holder.current else None)
    await engine.start()
    watcher = (
        asyncio.create_task(watch_pointer(settings, holder, swap, watch, metrics), name="jointpq-watch")
        if settings.watch
        else None
    )
    follower = asyncio.create_task(follow_log(settings, holder, swap), name="jointpq-follow-log")
    try:
        yield
    finally:
        follower.cancel()
        if watcher is not None:
            watcher.cancel()
        await engine.stop()


def create_app(settings: Settings | None = None, holder: IndexHolder | None = None) -> FastAPI:
    """The app over `holder` (default: an `IndexHolder` loading whole artifacts; the cluster
    router passes one whose artifacts are shard sets served by Ray Serve deployments)."""
    settings = settings or Settings()
    metrics = Metrics()
    holder = holder or IndexHolder(settings)
    engine = SearchEngine(settings, holder, metrics)
    watch = WatchStatus(enabled=settings.watch)
    app = FastAPI(
        title="jointpq",
        version="0.1.0",
        summary="Retrieval over a jointly learned IVF-PQ index (Poeem / JPQ).",
        lifespan=lifespan,
        responses={422: {"model": ErrorResponse, "description": "invalid request; `detail` names the field"}},
    )
    app.state.settings, app.state.holder, app.state.metrics = settings, holder, metrics
    app.state.engine, app.state.watch, app.state.started = engine, watch, time.time()
    metrics.watch_cache(lambda: holder.current.cache.stats() if holder.current and holder.current.cache else None)
    metrics.watch_watcher(lambda: watch.healthy(holder.current.name if holder.current else None))
    metrics.watch_live(lambda: live_status(holder.current))
    install_handlers(app)
    routers = (search.router(engine.request_model), ops.router, admin.router, items.router(*item_models(settings)))
    for router in routers:
        app.include_router(router)
    app.add_middleware(
        RequestMiddleware,
        metrics=metrics,
        max_body=settings.max_body_bytes,
        search=engine.answer,
        routes={route.path for router in routers for route in router.routes},
        body_timeout_s=settings.body_timeout_s,
    )
    return app


def app_from_env() -> FastAPI:
    """uvicorn factory (`uvicorn service.app:app_from_env --factory`): settings from JOINTPQ_* env vars.
    Runs in every worker process, so each one sets up the JSON logging itself."""
    from .logs import configure_logging

    settings = Settings()
    configure_logging(settings.log_level)
    return create_app(settings)
