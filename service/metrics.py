"""Prometheus metrics (prometheus-client), one registry per app so several apps in one process
(tests, embedding) never share counters. With several uvicorn workers each process exports its
own series: scrape each replica, or put the replicas behind a load balancer and sum by instance."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info, generate_latest

LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)


class Metrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.requests = Counter(
            "jointpq_http_requests", "HTTP requests by route, method, status", ["route", "method", "status"], registry=r
        )
        self.latency = Histogram(
            "jointpq_http_request_duration_seconds", "HTTP request latency by route", ["route"],
            buckets=LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self.search_latency = Histogram(
            "jointpq_search_duration_seconds", "encode + search time of one engine call (one batch)",
            buckets=LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self.batch_queries = Histogram(
            "jointpq_batch_queries", "queries per engine call", buckets=BATCH_BUCKETS, registry=r
        )
        self.batch_requests = Histogram(
            "jointpq_batch_requests", "requests coalesced into one engine call", buckets=BATCH_BUCKETS, registry=r
        )
        self.queries = Counter("jointpq_queries", "queries searched", ["kind"], registry=r)
        self.artifact = Info("jointpq_artifact", "the artifact being served", registry=r)
        self.ready = Gauge("jointpq_ready", "1 when an artifact is loaded and warmed", registry=r)
        self.reloads = Counter("jointpq_reloads", "reload attempts by result", ["result"], registry=r)
        self.rollbacks = Counter("jointpq_rollbacks", "rollbacks to the previous artifact", registry=r)
        self.watch_errors = Counter(
            "jointpq_watch_errors", "pointer-watch checks that failed (unreadable pointer, crashed load)", registry=r
        )
        self.item_updates = Counter(
            "jointpq_item_updates", "items written through POST /admin/items[/delete]", ["op"], registry=r
        )
        self.item_update_latency = Histogram(
            "jointpq_item_update_duration_seconds", "validate + encode + log (fsync) + apply of one write batch",
            buckets=LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self._children: dict[tuple, object] = {}

    def _child(self, metric, *labels: str):
        """`metric.labels(*labels)`, kept: labels() re-validates its values on every call."""
        key = (id(metric), *labels)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(*labels)
        return child

    def request_done(self, route: str, method: str, status: int, seconds: float) -> None:
        self._child(self.requests, route, method, str(status)).inc()
        self._child(self.latency, route).observe(seconds)

    def searched(self, kind: str, n: int) -> None:
        self._child(self.queries, kind).inc(n)

    def watch_cache(self, stats) -> None:
        """Expose the serving artifact's query-cache counters (`stats()` -> dict or None) at scrape time."""
        for key in ("hits", "misses", "size", "bytes"):
            g = Gauge(f"jointpq_query_cache_{key}", f"query embedding cache {key} (since the artifact loaded)",
                      registry=self.registry)  # fmt: skip
            g.set_function(lambda key=key: float((stats() or {}).get(key, 0)))

    def watch_watcher(self, healthy) -> None:
        """`jointpq_watch_healthy`: 1 while the pointer watcher reads the pointer and serves what it
        names (or is off), 0 otherwise; `healthy()` is read at scrape time."""
        g = Gauge("jointpq_watch_healthy", "1 when the pointer watcher is healthy or off", registry=self.registry)
        g.set_function(lambda: 1.0 if healthy() else 0.0)

    def watch_live(self, live) -> None:
        """Live-update and drift gauges of the served artifact, read at scrape time from `live()`
        -> (view stats, drift report) or None: what an operator watches to compact or retrain."""

        def get(*path: str) -> float:
            cur = live()
            for p in path:
                cur = cur.get(p) if isinstance(cur, dict) else None
            return float(cur) if isinstance(cur, (int, float)) else float("nan")

        gauges = {
            "jointpq_live_items": ("items searchable now (base - deleted + delta)", ("live", "live_items")),
            "jointpq_delta_items": ("items in the delta segment (compact folds them in)", ("live", "delta_items")),
            "jointpq_deleted_base_items": ("tombstoned base items", ("live", "deleted_base_items")),
            "jointpq_applied_seq": ("last item-update log record applied", ("live", "applied_seq")),
            "jointpq_drift_distortion_ratio": (
                "new items' mean quantization distortion / the trained items' (> 1.5: retrain advised)",
                ("drift", "distortion_ratio"),
            ),
            "jointpq_drift_cells_max_over_mean": (
                "largest coarse cell / mean cell size, live items",
                ("drift", "cells_now", "max_over_mean"),
            ),
            "jointpq_drift_empty_cells": ("coarse cells with no live item", ("drift", "cells_now", "empty_cells")),
        }
        for name, (doc, path) in gauges.items():
            Gauge(name, doc, registry=self.registry).set_function(lambda path=path: get(*path))

    def observe_batch(self, requests: int, queries: int, seconds: float) -> None:
        self.batch_requests.observe(requests)
        self.batch_queries.observe(queries)
        self.search_latency.observe(seconds)

    def serving(self, version: str | None) -> None:
        self.artifact.info({"version": version or ""})
        self.ready.set(1 if version else 0)

    def export(self) -> bytes:
        return generate_latest(self.registry)
