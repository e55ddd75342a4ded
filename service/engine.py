"""Answering a search: the request body parsed and checked against the serving artifact, run on
the engine (micro-batched, inline on the event loop, or one worker-thread call per request, as
the settings say), the JSON answer or error built.

One `SearchEngine` per app serves both ways a POST /search arrives: the ASGI middleware's fast
path (`RequestMiddleware`, no routing) and the documented FastAPI route. Both call
`SearchEngine.answer`, so they give the same answers and errors."""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
from pydantic import ValidationError
from starlette.responses import Response

from index import JointPQError

from .batching import Job, JobResult, MicroBatcher, run_jobs, split_job
from .errors import NOT_READY, ApiError, api_error, error_response, invalid, json_response
from .holder import IndexHolder, Loaded
from .metrics import Metrics
from .schemas import search_request_model
from .settings import Settings


def batch_of(req: Any, one: str, many: str, max_batch: int) -> tuple[list, str, bool]:
    """`[req.<one>]` or `req.<many>`, checked for emptiness (400) and size (413); the field to blame."""
    single = getattr(req, one) is not None
    items, field = ([getattr(req, one)], one) if single else (getattr(req, many), many)
    if not items:
        raise ApiError(400, f"{many} is empty: give at least one", field)
    if len(items) > max_batch:
        raise ApiError(413, f"{many} holds {len(items)} {many}, at most {max_batch}", field)
    return items, field, single


def parse(req: Any, loaded: Loaded, settings: Settings) -> tuple[list[str] | None, np.ndarray | None]:
    """The request's texts or vectors, checked against the serving artifact."""
    if req.query is not None or req.queries is not None:
        texts, field, single = batch_of(req, "query", "queries", settings.max_batch)
        for i, t in enumerate(texts):
            if not t.strip():
                where = field if single else f"queries[{i}]"
                raise ApiError(400, f"{where} is empty", where)
        if loaded.encoder is None:
            raise ApiError(400, f"artifact {loaded.version} has no query encoder: send vector or vectors", field)
        return texts, None
    rows, field, single = batch_of(req, "vector", "vectors", settings.max_batch)
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


class SearchEngine:
    """The search threads, the micro-batcher (when `settings.batching`) and the request model
    (built from the settings, so its limits show in the OpenAPI schema). `start`/`stop` follow
    the app's lifespan."""

    def __init__(self, settings: Settings, holder: IndexHolder, metrics: Metrics):
        self.settings, self.holder, self.metrics = settings, holder, metrics
        self.request_model = search_request_model(settings)
        self.executor = ThreadPoolExecutor(settings.search_threads, thread_name_prefix="jointpq-search")
        self.batcher = (
            MicroBatcher(
                self.executor,
                settings.search_threads,
                settings.batch_max_queries,
                settings.batch_wait_ms / 1000,
                metrics.observe_batch,
            )
            if settings.batching
            else None
        )

    async def start(self) -> None:
        if self.batcher is not None:
            await self.batcher.start()

    async def stop(self) -> None:
        if self.batcher is not None:
            await self.batcher.stop()
        self.executor.shutdown(wait=False, cancel_futures=True)

    async def run_piece(self, job: Job, after_another: bool) -> JobResult:
        """One engine call's worth of a request; pieces of one request run one after another."""
        if self.batcher is not None:
            return await self.batcher.submit(job)
        if job.texts is None and self.settings.inline_vector_search:
            if after_another:  # on the event loop: let it serve other requests between pieces
                await asyncio.sleep(0)
            return run_jobs([job], self.metrics.observe_batch)[0]
        loop = asyncio.get_running_loop()
        return (await loop.run_in_executor(self.executor, run_jobs, [job], self.metrics.observe_batch))[0]

    async def answer(self, body: bytes) -> Response:
        """The body goes to pydantic-core as bytes (the model is also the OpenAPI schema):
        5x cheaper than FastAPI's JSON -> dict -> model for a 384-float vector. Errors come back
        as responses here, so the middleware's fast path needs no exception handlers."""
        t0 = time.perf_counter()
        settings = self.settings
        try:
            req = self.request_model.model_validate_json(body)
        except ValidationError as e:
            return invalid(e.errors(include_url=False))
        loaded = self.holder.current  # taken once: this request is answered by this artifact
        try:
            if loaded is None:
                raise ApiError(503, NOT_READY)
            texts, vectors = parse(req, loaded, settings)
            job = Job(loaded, texts, vectors, req.k or settings.default_k, req.nprobe or settings.default_nprobe)
            try:
                pieces = split_job(job, settings.request_piece_queries, settings.request_piece_chars)
                result = JobResult.concat([await self.run_piece(p, i > 0) for i, p in enumerate(pieces)])
            except JointPQError as e:
                raise api_error(e) from None
        except ApiError as e:
            return error_response(e)
        self.metrics.searched("text" if texts is not None else "vector", job.size)
        body = {
            "version": loaded.version,
            "k": job.k,
            "nprobe": min(job.nprobe, loaded.nlist),
            "took_ms": round((time.perf_counter() - t0) * 1000, 3),
            "results": [{"ids": i, "scores": s} for s, i in zip(result.scores, result.ids, strict=True)],
        }
        if result.coverage is not None:
            body["coverage"] = result.coverage
        return json_response(body)
