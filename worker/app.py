"""The Celery worker application: ``celery -A worker.app worker --pool solo`` (see ``pinfer worker``).

The classify task is a celery-batches ``Batches`` task: messages (one prediction ID each) are
buffered and classified together. ``PriorityBatches`` adds three things (the celery-batches
internals they need live in ``worker.celery_adapter``, behind a version check):

* adaptive flushing (``worker.batching``): besides celery-batches' own triggers (PINFER_MAX_BATCH
  messages, or PINFER_MAX_WAIT_MS), the buffer is classified as soon as the broker has nothing more
  waiting for this worker, so a lone image never waits for the batch window;
* only the requests actually handled are acknowledged (bulk requests handed back because
  interactive work is waiting go back into the buffer, unacked);
* the model is loaded once per process in ``worker_process_init``, before any task is taken, and
  replaced between batches when a new one is rolled out (``worker.reload``, run from the consumer's
  timer: the thread that runs batches, so no batch mixes two models).
"""
from __future__ import annotations

import json
import logging
import os
import signal
import socket
import threading
import time
from typing import Any

from celery import signals

from shared import keys, logs
from shared.broker import make_celery
from shared.schema import SERVING, WorkerState
from shared.settings import Settings
from shared.store import Store
from worker.celery_adapter import AdaptiveBatches, check_versions, lane_of

log = logging.getLogger("pinfer.worker")
settings = Settings.from_env()
check_versions(settings.allow_untested_celery)  # refuse to start on library versions never verified
app = make_celery(settings, name="pinfer-worker")

_state: dict[str, Any] = {"classifier": None, "status": WorkerState.STARTING, "batches": 0, "images": 0}


class PriorityBatches(AdaptiveBatches):
    """The classify task's base: celery-batches plus pinfer's flush rule (worker.batching, built
    per process in ``worker_process_init``); the internals it needs live in worker.celery_adapter."""

    abstract = True

    def flush_rule(self):
        return _state["flush_rule"]

    def between_batches(self):
        from worker.reload import TICK_S

        return [(TICK_S, _maybe_reload)]


@app.task(base=PriorityBatches, name=keys.TASK_CLASSIFY, bind=True,
          flush_every=settings.max_batch, flush_interval=settings.max_wait_ms / 1000.0)
def classify(self, requests, may_defer: bool = True):
    from worker.classify import Item

    clf = _state["classifier"]
    items = [Item(pid=str(r.args[0]), lane=lane_of(r), tag=r.id) for r in requests if r.args]
    _state.update(status=WorkerState.BUSY, busy_since=time.monotonic())
    try:
        out = clf.run(items, may_defer=may_defer)
    finally:
        _state.update(status=WorkerState.READY, busy_since=None)
    _state["batches"] += 1
    _state["images"] += len(out.done)
    return {"deferred": [i.tag for i in out.deferred]}


def worker_name() -> str:
    core = os.environ.get("PINFER_WORKER_CORE", "x")
    return f"pinfer-c{core}-{os.getpid()}@{socket.gethostname()}"


@signals.worker_process_init.connect
def _load_model(**_: Any) -> None:
    """Load, verify and warm the model once per process; on failure report SETUP_FAILED and exit."""
    from worker import metrics
    from worker.batching import FlushRule
    from worker.classify import Classifier
    from worker.reload import Reloader
    from worker.runtime import ModelRuntime

    store = Store(settings)
    name = worker_name()
    logs.set_context(worker=name)
    _state.update(name=name, store=store, flush_rule=FlushRule(store.queued_by_lane))
    metrics.watch_state(lambda: _state["status"])
    metrics.serve(settings.metrics_port, int(os.environ.get("PINFER_WORKER_SLOT") or 0))
    _start_heartbeat(store, name)
    try:
        # Read before the model: a `pinfer reload` issued while it loads is acted on afterwards.
        generation = store.reload_generation()
    except Exception as exc:
        generation = 0
        log.warning("reload counter not read: %s", exc)
    try:
        t0 = time.perf_counter()
        runtime = ModelRuntime(settings)
        _state["runtime"] = runtime
        _state["reloader"] = Reloader(settings, runtime, generation)
        _state["classifier"] = Classifier(settings, store, runtime, name)
        metrics.set_model(runtime.info.name, runtime.info.sha256, getattr(runtime, "name", "torchscript"),
                          runtime.precision, runtime.info.pretrained, name, os.environ.get("PINFER_WORKER_CORE", ""))
        _state["status"] = WorkerState.READY
        try:  # announce it now, not at the next tick: /readyz and `pinfer up` wait for this
            store.heartbeat(name, _heartbeat_info())
        except Exception as exc:  # Redis away: the heartbeat thread keeps trying
            log.warning("heartbeat failed: %s", exc)
        log.info("model %s (%s, pretrained=%s, %s/%s, %d threads) ready in %.1fs", runtime.info.name,
                 runtime.info.sha256[:12], runtime.info.pretrained, runtime.precision, runtime.runtime,
                 runtime.threads, time.perf_counter() - t0)
        if not runtime.info.pretrained:
            log.warning("THIS MODEL WAS NOT BUILT FROM THE OFFICIAL WEIGHTS: its labels are meaningless "
                        "(run `pinfer export-model` with the official resnet18-f37072fd.pth)")
    except Exception as exc:
        _state.update(status=WorkerState.SETUP_FAILED, error=str(exc))
        store.heartbeat(name, _heartbeat_info())
        log.critical("worker setup failed: %s", exc)
        os._exit(3)


def _maybe_reload() -> None:
    """Between batches (the consumer's timer, in the thread that runs them): roll out a new model if
    the model folder changed or `pinfer reload` asked; the old one keeps serving if that fails."""
    from worker import metrics

    reloader = _state.get("reloader")
    if reloader is None or _state["status"] != WorkerState.READY:
        return
    try:
        reason = reloader.due()
        if reason is None:
            return
        # Watched like a batch: a load that hangs (a stalled volume) must not leave a worker that
        # counts as serving but never takes work; killed, it restarts with the new model.
        _state.update(status=WorkerState.RELOADING, busy_since=time.monotonic())
        _announce()
        swapped = reloader.reload(reason)
        if swapped:
            runtime = reloader.runtime
            _state["runtime"] = runtime
            _state["classifier"].runtime = runtime
            metrics.set_model(runtime.info.name, runtime.info.sha256, runtime.runtime, runtime.precision,
                              runtime.info.pretrained, _state["name"], os.environ.get("PINFER_WORKER_CORE", ""))
    except Exception:  # never let the roll-out machinery take the worker down: keep serving what it has
        log.exception("model reload check failed")
    finally:
        if _state["status"] == WorkerState.RELOADING:
            _state.update(status=WorkerState.READY, busy_since=None)
            _announce()  # before the next batch: /readyz and the result cache see the new sha at once


def _announce() -> None:
    try:
        _state["store"].heartbeat(_state["name"], _heartbeat_info())
    except Exception as exc:  # Redis away: the heartbeat thread keeps trying
        log.warning("heartbeat failed: %s", exc)


def _heartbeat_info() -> dict:
    rt = _state.get("runtime")
    info = {"state": _state["status"], "pid": os.getpid(), "host": socket.gethostname(),
            "core": os.environ.get("PINFER_WORKER_CORE", ""), "batches": _state["batches"],
            "images": _state["images"]}
    if rt is not None:
        info.update(model=rt.info.name, sha256=rt.info.sha256, pretrained=int(rt.info.pretrained),
                    precision=rt.precision, runtime=rt.runtime, selection=rt.selection, resize=settings.resize,
                    threads=rt.threads)
    if _state.get("error"):
        info["error"] = _state["error"]
    reloader = _state.get("reloader")
    if reloader is not None:
        info.update(manifest_sha256=reloader.served_manifest, reloads=reloader.reloads,
                    # always written, so a cleared error replaces the old one in the hash
                    reload_error=json.dumps(reloader.error) if reloader.error else "")
    return info


def _start_heartbeat(store: Store, name: str) -> None:
    """Every PINFER_HEARTBEAT_S: refresh this worker's heartbeat, then sweep for lost messages."""
    from shared.broker import enqueue
    from worker.metrics import REPUBLISHED
    from worker.sweeper import Sweeper

    sweeper = Sweeper(store, lambda pid, lane: enqueue(app, pid, lane), grace_s=settings.visibility_timeout_s,
                      confirm_s=settings.heartbeat_s * 0.8)

    def beat() -> None:
        while True:
            since = _state.get("busy_since")
            if since is not None and time.monotonic() - since > settings.batch_time_limit_s:
                log.critical("a batch (or a model reload) has run for more than PINFER_BATCH_TIME_LIMIT_S=%ss: "
                             "taking the worker down so its images are delivered again", settings.batch_time_limit_s)
                os.kill(os.getpid(), signal.SIGKILL)
            try:
                store.heartbeat(name, _heartbeat_info())
                if _state.get("reloader") is not None:
                    _state["reloader"].request(store.reload_generation())
                if _state["status"] in SERVING:
                    republished = sweeper.sweep()
                    if republished:
                        REPUBLISHED.inc(len(republished))
            except Exception as exc:  # Redis away: keep trying, the worker itself reconnects
                log.warning("heartbeat/sweep failed: %s", exc)
            time.sleep(min(settings.heartbeat_s, settings.batch_time_limit_s / 4))

    threading.Thread(target=beat, name="pinfer-heartbeat", daemon=True).start()


@signals.after_setup_logger.connect
@signals.after_setup_task_logger.connect
def _log_format(logger: logging.Logger, **_: Any) -> None:
    """Celery made its handlers: give them PINFER_LOG_FORMAT and the image fields (shared.logs)."""
    for handler in logger.handlers:
        logs.attach(handler, settings.log_format)


@signals.worker_shutdown.connect
def _goodbye(**_: Any) -> None:
    store, name = _state.get("store"), _state.get("name")
    if store is not None and name:
        try:
            store.forget_worker(name)
        except Exception:
            pass
