"""Every use of Celery, kombu and celery-batches internals, in one module, behind a version check.

pinfer relies on three things these libraries do not promise to keep:

1. **kombu's Redis transport layout** (the sweeper, worker/sweeper.py, needs it to tell which
   accepted predictions still have a message somewhere). A queue is a Redis list named after the
   queue; a message in it is a JSON envelope ``{"body": ..., "properties": {"body_encoding":
   "base64", ...}, ...}``. A message a consumer fetched but has not acknowledged sits in the hash
   ``unacked`` (transport option ``unacked_key``, ``keys.KOMBU_UNACKED``; we never change it) as
   ``[envelope, exchange, routing_key]``. ``message_pid`` / ``unacked_pids`` read both.
2. **Celery's task message protocol 2**: the body is ``[args, kwargs, embed]``; our task's one
   argument is the prediction ID (``shared.broker.enqueue``).
3. **celery-batches' buffer** (``Batches``). ``AdaptiveBatches`` uses the message handler that
   ``Strategy`` returns, the request queues ``_buffer`` and ``_pending``, the pool ``_pool``,
   ``_do_flush`` and ``apply_batches_task``, because celery-batches has no hook for what pinfer
   needs: flushing on pinfer's rule (worker/batching.py) besides its count and timer triggers;
   acknowledging only the requests a batch handled and re-buffering (unacked) the ones it deferred
   to let interactive work go first; passing ``may_defer`` to the batch function.

Verified with celery 5.6.3, kombu 5.7.0 and celery-batches 0.11 (``TESTED`` holds the ranges, and
pyproject.toml's pins must equal them: tests/unit/test_celery_adapter.py checks that).
tests/integration/test_celery_adapter.py publishes through a real Celery app to a real
redis-server, fetches with a real kombu consumer and decodes what kombu wrote; the batching and
spine integration tests drive ``AdaptiveBatches`` in real workers. ``check_versions`` refuses to
start a worker on other versions unless PINFER_ALLOW_UNTESTED_CELERY=1: run those tests first.
"""
from __future__ import annotations

import base64
import json
import logging
import re
from importlib import metadata
from typing import Any, Callable, Iterable, Mapping, Protocol

from celery_batches import Batches, SimpleRequest
from celery_batches.trace import apply_batches_task

from shared import keys
from shared.schema import BULK, INTERACTIVE
from worker.batching import LOOK_AGAIN_S

log = logging.getLogger("pinfer.worker")

#: The versions this module was verified with (pip specifiers; pyproject.toml must pin the same).
TESTED: dict[str, str] = {"celery": ">=5.6,<5.7", "kombu": ">=5.7,<5.8", "celery-batches": "==0.11"}


class UntestedVersions(RuntimeError):
    """The installed celery / kombu / celery-batches are not the versions in ``TESTED``."""


# --- version check --------------------------------------------------------------------------------------
def _release(version: str) -> tuple[int, ...]:
    m = re.match(r"\d+(?:\.\d+)*", version)
    return tuple(int(p) for p in m.group(0).split(".")) if m else ()


def _satisfies(version: str, spec: str) -> bool:
    """``version`` against a specifier of ``==``, ``>=`` and ``<`` clauses (all TESTED needs; a
    pre-release counts as its release, so ``5.7.0rc1`` is outside ``<5.7``)."""
    have = _release(version)
    for clause in spec.split(","):
        op, want = re.match(r"\s*(==|>=|<)\s*(\S+)", clause).groups()
        a, b = have, _release(want)
        width = max(len(a), len(b))
        a, b = a + (0,) * (width - len(a)), b + (0,) * (width - len(b))
        if not {"==": a == b, ">=": a >= b, "<": a < b}[op]:
            return False
    return True


def installed_versions() -> dict[str, str]:
    """The installed distribution version of each package in ``TESTED`` ("missing" if absent)."""
    out = {}
    for name in TESTED:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "missing"
    return out


def check_versions(allow_untested: bool = False, versions: Mapping[str, str] | None = None) -> None:
    """Raise ``UntestedVersions`` naming the tested versions when an installed one is outside
    ``TESTED``; with ``allow_untested`` (PINFER_ALLOW_UNTESTED_CELERY) log a warning instead."""
    versions = installed_versions() if versions is None else versions
    bad = [f"{name} {versions.get(name, 'missing')}" for name, spec in TESTED.items()
           if not _satisfies(versions.get(name, "missing"), spec)]
    if not bad:
        return
    tested = ", ".join(f"{name}{spec}" for name, spec in TESTED.items())
    msg = (f"untested {' and '.join(bad)}: pinfer's worker relies on library internals "
           f"(worker/celery_adapter.py) verified only with {tested}. Install those "
           f"(pip install 'pinfer[worker]'), or set PINFER_ALLOW_UNTESTED_CELERY=1 to start anyway after "
           f"tests/integration/test_celery_adapter.py passes on these versions.")
    if not allow_untested:
        raise UntestedVersions(msg)
    log.warning("PINFER_ALLOW_UNTESTED_CELERY=1: starting anyway: %s", msg)


# --- kombu Redis transport + Celery protocol 2 -----------------------------------------------------------
def message_pid(raw: str | bytes) -> str | None:
    """The prediction ID inside a message kombu stored in Redis (a queue list item, or an entry of
    the ``unacked`` hash), or None for anything else: the hash is shared with whatever else uses
    the database, so an odd entry must never raise."""
    try:
        msg = json.loads(raw)
        if isinstance(msg, list):  # unacked entries are [message, exchange, routing_key]
            msg = msg[0]
        if not isinstance(msg, dict):
            return None
        body = msg["body"]
        if msg.get("properties", {}).get("body_encoding") == "base64":
            body = base64.b64decode(body)
        args = json.loads(body)[0]
        return str(args[0]) if isinstance(args, list) and args else None
    except (ValueError, KeyError, IndexError, TypeError, AttributeError):
        return None


def unacked_pids(entries: Iterable[str | bytes]) -> set[str]:
    """The prediction IDs of the values of kombu's ``unacked`` hash (messages workers hold)."""
    return {pid for pid in map(message_pid, entries) if pid is not None}


def lane_of(request: Any) -> str:
    """The lane of a Celery request or a kombu message: the queue it was routed to."""
    rk = (request.delivery_info or {}).get("routing_key")
    return BULK if rk == keys.QUEUE_BULK else INTERACTIVE


# --- celery-batches ---------------------------------------------------------------------------------------
class FlushRuleLike(Protocol):
    """What ``AdaptiveBatches`` asks (worker.batching.FlushRule)."""

    def arrived(self, lane: str) -> bool: ...
    def look_again(self) -> bool: ...
    def flushed(self) -> None: ...


class AdaptiveBatches(Batches):
    """celery-batches' ``Batches`` that also flushes when ``flush_rule()`` says so, acknowledges
    only the requests the batch handled, and calls the batch function as ``run(requests, may_defer)``.

    The batch function returns ``{"deferred": [request ids]}``: those stay unacked and are flushed
    again with the next batch. If it raises or returns anything else (e.g. Redis went away mid-batch),
    nothing is acked: every message is rejected with requeue, so it is delivered again, never lost.
    """

    abstract = True
    _look_again_tref = None
    _idle_trefs: list | None = None
    _arrivals = _arrivals_seen = 0

    def flush_rule(self) -> FlushRuleLike:
        raise NotImplementedError

    def between_batches(self) -> list[tuple[float, Callable[[], None]]]:
        """(interval s, function) pairs run on the consumer's event loop. With the solo pool that
        loop is the thread that runs batches, so these never run during one (model reloads)."""
        return []

    def Strategy(self, task, app, consumer) -> Callable:
        """celery-batches' message handler builds and buffers the request (and flushes at
        ``flush_every``); then the flush rule decides whether the buffer is classified at once."""
        buffer_message = super().Strategy(task, app, consumer)
        timer = consumer.timer
        if self._idle_trefs is None:
            type(self)._idle_trefs = [timer.call_repeatedly(s, fn) for s, fn in self.between_batches()]

        def on_message(message, *args, **kwargs):
            buffer_message(message, *args, **kwargs)
            self._arrivals += 1
            if self._buffer.empty():  # the count trigger flushed already
                return
            if self.flush_rule().arrived(lane_of(message)):
                self._do_flush()
            elif self._look_again_tref is None:
                self._look_again_tref = timer.call_repeatedly(LOOK_AGAIN_S, self._look_again)

        return on_message

    def _look_again(self) -> None:
        """While waiting for messages counted in the broker: if none came since the last look,
        another worker may have taken them; ask again and flush if nothing is left to wait for."""
        if self._buffer.empty():
            self._stop_looking()
        elif self._arrivals != self._arrivals_seen:
            self._arrivals_seen = self._arrivals
        elif self.flush_rule().look_again():
            self._do_flush()

    def _stop_looking(self) -> None:
        if self._look_again_tref is not None:
            self._look_again_tref.cancel()
            self._look_again_tref = None

    def flush(self, requests):
        """Replaces ``Batches.flush`` (which acks every request once the batch returns)."""
        self._stop_looking()
        self.flush_rule().flushed()
        by_id = {r.id: r for r in requests}
        # Deferring needs room to fetch the waiting interactive message: unacked < prefetch.
        may_defer = len(requests) < self.app.conf.worker_prefetch_multiplier - 1

        def on_return(result):
            if not isinstance(result, dict):
                for req in requests:
                    try:
                        req.reject(requeue=True)
                    except Exception:  # broker away: visibility timeout redelivers them
                        log.exception("could not requeue %s", req.id)
                return
            deferred = set(result.get("deferred", ()))
            for rid, req in by_id.items():
                if rid in deferred:
                    self._pending.put(req)  # still unacked: flushed again with the next batch
                else:
                    req.acknowledge()

        # apply_batches_task calls task(*args): the batch function gets (requests, may_defer).
        args = ([SimpleRequest.from_request(r) for r in requests], may_defer)
        return self._pool.apply_async(apply_batches_task, (self, args, 0, None), callback=on_return)
