"""Micro-batching: concurrent requests coalesced into one encode + one search call.

Encoding and IVF-PQ scanning cost far less per query in a batch (one transformer pass, one lookup
table build, one sweep over each probed cell for all queries in it), so under load the service
answers more queries per second by working on many at once. The batcher waits for a free worker,
then takes everything queued, up to `max_queries`, waiting at most `wait_s` for company (not at
all when the request is alone: nothing else waiting or running); a request never waits longer
than that plus the batch ahead of it.

A job carries the `Loaded` artifact its request saw, so a batch never mixes versions: jobs of
different versions (around a hot swap) run as separate groups.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .holder import Loaded

log = logging.getLogger("jointpq.service")


@dataclass(eq=False)
class Job:
    """One request's queries: texts to encode or vectors, all with the same k and nprobe."""

    loaded: Loaded
    texts: list[str] | None
    vectors: np.ndarray | None
    k: int
    nprobe: int
    future: asyncio.Future | None = field(default=None, repr=False)

    @property
    def size(self) -> int:
        return len(self.texts) if self.texts is not None else len(self.vectors)


@dataclass
class JobResult:
    scores: list[np.ndarray]
    ids: list[list[str]]
    coverage: dict | None = None  # a sharded index's {"answered", "shards", "partial"} (cluster.sharded)

    @classmethod
    def concat(cls, parts: list[JobResult]) -> JobResult:
        covers = [p.coverage for p in parts if p.coverage is not None]
        coverage = min(covers, key=lambda c: c["answered"]) if covers else None  # the worst piece speaks
        return cls([s for p in parts for s in p.scores], [i for p in parts for i in p.ids], coverage)


def split_job(job: Job, max_queries: int, max_chars: int) -> list[Job]:
    """`job` cut, in order, into pieces of at most `max_queries` queries and (for text) about
    `max_chars` characters, the encoder's cost proxy; a lone longer text is a piece of its own.

    Why: a request of 256 long texts with k = 1000 is one long engine call, and every small
    request behind it waited for all of it (14 s measured). Run piece by piece, with the next
    piece queued only when the previous one is done, other requests' work goes between pieces,
    so a small request waits for at most one piece."""
    if job.texts is None:
        cuts = list(range(0, job.size, max_queries))
    else:
        cuts, chars, count = [0], 0, 0
        for i, t in enumerate(job.texts):
            if count and (count == max_queries or chars + len(t) > max_chars):
                cuts.append(i)
                chars, count = 0, 0
            chars, count = chars + len(t), count + 1
    if len(cuts) == 1:
        return [job]
    bounds = [*cuts, job.size]
    return [
        Job(
            job.loaded,
            job.texts[a:b] if job.texts is not None else None,
            job.vectors[a:b] if job.vectors is not None else None,
            job.k,
            job.nprobe,
        )
        for a, b in itertools.pairwise(bounds)
    ]


Observer = Callable[[int, int, float], None]  # (requests, queries, seconds) per engine call


def run_jobs(jobs: list[Job], observe: Observer | None = None) -> list[JobResult]:
    """Encode all texts of `jobs` at once, then one search per distinct nprobe (k = the largest
    asked, cut per job). All jobs must share one `Loaded`. Blocking: runs in a worker thread."""
    t0 = time.perf_counter()
    loaded = jobs[0].loaded
    texts = [t for j in jobs if j.texts is not None for t in j.texts]
    encoded = loaded.encode(texts) if texts else None
    vecs, off = [], 0
    for j in jobs:
        if j.texts is not None:
            vecs.append(encoded[off : off + len(j.texts)])
            off += len(j.texts)
        else:
            vecs.append(j.vectors)
    out: list[JobResult | None] = [None] * len(jobs)
    by_nprobe: dict[int, list[int]] = {}
    for i, j in enumerate(jobs):
        by_nprobe.setdefault(min(j.nprobe, loaded.nlist), []).append(i)
    view = loaded.live.view  # one view for the whole batch: a write lands wholly before or after it
    for nprobe, members in by_nprobe.items():
        x = np.concatenate([vecs[i] for i in members]).astype(np.float32, copy=False)
        scores, ids, coverage = search_view(view, x, max(jobs[i].k for i in members), nprobe)
        start = 0
        for i in members:
            n, k = jobs[i].size, jobs[i].k
            out[i] = JobResult([s[:k] for s in scores[start : start + n]], [r[:k] for r in ids[start : start + n]],
                               coverage)  # fmt: skip
            start += n
    if observe is not None:
        observe(len(jobs), sum(j.size for j in jobs), time.perf_counter() - t0)
    return out  # type: ignore[return-value]


def search_view(view: Any, x: np.ndarray, k: int, nprobe: int) -> tuple[list[np.ndarray], list[list[str]], dict | None]:
    """Per query the scores and ids of its hits, best first, and the coverage when the view is
    sharded (`cluster.sharded.ShardedView.search_covered`: which shards answered in time)."""
    covered = getattr(view, "search_covered", None)
    if covered is not None:
        return covered(x, k, nprobe)
    scores, ids = view.search(x, k, nprobe)
    return scores, ids, None


class MicroBatcher:
    """Queue + one collector task; batches run on `executor` (`workers` at a time)."""

    def __init__(
        self, executor: Executor, workers: int, max_queries: int, wait_s: float, observe: Observer | None = None
    ):
        self.executor, self.max_queries, self.wait_s, self.observe = executor, max_queries, wait_s, observe
        self.workers = workers
        self._queue: asyncio.Queue[Job] | None = None
        self._carry: deque[Job] = deque()
        self._slots: asyncio.Semaphore | None = None
        self._task: asyncio.Task | None = None
        self._running: set[asyncio.Task] = set()
        self._waiting = 0  # requests submitted and not yet answered

    async def start(self) -> None:
        self._queue, self._slots = asyncio.Queue(), asyncio.Semaphore(self.workers)
        self._task = asyncio.create_task(self._collect(), name="jointpq-batcher")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._running:
            await asyncio.gather(*self._running, return_exceptions=True)

    async def submit(self, job: Job) -> JobResult:
        if self._queue is None:
            raise RuntimeError("batcher not started")
        job.future = asyncio.get_running_loop().create_future()
        self._waiting += 1
        self._queue.put_nowait(job)
        try:
            return await job.future
        finally:
            self._waiting -= 1

    def _take(self, batch: list[Job], n: int) -> int:
        """Move queued jobs into `batch` up to `max_queries`; a job that does not fit starts the next."""
        while n < self.max_queries:
            if self._carry:
                job = self._carry.popleft()
            else:
                try:
                    job = self._queue.get_nowait()
                except asyncio.QueueEmpty:
                    break
            if n + job.size > self.max_queries:
                self._carry.appendleft(job)
                break
            batch.append(job)
            n += job.size
        return n

    async def _collect(self) -> None:
        while True:
            await self._slots.acquire()  # wait for a free worker first: meanwhile requests pile up
            try:
                first = self._carry.popleft() if self._carry else await self._queue.get()
            except BaseException:
                self._slots.release()
                raise
            batch = [first]
            n = self._take(batch, first.size)
            # wait once for company, only when other requests are in flight (load) and there is room;
            # a lone request goes at once. One sleep, not a timed get per job: cheap per request.
            if n < self.max_queries and self.wait_s > 0 and self._waiting > len(batch):
                await asyncio.sleep(self.wait_s)
                n = self._take(batch, n)
            task = asyncio.create_task(self._run(batch))
            self._running.add(task)
            task.add_done_callback(self._running.discard)

    async def _run(self, batch: list[Job]) -> None:
        loop = asyncio.get_running_loop()
        try:
            groups: dict[int, list[Job]] = {}
            for j in batch:  # one group per artifact version seen by the requests
                groups.setdefault(id(j.loaded), []).append(j)
            for jobs in groups.values():
                try:
                    results = await loop.run_in_executor(self.executor, run_jobs, jobs, self.observe)
                except Exception as e:
                    if len(jobs) == 1:
                        _settle(jobs[0], exception=e)
                        continue
                    # One request must never fail its batch-mates: answer them one by one, so
                    # only the request that cannot be served gets the error.
                    log.warning("a batch of %d requests failed (%s: %s): running them one by one",
                                len(jobs), type(e).__name__, e)  # fmt: skip
                    for j in jobs:
                        try:
                            _settle(j, (await loop.run_in_executor(self.executor, run_jobs, [j], self.observe))[0])
                        except Exception as alone:
                            _settle(j, exception=alone)
                    continue
                for j, r in zip(jobs, results, strict=True):
                    _settle(j, r)
        finally:
            self._slots.release()


def _settle(job: Job, result: JobResult | None = None, exception: BaseException | None = None) -> None:
    """Answer a job's future, unless its client went away (which cancelled it)."""
    if job.future is None or job.future.done():
        return
    if exception is not None:
        job.future.set_exception(exception)
    else:
        job.future.set_result(result)
