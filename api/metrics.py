"""Prometheus metrics of the API: ``GET /metrics``.

Two sources, one page:
* Per-process counters (requests, latency, long-polls held, 429s). Under gunicorn each request is
  served by one of several processes, so these use prometheus_client's multiprocess mode:
  ``pinfer/gunicorn_conf.py`` points PROMETHEUS_MULTIPROC_DIR at a folder of its own before it
  forks, and every scrape merges the files of all its processes (``MultiProcessCollector``).
  Without that variable (the Flask test client, ``flask run``) the ordinary registry is used.
* Redis state, read at scrape time by ``RedisCollector`` (queue depth per lane, pending images,
  unacked messages, jobs by status, workers by state): every API replica reports the same truth,
  so dashboards aggregate these with ``max``, never ``sum``.
"""
from __future__ import annotations

import os
import time

from flask import Flask, Response, g, request
from prometheus_client import (CONTENT_TYPE_LATEST, REGISTRY, CollectorRegistry, Counter, Gauge, Histogram,
                               generate_latest)
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from shared.schema import JOB_CANCELED, JOB_CLOSED, JOB_FINISHED, JOB_OPEN, WorkerState
from shared.store import Store

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)

REQUESTS = Counter("pinfer_http_requests_total", "HTTP requests answered, by route template, method and status.",
                   ["route", "method", "status"])
LATENCY = Histogram("pinfer_http_request_duration_seconds",
                    "Time from request start to response, by route template and method (long-polls included).",
                    ["route", "method"], buckets=LATENCY_BUCKETS)
LONGPOLLS = Gauge("pinfer_http_longpolls_held", "Long-polls (`?wait=`) waiting for a result right now.",
                  multiprocess_mode="livesum")
REJECTED = Counter("pinfer_http_overloaded_total",
                   "Submissions refused with 429 because a backpressure bound was reached, by scope "
                   "(global | job).", ["scope"])

JOB_STATUSES = (JOB_OPEN, JOB_CLOSED, JOB_FINISHED, JOB_CANCELED)
WORKER_STATES = tuple(WorkerState)

#: Families RedisCollector yields (the Grafana/static tests compare queries with these).
REDIS_METRICS = ("pinfer_queue_messages", "pinfer_pending_images", "pinfer_unacked_messages", "pinfer_jobs",
                 "pinfer_workers", "pinfer_redis_up")


class RedisCollector(Collector):
    """Reads queues, jobs and heartbeats from Redis at scrape time (a few pipelined round trips)."""

    def __init__(self, store: Store) -> None:
        self.store = store

    def collect(self):
        up = GaugeMetricFamily("pinfer_redis_up", "1 if the API could read Redis during this scrape.")
        try:
            depths = self.store.queue_depths()
            unacked = self.store.unacked_messages()
            jobs = self.store.job_status_counts()
            workers = self.store.live_workers()
        except Exception:  # Redis away: say so, and leave the rest out rather than report zeros
            up.add_metric([], 0)
            yield up
            return
        up.add_metric([], 1)
        yield up
        q = GaugeMetricFamily("pinfer_queue_messages", "Messages waiting in the broker queue of each lane.",
                              labels=["lane"])
        q.add_metric(["interactive"], depths["interactive"])
        q.add_metric(["bulk"], depths["bulk"])
        yield q
        yield GaugeMetricFamily("pinfer_pending_images", "Images accepted and not yet classified (the "
                                "PINFER_MAX_PENDING_IMAGES bound).", value=depths["pending_images"])
        yield GaugeMetricFamily("pinfer_unacked_messages", "Messages fetched by workers, not yet acknowledged.",
                                value=unacked)
        j = GaugeMetricFamily("pinfer_jobs", "Bulk jobs on record, by status.", labels=["status"])
        for status in JOB_STATUSES:
            j.add_metric([status], jobs.get(status, 0))
        yield j
        w = GaugeMetricFamily("pinfer_workers", "Worker processes with a fresh heartbeat, by state.",
                              labels=["state"])
        for state in WORKER_STATES:
            w.add_metric([state], sum(1 for x in workers if x.get("state") == state))
        yield w


def render(store: Store) -> bytes:
    """The text exposition of this API server: every process's counters + Redis state."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        from prometheus_client import multiprocess

        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
    else:
        registry = CollectorRegistry()
        registry.register(_Delegate(REGISTRY))
    registry.register(RedisCollector(store))
    return generate_latest(registry)


class _Delegate(Collector):
    """Lets a per-scrape registry include the process-wide one without registering twice in it."""

    def __init__(self, inner: CollectorRegistry) -> None:
        self.inner = inner

    def collect(self):
        return self.inner.collect()


def init_app(app: Flask) -> None:
    """Time every request and count it by route template (bounded label values, never raw paths)."""

    @app.before_request
    def _start() -> None:
        g.metrics_t0 = time.perf_counter()

    @app.after_request
    def _count(resp):
        t0 = g.pop("metrics_t0", None)
        if t0 is not None:
            route = request.url_rule.rule if request.url_rule is not None else "unmatched"
            LATENCY.labels(route, request.method).observe(time.perf_counter() - t0)
            REQUESTS.labels(route, request.method, str(resp.status_code)).inc()
        return resp

    @app.get("/metrics")
    def metrics() -> Response:
        from api.extensions import pinfer

        return Response(render(pinfer().store), mimetype=CONTENT_TYPE_LATEST)
