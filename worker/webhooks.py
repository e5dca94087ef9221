"""Webhook delivery: threads in the ``pinfer worker`` launcher, never in an inference process.

Events are queued by the Lua script that makes a prediction terminal or finishes a job
(``keys.WEBHOOK_OUTBOX``), so an event exists exactly when its state change does. Any number of
deliverers on any hosts share the outbox: each claims one event with a lease (``Store.claim_webhook``;
if the deliverer dies the lease expires and the event is delivered again: at least once), POSTs it
signed per Standard Webhooks, records the attempt on the prediction or job, and on a non-2xx answer
or a network error schedules the next attempt after ``PINFER_WEBHOOK_BACKOFF_S`` x 2^(n-1), until
``PINFER_WEBHOOK_MAX_ATTEMPTS``; then the webhook is ``failed``. The ``webhook-id`` is the same for
every attempt of one event, so a receiver can drop repeats.

A hand-written loop rather than a Celery task: Celery's retry-with-countdown keeps the message in
the worker's memory until due, and on the Redis transport a countdown longer than the visibility
timeout is delivered twice; a sorted set of due times is what that would need anyway.
"""
from __future__ import annotations

import json
import logging
import threading
import time
import uuid
from datetime import datetime, timezone

import requests

from shared import keys
from shared.schema import Job, Prediction
from shared.settings import Settings
from shared.store import Store
from shared.webhooks import guarded_session, signer

log = logging.getLogger("pinfer.webhooks")
#: How often an idle deliverer looks for due events (delivery latency when the outbox was empty).
POLL_S = 0.2
EVENT_TYPES = {"prediction": "prediction.completed", "job": "job.finished"}


def event_body(event: str, kind: str, raw: dict[str, str]) -> dict:
    """The JSON a receiver gets: Standard Webhooks' type/timestamp/data envelope."""
    ident = keys.event_target(event)[1]
    data = (Prediction.from_redis(ident, raw) if kind == "prediction" else Job.from_redis(ident, raw)).public()
    return {"type": EVENT_TYPES[kind], "timestamp": datetime.now(timezone.utc).isoformat(), "data": data}


class Deliverer:
    def __init__(self, settings: Settings, store: Store | None = None) -> None:
        self.settings = settings
        self.store = store or Store(settings)
        self.signer = signer(settings.webhook_secret)
        self.stopped = threading.Event()
        self.threads: list[threading.Thread] = []

    @property
    def lease_s(self) -> float:
        return self.settings.webhook_timeout_s * 2 + 10

    def start(self, threads: int | None = None) -> "Deliverer":
        for i in range(threads or self.settings.webhook_concurrency):
            t = threading.Thread(target=self._loop, name=f"webhooks-{i}", daemon=True)
            t.start()
            self.threads.append(t)
        return self

    def stop(self, timeout: float = 15.0) -> None:
        self.stopped.set()
        for t in self.threads:
            t.join(timeout)

    def _loop(self) -> None:
        session = guarded_session(self.settings.webhook_allow_private)
        while not self.stopped.is_set():
            try:
                if not self.deliver_one(session):
                    self.stopped.wait(POLL_S)
            except Exception as exc:  # Redis away: keep the thread, try again shortly
                log.warning("webhook delivery loop: %s", exc)
                self.stopped.wait(1.0)

    def deliver_one(self, session: requests.Session) -> bool:
        """Claim and attempt one due event; False when none was due."""
        event = self.store.claim_webhook(self.lease_s)
        if event is None:
            return False
        kind, raw = self.store.webhook_record(event)
        if not raw or not raw.get("webhook"):
            self.store.webhook_attempted(event, {"n": 0, "at": time.time(), "error": "record expired"}, "failed")
            return True
        n = self.store.webhook_attempt_count(event) + 1
        body = json.dumps(event_body(event, kind, raw), separators=(",", ":"))
        now = datetime.now(timezone.utc)
        msg_id = "msg_" + uuid.uuid5(uuid.NAMESPACE_URL, event).hex   # same for every attempt of the event
        headers = {"content-type": "application/json", "user-agent": "pinfer-webhooks",
                   "webhook-id": msg_id, "webhook-timestamp": str(int(now.timestamp())),
                   "webhook-signature": self.signer.sign(msg_id, now, body)}
        attempt: dict = {"n": n, "at": time.time()}
        t0 = time.monotonic()
        try:
            resp = session.post(raw["webhook"], data=body.encode(), headers=headers, allow_redirects=False,
                                timeout=self.settings.webhook_timeout_s)
            attempt["status_code"] = resp.status_code
            ok = 200 <= resp.status_code < 300
            resp.close()
        except requests.RequestException as exc:
            attempt["error"] = _reason(exc)
            ok = False
        attempt["ms"] = round((time.monotonic() - t0) * 1000, 1)
        if ok:
            self.store.webhook_attempted(event, attempt, "delivered")
        elif n >= self.settings.webhook_max_attempts:
            log.warning("webhook for %s failed after %d attempts", event, n)
            self.store.webhook_attempted(event, attempt, "failed")
        else:
            delay = self.settings.webhook_backoff_s * 2 ** (n - 1)
            attempt["retry_in_s"] = delay
            attempt["next_at"] = time.time() + delay
            self.store.webhook_attempted(event, attempt, "retry", attempt["next_at"])
        return True


def _reason(exc: Exception) -> str:
    """The innermost cause, e.g. 'connection refused' or the SSRF refusal, not urllib3's wrapper text."""
    seen: BaseException = exc
    for _ in range(10):
        inner = seen.__cause__ or seen.__context__ or next(
            (a for a in getattr(seen, "args", ()) if isinstance(a, BaseException)), None)
        if inner is None:
            break
        seen = inner
    text = str(seen) or type(seen).__name__
    return f"{type(seen).__name__}: {text}"[:300]


def start_delivery(settings: Settings) -> Deliverer | None:
    """Start the delivery threads of this launcher (none without a secret or with concurrency 0)."""
    if not settings.webhook_secret or settings.webhook_concurrency < 1:
        return None
    return Deliverer(settings).start()


__all__ = ["Deliverer", "event_body", "start_delivery"]
