"""Redis access for predictions, jobs and worker heartbeats: the only module that talks to Redis keys.

Both the API and the worker go through ``Store``; every state change runs one of the scripts in
``shared/lua`` so it is atomic. Records use a text client; image bytes a binary one. The worker side
(heartbeats, cores, queues, the sweeper), the jobs and the webhooks live in ``shared.store_workers``,
``shared.store_jobs`` and ``shared.store_webhooks``, mixed into ``Store``.
"""
from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass
from typing import Iterable, Sequence

import redis

from shared import connections, keys, lua
from shared.errors import Conflict, NotFound, Overloaded, ServiceUnavailable
from shared.schema import (FAILED, IDEM_CREATED, IDEM_DONE, IDEM_PENDING, INTERACTIVE, JOB_CANCELED, JOB_CLOSED,
                           JOB_FINISHED, JOB_OPEN, QUEUED, STATUSES, SUCCEEDED, TERMINAL, WEBHOOK_PENDING, Prediction,
                           field_text)
from shared.settings import Settings
from shared.store_jobs import JobStore
from shared.store_webhooks import WebhookStore
from shared.store_workers import WorkerStore


@dataclass
class Submitted:
    """What happened to one image offered to the store."""

    outcome: str  # "ok" | "duplicate"
    id: str
    created_at: float = 0.0


@dataclass
class Transitioned:
    outcome: str  # "ok" | "skip" (status was not an allowed source) | "missing"
    previous: str
    attempts: int


@dataclass(frozen=True)
class IdempotencyClaim:
    """An Idempotency-Key this request claimed (``key``: its ``keys.idempotency`` record). The script
    that creates the prediction or job records the new ID and ``http_status`` under it in the same
    step, so a retry after the API process died replays that ID instead of creating a second one."""

    key: str
    fingerprint: str
    http_status: int = 0


#: What a script answers about a known Idempotency-Key (``idempotency_begin``, ``submit``).
IDEMPOTENCY_FIELDS = ("fingerprint", "state", "status", "body", "location", "id")


class IdempotencyKeySeen(Exception):
    """``Store.submit`` with a claim whose key is already recorded: nothing was created, and
    ``record`` (IDEMPOTENCY_FIELDS) says what the first request with that key did."""

    def __init__(self, record: dict) -> None:
        super().__init__("idempotency key already used")
        self.record = record


def cache_digest(content_sha256: str, model_sha256: str, precision: str, resize: str, top_k: int) -> str:
    """The result cache's key: everything that decides a result. The same bytes under another model,
    precision, resize mode or ``top_k`` is another entry, so a roll-out never serves an old model's
    answer as the new one's."""
    return hashlib.sha256(f"{content_sha256}|{model_sha256}|{precision}|{resize}|{top_k}".encode()).hexdigest()


def connect(url: str, decode: bool = True) -> redis.Redis:
    """A client for ``url``: plain Redis or the primary behind Redis Sentinel (``shared.connections``)."""
    return connections.connect(url, decode)


class Store(JobStore, WorkerStore, WebhookStore):
    def __init__(self, settings: Settings, client: redis.Redis | None = None,
                 raw: redis.Redis | None = None) -> None:
        self.settings = settings
        self.r = client if client is not None else connect(settings.redis_url)
        if raw is None:
            raw = (connect(settings.redis_url, decode=False) if client is None
                   else redis.Redis(connection_pool=_binary_pool(client)))
        self.raw = raw
        self._scripts = {name: self.r.register_script(lua.source(name)) for name in lua.NAMES}
        self._model = json.dumps(data_model(settings), separators=(",", ":"))

    def _script(self, name: str, keys_: Sequence[str], options: dict, *extra: bytes | str,
                client: redis.client.Pipeline | None = None):
        """Run ``shared/lua/<name>.lua``: ARGV is the data model, ``options`` (JSON), then ``extra``."""
        return self._scripts[name](keys=keys_, args=[self._model, json.dumps(options, separators=(",", ":")), *extra],
                                   client=client)

    def ping(self) -> bool:
        return bool(self.r.ping())

    def subscribe_done(self) -> redis.client.PubSub:
        """A pub/sub connection subscribed to the done channel (a prediction ID per terminal state)."""
        pubsub = self.r.pubsub(ignore_subscribe_messages=True)
        pubsub.subscribe(keys.DONE_CHANNEL)
        return pubsub

    # ------------------------------------------------------------------ predictions
    def submit(self, pid: str, data: bytes, top_k: int, lane: str = INTERACTIVE, job_id: str | None = None,
               name: str | None = None, error: dict | None = None, result: dict | None = None,
               content_sha: str | None = None, owner: str | None = None, webhook: str | None = None,
               request_id: str | None = None, claim: IdempotencyClaim | None = None,
               message: tuple[str, str] | None = None) -> Submitted:
        """Store bytes + record (and job bookkeeping) if the backpressure bounds allow it.

        ``error`` records an image rejected at submit as an already-failed job result, so a job's
        results have one line per image sent. ``result`` records a result cache hit: the image is
        ``succeeded`` at once, nothing is stored or queued, and no bound applies. ``content_sha``
        (sha256 of the bytes) lets the worker fill the cache. ``owner`` (the API key's name) owns the
        record and is held to PINFER_MAX_PENDING_PER_KEY. ``claim``: the request's Idempotency-Key, under
        which the new ID is recorded in the same step; when the key is already recorded nothing is
        created and ``IdempotencyKeySeen`` is raised. ``message``: the task message for the workers
        (``shared.broker.task_message``: its list and JSON), pushed in the same step when the image is
        queued, with ``enqueued_at`` stamped; without one the record waits for the sweeper to publish
        it. Raises Overloaded, NotFound or Conflict.
        """
        now = time.time()
        status = FAILED if error else SUCCEEDED if result is not None else QUEUED
        fields = {"created_at": repr(now), "top_k": str(top_k), "lane": lane, "attempts": "0", "size": str(len(data))}
        if job_id:
            fields.update(job_id=job_id, name=name or "")
        if request_id:  # follows the image into the worker's log lines
            fields["request_id"] = request_id
        if content_sha:
            fields["sha"] = content_sha
        if owner:
            fields["owner"] = owner
        if error:
            fields.update(error_code=error["code"], error_message=error["message"], finished_at=repr(now))
        elif result is not None:
            fields.update(result=field_text(result), started_at=repr(now), finished_at=repr(now))
        if webhook:
            fields["webhook"] = webhook
        jkeys = ([keys.job(job_id), keys.job_pending(job_id), keys.job_items(job_id), keys.job_names(job_id),
                  keys.job_done(job_id)] if job_id else ["", "", "", "", ""])
        s = self.settings
        options = {"id": pid, "now": repr(now), "status": status, "name": name or "", "fields": fields,
                   "key_max_pending": s.max_pending_per_key, "event": keys.prediction_event(pid)}
        if claim is not None:
            options["idem"] = {"fingerprint": claim.fingerprint, "status": str(claim.http_status)}
        res = self._script(
            "submit",
            [keys.PENDING, keys.prediction(pid), keys.image(pid), *jkeys,
             keys.INTERACTIVE_RECENT if lane == INTERACTIVE and status == QUEUED else "",
             keys.key_pending(owner) if owner else "", keys.WEBHOOK_OUTBOX if webhook else "",
             claim.key if claim is not None else "",
             message[0] if message is not None and status == QUEUED else ""],
            options, data if status == QUEUED else b"", message[1] if message is not None else "")
        outcome = res[0]
        if outcome == "ok":
            self._replicated("the upload")
            return Submitted("ok", pid, now)
        if outcome == "seen":
            raise IdempotencyKeySeen(dict(zip(IDEMPOTENCY_FIELDS, res[1:])))
        if outcome == "duplicate":
            return Submitted("duplicate", res[1])
        if outcome == "overloaded":
            scope = res[1]
            limit, where = {"global": (s.max_pending_images, "in total"),
                            "job": (s.max_pending_per_job, "in this job"),
                            "key": (s.max_pending_per_key, "for this API key")}[scope]
            raise Overloaded(f"{limit} images are already waiting to be classified "
                             f"({where}); retry after "
                             f"{s.retry_after_s} s", retry_after_s=s.retry_after_s, scope=scope)
        if outcome == "no_job":
            raise NotFound(f"job {job_id} does not exist or has expired")
        raise Conflict(f"job {job_id} is {outcome[4:]}: it accepts no more images")

    def _replicated(self, what: str) -> None:
        """With PINFER_REDIS_WAIT_REPLICAS, make sure the write just made is on that many replicas
        (Redis WAIT) before the caller reports it accepted: an asynchronous replica that missed it
        would lose it at a failover. Raises ServiceUnavailable (503) when fewer acknowledge in time."""
        n = self.settings.redis_wait_replicas
        if n <= 0:
            return
        acked = self.r.wait(n, self.settings.redis_wait_timeout_ms)
        if acked < n:
            raise ServiceUnavailable(f"{what} is on the Redis primary but only {acked} of {n} replicas acknowledged it "
                                     f"within {self.settings.redis_wait_timeout_ms} ms; a failover could lose it. "
                                     "Retry later (a retried job upload is recognised by its name).")

    def mark_enqueued(self, pid: str, at: float | None = None) -> None:
        """Stamp the publish time after the message is sent, so the sweeper's FIFO check sees the
        queue's real order (records are created before their message is published)."""
        self.r.hset(keys.prediction(pid), "enqueued_at", repr(time.time() if at is None else at))

    def get(self, pid: str) -> Prediction | None:
        raw = self.r.hgetall(keys.prediction(pid))
        if not raw:
            return None
        rec = Prediction.from_redis(pid, raw)
        if raw.get("webhook"):
            rec.webhook = self.webhook_info(keys.prediction_event(pid), raw)
        return rec

    def get_many(self, pids: Sequence[str]) -> list[Prediction | None]:
        pipe = self.r.pipeline(transaction=False)
        for pid in pids:
            pipe.hgetall(keys.prediction(pid))
        return [Prediction.from_redis(pid, raw) if raw else None for pid, raw in zip(pids, pipe.execute())]

    def images(self, pids: Sequence[str]) -> list[bytes | None]:
        return self.raw.mget([keys.image(p) for p in pids]) if pids else []

    def start_run(self, pids: Sequence[str]) -> list[bytes | None]:
        """Mark ``pids`` in flight (one forward pass about to start) and return their bytes, in one
        round trip. A crash is charged only to the images marked here (``runs``, and ``alone_runs``
        when the pass holds one image), never to images that merely shared a delivery with them."""
        if not pids:
            return []
        pipe = self.raw.pipeline(transaction=False)
        self._script("mark_in_flight", [keys.prediction(p) for p in pids], {"alone": len(pids) == 1}, client=pipe)
        pipe.mget([keys.image(p) for p in pids])
        return pipe.execute()[1]

    def transition_many(self, changes: Iterable[tuple[str, str, Sequence[str], dict, bool]]) -> list[Transitioned]:
        """Apply (id, to, allowed_from, fields, bump_attempts) changes in one round trip."""
        now = time.time()
        pipe = self.r.pipeline(transaction=False)
        n = 0
        for pid, to, allowed, fields, bump in changes:
            self._script("transition", [keys.prediction(pid), keys.image(pid), keys.PENDING, keys.WEBHOOK_OUTBOX],
                         {"id": pid, "to": to, "from": list(allowed), "now": repr(now), "bump": bool(bump),
                          "fields": {k: field_text(v) for k, v in fields.items()},
                          "event": keys.prediction_event(pid)},
                         client=pipe)
            n += 1
        if not n:
            return []
        return [Transitioned(r[0], r[1], int(r[2])) for r in pipe.execute()]

    def transition(self, pid: str, to: str, allowed: Sequence[str], fields: dict | None = None,
                   bump_attempts: bool = False) -> Transitioned:
        return self.transition_many([(pid, to, allowed, fields or {}, bump_attempts)])[0]

    # ------------------------------------------------------------------ result cache
    def cache_get(self, digest: str) -> dict | None:
        """The cached result for ``digest`` (see ``cache_digest``), or None."""
        raw = self.r.get(keys.cache(digest))
        return json.loads(raw) if raw else None

    def cache_put(self, entries: Sequence[tuple[str, dict]]) -> None:
        """Keep results for reuse, for PINFER_CACHE_TTL_S, at most PINFER_CACHE_MAX_ENTRIES of them."""
        s = self.settings
        if not entries or s.cache_ttl_s <= 0:
            return
        self._script("cache_put", [keys.CACHE_INDEX],
                     {"now": repr(time.time()), "entries": [[d, field_text(res)] for d, res in entries]})

    # ------------------------------------------------------------------ idempotency
    def idempotency_begin(self, key: str, fingerprint: str) -> dict | None:
        """Claim ``key`` (a ``keys.idempotency`` key) for a request, for keys.IDEMPOTENCY_PENDING_S: None
        when this is the first request with it, else the stored record (fingerprint, state, status,
        body, location, id; ``state`` one of schema's IDEM_*)."""
        res = self._script("idempotency_begin", [key], {"fingerprint": fingerprint})
        if res[0] == "new":
            return None
        return dict(zip(IDEMPOTENCY_FIELDS, res[1:]))

    def idempotency_finish(self, key: str, status: int, body: str, location: str) -> None:
        """Record the answer to replay, for PINFER_RESULT_TTL_S (as long as the prediction lives)."""
        pipe = self.r.pipeline()
        pipe.hset(key, mapping={"state": IDEM_DONE, "status": status, "body": body, "location": location})
        pipe.expire(key, self.settings.result_ttl_s)
        pipe.execute()

    def idempotency_abort(self, key: str) -> bool:
        """Forget a claim whose request failed, so that a retry runs it again; a claim under which a
        prediction or job was already created is kept (a retry gets that one). True when forgotten."""
        return bool(self._script("idempotency_abort", [key], {}))


def data_model(settings: Settings) -> dict:
    """ARGV[1] of every script (see ``shared/lua``): statuses, key templates, TTLs and bounds, so that
    no script spells one of its own. A template is a ``shared.keys`` name with ``{}`` for the ID."""
    t = "{}"
    return {
        "st": {s: s for s in STATUSES}, "terminal": list(TERMINAL),
        "job": {"open": JOB_OPEN, "closed": JOB_CLOSED, "finished": JOB_FINISHED, "canceled": JOB_CANCELED},
        "webhook": {"pending": WEBHOOK_PENDING}, "idem": {"pending": IDEM_PENDING, "created": IDEM_CREATED},
        "tpl": {"job": keys.job(t), "job_pending": keys.job_pending(t), "job_done": keys.job_done(t),
                "job_rate": keys.job_rate(t), "key_pending": keys.key_pending(t), "job_event": keys.job_event(t),
                "cache": keys.cache(t)},
        "ttl": {"image": settings.image_ttl_s, "result": settings.result_ttl_s, "cache": settings.cache_ttl_s,
                "interactive": settings.interactive_window_s, "rate": keys.RATE_TTL_S,
                "rate_bucket": keys.RATE_BUCKET_S, "idem_pending": keys.IDEMPOTENCY_PENDING_S},
        "max_pending": settings.max_pending_images, "job_max_pending": settings.max_pending_per_job,
        "cache_max_entries": settings.cache_max_entries, "webhook_move_max": keys.WEBHOOK_MOVE_BATCH,
        "done_channel": keys.DONE_CHANNEL,
    }


def _binary_pool(client: redis.Redis) -> redis.ConnectionPool:
    """A pool with the same connection settings as ``client`` but returning bytes (fakeredis too)."""
    kwargs = dict(client.connection_pool.connection_kwargs)
    kwargs["decode_responses"] = False
    return client.connection_pool.__class__(connection_class=client.connection_pool.connection_class, **kwargs)


__all__ = ["IDEMPOTENCY_FIELDS", "IdempotencyClaim", "IdempotencyKeySeen", "Store", "Submitted", "Transitioned",
           "connect", "data_model"]
