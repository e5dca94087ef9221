"""Prometheus metrics of one worker process, served on ``PINFER_METRICS_PORT + slot``.

One endpoint per worker process, not per launcher: each Celery process is its own Python process
(pinned to its own core), so it can serve its own registry with no multiprocess files, and a
dead/restarted worker shows up in Prometheus as exactly that (its target goes down, its counters
restart). Slot N of a launcher listens on ``PINFER_METRICS_PORT + N`` (N = 0 .. workers-1); in
compose each container runs one worker, so every worker container serves the base port and
Prometheus finds them through the service's DNS name. Two launchers on one host need base ports
at least ``workers`` apart.

Everything here is in-process counters and histograms updated once per image or per batch (about
a microsecond each): no Redis round trip is added to the batch loop.
"""
from __future__ import annotations

import logging

from typing import Callable

from prometheus_client import REGISTRY, Counter, Histogram, Info, start_http_server
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from shared.schema import WorkerState

log = logging.getLogger(__name__)

STAGE_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0)
STATES = tuple(WorkerState)

IMAGES = Counter("pinfer_worker_images_total", "Images finished by this worker, by lane, outcome "
                 "(succeeded | failed) and error code (`none` when succeeded).", ["lane", "outcome", "code"])
BATCH_SIZE = Histogram("pinfer_worker_batch_size", "Images per forward pass.",
                       buckets=(1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64))
QUEUE_WAIT = Histogram("pinfer_worker_queue_wait_seconds", "Per image: from acceptance by the API to its "
                       "claim by a worker, by lane.", ["lane"], buckets=STAGE_BUCKETS)
PREPROCESS = Histogram("pinfer_worker_preprocess_seconds", "Per image: decode + resize + normalise.",
                       buckets=STAGE_BUCKETS)
INFERENCE = Histogram("pinfer_worker_inference_seconds", "Per image: the forward pass it was part of.",
                      buckets=STAGE_BUCKETS)
END_TO_END = Histogram("pinfer_worker_end_to_end_seconds", "Per image: from acceptance by the API to its "
                       "result stored, by lane.", ["lane"], buckets=STAGE_BUCKETS)
REDELIVERIES = Counter("pinfer_worker_redeliveries_total", "Images claimed again after an earlier delivery "
                       "(a worker died or a message was restored).")
DEFERRED = Counter("pinfer_worker_deferred_total", "Bulk images handed back to the buffer because "
                   "interactive work was waiting.")
REPUBLISHED = Counter("pinfer_worker_sweeper_republished_total", "Accepted images whose message was lost and "
                      "that this worker's sweeper published again.")
MODEL = Info("pinfer_worker_model", "The model this worker serves: name, sha256, runtime, precision, pretrained.")

#: Every family name this module exposes (text names; counters gain `_total`), for the static tests.
NAMES = ("pinfer_worker_images_total", "pinfer_worker_batch_size", "pinfer_worker_queue_wait_seconds",
         "pinfer_worker_preprocess_seconds", "pinfer_worker_inference_seconds",
         "pinfer_worker_end_to_end_seconds", "pinfer_worker_redeliveries_total", "pinfer_worker_deferred_total",
         "pinfer_worker_sweeper_republished_total", "pinfer_worker_state", "pinfer_worker_model_info")


def serve(base_port: int, slot: int) -> int | None:
    """Start this process's /metrics endpoint on ``base_port + slot``; None when off or the port is taken.

    A taken port is logged, not fatal: metrics are never a reason to stop classifying.
    """
    if not base_port:
        return None
    port = base_port + slot
    try:
        start_http_server(port)
    except OSError as exc:
        log.warning("worker metrics endpoint not started: port %d: %s (PINFER_METRICS_PORT + slot %d)",
                    port, exc, slot)
        return None
    log.info("worker metrics on :%d/metrics", port)
    return port


class _StateCollector(Collector):
    """The worker state, read from the worker's own state at scrape time (nothing to update in the
    batch loop): one series per state, 1 for the current one."""

    def __init__(self, get_state: Callable[[], str]) -> None:
        self.get_state = get_state

    def collect(self):
        current = self.get_state()
        g = GaugeMetricFamily("pinfer_worker_state", "What this worker process is doing (1 = current state).",
                              labels=["state"])
        for state in STATES:
            g.add_metric([state], 1.0 if state == current else 0.0)
        yield g


_state_collector: _StateCollector | None = None


def watch_state(get_state: Callable[[], str]) -> None:
    """Report ``get_state()`` as pinfer_worker_state (a second call only swaps the source)."""
    global _state_collector
    if _state_collector is None:
        _state_collector = _StateCollector(get_state)
        REGISTRY.register(_state_collector)
    else:
        _state_collector.get_state = get_state


def set_model(name: str, sha256: str, runtime: str, precision: str, pretrained: bool, worker: str,
              core: str) -> None:
    MODEL.info({"model": name, "sha256": sha256, "runtime": runtime, "precision": precision,
                "pretrained": "true" if pretrained else "false", "worker": worker, "core": core})
