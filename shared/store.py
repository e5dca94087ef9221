"""Redis access for predictions, jobs and worker heartbeats: the only module that talks to Redis keys.

Both the API and the worker go through ``Store``; every state change runs one of the scripts in
``shared.lua`` so it is atomic. Records use a text client; image bytes a binary one.
"""
from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass
from typing import Iterable, Sequence

import redis

from shared import connections, keys, lua
from shared.errors import Canceled, Conflict, NotFound, Overloaded, ServiceUnavailable
from shared.schema import (CANCELED, FAILED, INTERACTIVE, JOB_CANCELED, JOB_FINISHED, JOB_OPEN, QUEUED, RUNNING,
                           SUCCEEDED, Job, Prediction)
from shared.settings import Settings


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


def cache_digest(content_sha256: str, model_sha256: str, precision: str, resize: str, top_k: int) -> str:
    """The result cache's key: everything that decides a result. The same bytes under another model,
    precision, resize mode or ``top_k`` is another entry, so a roll-out never serves an old model's
    answer as the new one's."""
    return hashlib.sha256(f"{content_sha256}|{model_sha256}|{precision}|{resize}|{top_k}".encode()).hexdigest()


def connect(url: str, decode: bool = True) -> redis.Redis:
    """A client for ``url``: plain Redis or the primary behind Redis Sentinel (``shared.connections``)."""
    return connections.connect(url, decode)


class Store:
    def __init__(self, settings: Settings, client: redis.Redis | None = None,
                 raw: redis.Redis | None = None) -> None:
        self.settings = settings
        self.r = client if client is not None else connect(settings.redis_url)
        if raw is None:
            raw = (connect(settings.redis_url, decode=False) if client is None
                   else redis.Redis(connection_pool=_binary_pool(client)))
        self.raw = raw
        self._submit = self.r.register_script(lua.SUBMIT)
        self._transition = self.r.register_script(lua.TRANSITION)
        self._close = self.r.register_script(lua.CLOSE_JOB)
        self._lease = self.r.register_script(lua.LEASE_CORE)
        self._mark = self.r.register_script(lua.MARK_IN_FLIGHT)
        self._webhook_claim = self.r.register_script(lua.WEBHOOK_CLAIM)
        self._cache_put = self.r.register_script(lua.CACHE_PUT)
        self._idem_begin = self.r.register_script(lua.IDEMPOTENCY_BEGIN)

    # ------------------------------------------------------------------ predictions
    def submit(self, pid: str, data: bytes, top_k: int, lane: str = INTERACTIVE, job_id: str | None = None,
               name: str | None = None, error: dict | None = None, result: dict | None = None,
               content_sha: str | None = None, owner: str | None = None, webhook: str | None = None,
               request_id: str | None = None) -> Submitted:
        """Store bytes + record (and job bookkeeping) if the backpressure bounds allow it.

        ``error`` records an image rejected at submit as an already-failed job result, so a job's
        results have one line per image sent. ``result`` records a result cache hit: the image is
        ``succeeded`` at once, nothing is stored or queued, and no bound applies. ``content_sha``
        (sha256 of the bytes) lets the worker fill the cache. ``owner`` (the API key's name) owns the
        record and is held to PINFER_MAX_PENDING_PER_KEY. Raises Overloaded, NotFound or Conflict.
        """
        now = time.time()
        status = FAILED if error else SUCCEEDED if result is not None else QUEUED
        fields = ["created_at", repr(now), "top_k", str(top_k), "lane", lane, "attempts", "0", "size", str(len(data))]
        if job_id:
            fields += ["job_id", job_id, "name", name or ""]
        if request_id:  # follows the image into the worker's log lines
            fields += ["request_id", request_id]
        if content_sha:
            fields += ["sha", content_sha]
        if owner:
            fields += ["owner", owner, "key_max_pending", str(self.settings.max_pending_per_key)]
        if error:
            fields += ["error_code", error["code"], "error_message", error["message"], "finished_at", repr(now)]
        elif result is not None:
            fields += ["result", _str(result), "started_at", repr(now), "finished_at", repr(now)]
        if webhook:
            fields += ["webhook", webhook]
        jkeys = ([keys.job(job_id), keys.job_pending(job_id), keys.job_items(job_id), keys.job_names(job_id),
                  keys.job_done(job_id)] if job_id else ["", "", "", "", ""])
        s = self.settings
        res = self._submit(
            keys=[keys.PENDING, keys.prediction(pid), keys.image(pid), *jkeys,
                  keys.INTERACTIVE_RECENT if lane == INTERACTIVE and status == QUEUED else "",
                  keys.key_pending(owner) if owner else "", keys.WEBHOOK_OUTBOX if webhook else ""],
            args=[pid, now, s.max_pending_images, s.image_ttl_s, s.result_ttl_s, data if status == QUEUED else b"",
                  s.max_pending_per_job, name or "", status, s.interactive_window_s, *fields])
        outcome = res[0]
        if outcome == "ok":
            self._replicated("the upload")
            if status != QUEUED:
                self.r.publish(keys.DONE_CHANNEL, pid)
            return Submitted("ok", pid, now)
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

    def interactive_waiting(self) -> bool:
        """Whether an interactive message sits in its queue, not yet fetched by any worker."""
        return self.r.llen(keys.QUEUE_INTERACTIVE) > 0

    def queued_by_lane(self) -> tuple[int, int]:
        """Messages waiting in the interactive and bulk queues, not yet fetched by any worker (one round trip)."""
        pipe = self.r.pipeline(transaction=False)
        pipe.llen(keys.QUEUE_INTERACTIVE)
        pipe.llen(keys.QUEUE_BULK)
        interactive, bulk = pipe.execute()
        return int(interactive), int(bulk)

    def interactive_recent(self) -> bool:
        """Whether an interactive image was submitted within PINFER_INTERACTIVE_WINDOW_S."""
        return bool(self.r.exists(keys.INTERACTIVE_RECENT))

    def get(self, pid: str) -> Prediction | None:
        raw = self.r.hgetall(keys.prediction(pid))
        if not raw:
            return None
        rec = Prediction.from_redis(pid, raw)
        if raw.get("webhook"):
            rec.webhook = self.webhook_info(f"p:{pid}", raw)
        return rec

    # ------------------------------------------------------------------ webhooks
    def webhook_info(self, event: str, raw: dict[str, str]) -> dict:
        """The webhook as a client reads it on the prediction or job: URL, status, every attempt."""
        attempts = [json.loads(a) for a in self.r.lrange(keys.webhook_attempts(event), 0, -1)]
        return {"url": raw["webhook"], "status": raw.get("webhook_status") or "waiting", "attempts": attempts}

    def claim_webhook(self, lease_s: float) -> str | None:
        """The next event due for delivery, leased for ``lease_s`` (back in the outbox if we die)."""
        return self._webhook_claim(keys=[keys.WEBHOOK_OUTBOX, keys.WEBHOOK_RETRY, keys.WEBHOOK_INFLIGHT],
                                   args=[time.time(), lease_s]) or None

    def webhook_record(self, event: str) -> tuple[str, dict[str, str]]:
        """(kind, raw record) of an event: kind "prediction" or "job"; raw is empty when it expired."""
        kind, _, ident = event.partition(":")
        key = keys.prediction(ident) if kind == "p" else keys.job(ident)
        return ("prediction" if kind == "p" else "job"), self.r.hgetall(key)

    def webhook_attempted(self, event: str, attempt: dict, outcome: str, retry_at: float | None = None) -> None:
        """Record one attempt and its consequence: outcome "delivered", "failed" or "retry" (at ``retry_at``)."""
        kind, _, ident = event.partition(":")
        key = keys.prediction(ident) if kind == "p" else keys.job(ident)
        pipe = self.r.pipeline()
        pipe.rpush(keys.webhook_attempts(event), json.dumps(attempt, separators=(",", ":")))
        pipe.expire(keys.webhook_attempts(event), self.settings.result_ttl_s)
        pipe.zrem(keys.WEBHOOK_INFLIGHT, event)
        if outcome == "retry":
            pipe.zadd(keys.WEBHOOK_RETRY, {event: retry_at or time.time()})
        if self.r.exists(key):          # an expired record is not recreated
            pipe.hset(key, "webhook_status", "pending" if outcome == "retry" else outcome)
        pipe.execute()

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
        self._mark(keys=[keys.prediction(p) for p in pids], args=[RUNNING, "1" if len(pids) == 1 else "0"],
                   client=pipe)
        pipe.mget([keys.image(p) for p in pids])
        return pipe.execute()[1]

    def transition_many(self, changes: Iterable[tuple[str, str, Sequence[str], dict, bool]]) -> list[Transitioned]:
        """Apply (id, to, allowed_from, fields, bump_attempts) changes in one round trip."""
        now = time.time()
        pipe = self.r.pipeline(transaction=False)
        n = 0
        for pid, to, allowed, fields, bump in changes:
            flat = [x for kv in fields.items() for x in (kv[0], _str(kv[1]))]
            self._transition(keys=[keys.prediction(pid), keys.image(pid), keys.PENDING, keys.WEBHOOK_OUTBOX],
                             args=[pid, to, ",".join(allowed), now, keys.job(""), keys.DONE_CHANNEL,
                                   self.settings.result_ttl_s, "1" if bump else "0", keys.RATE_BUCKET_S, *flat],
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
        flat = [x for d, res in entries for x in (d, _str(res))]
        self._cache_put(keys=[keys.CACHE_INDEX], args=[time.time(), s.cache_ttl_s, s.cache_max_entries,
                                                       keys.cache(""), *flat])

    # ------------------------------------------------------------------ idempotency
    def idempotency_begin(self, key: str, fingerprint: str, pending_s: int) -> dict | None:
        """Claim ``key`` (a ``keys.idempotency`` key) for a request: None when this is the first
        request with it, else the stored record (fingerprint, state, status, body, location)."""
        res = self._idem_begin(keys=[key], args=[fingerprint, pending_s])
        if res[0] == "new":
            return None
        return dict(zip(("fingerprint", "state", "status", "body", "location"), res[1:]))

    def idempotency_finish(self, key: str, status: int, body: str, location: str) -> None:
        """Record the answer to replay, for PINFER_RESULT_TTL_S (as long as the prediction lives)."""
        pipe = self.r.pipeline()
        pipe.hset(key, mapping={"state": "done", "status": status, "body": body, "location": location})
        pipe.expire(key, self.settings.result_ttl_s)
        pipe.execute()

    def idempotency_abort(self, key: str) -> None:
        """Forget a claim whose request failed, so that a retry runs it again."""
        self.r.delete(key)

    # ------------------------------------------------------------------ jobs
    def create_job(self, jid: str, name: str | None, top_k: int, webhook: str | None = None,
                   owner: str | None = None) -> Job:
        now = time.time()
        mapping = {"status": JOB_OPEN, "created_at": repr(now), "top_k": top_k, "name": name or "", "total": 0,
                   "owner": owner or ""}
        if webhook:
            mapping["webhook"] = webhook
        pipe = self.r.pipeline()
        pipe.hset(keys.job(jid), mapping=mapping)
        pipe.expire(keys.job(jid), self.settings.result_ttl_s)
        pipe.zadd(keys.JOBS, {jid: now})
        pipe.zremrangebyscore(keys.JOBS, "-inf", now - self.settings.result_ttl_s)
        pipe.execute()
        self._replicated("the job")
        return self.get_job(jid)

    def get_job(self, jid: str) -> Job:
        raw = self.r.hgetall(keys.job(jid))
        if not raw:
            raise NotFound(f"job {jid} does not exist or has expired")
        job = Job.from_redis(jid, raw)
        if raw.get("webhook"):
            job.webhook = self.webhook_info(f"j:{jid}", raw)
        return job

    def job_rate(self, job: Job, window_s: float = 30.0) -> float | None:
        """Images finished per second over the last ``window_s`` (None before any finished)."""
        now = time.time()
        buckets = self.r.hgetall(keys.job_rate(job.id))
        if not buckets:
            return None
        start = max(job.created_at, now - window_s)
        first = int(start // keys.RATE_BUCKET_S)
        done = sum(int(v) for b, v in buckets.items() if int(b) >= first)
        span = max(now - max(start, first * keys.RATE_BUCKET_S), 1.0)
        return done / span

    def recent_jobs(self, limit: int = 10) -> list[Job]:
        """The newest ``limit`` jobs still on record (the dashboard's list)."""
        ids = self.r.zrevrange(keys.JOBS, 0, limit - 1)
        pipe = self.r.pipeline(transaction=False)
        for jid in ids:
            pipe.hgetall(keys.job(jid))
        return [Job.from_redis(jid, raw) for jid, raw in zip(ids, pipe.execute()) if raw]

    def job_status_counts(self, limit: int = 10_000) -> dict[str, int]:
        """Jobs on record by status (at most the newest ``limit``: a scrape stays one cheap round trip)."""
        ids = self.r.zrevrange(keys.JOBS, 0, limit - 1)
        pipe = self.r.pipeline(transaction=False)
        for jid in ids:
            pipe.hget(keys.job(jid), "status")
        counts: dict[str, int] = {}
        for status in pipe.execute():
            if status:
                counts[status] = counts.get(status, 0) + 1
        return counts

    def close_job(self, jid: str) -> Job:
        if self._close(keys=[keys.job(jid), keys.WEBHOOK_OUTBOX], args=[time.time(), keys.job("")]) == "missing":
            raise NotFound(f"job {jid} does not exist or has expired")
        return self.get_job(jid)

    def cancel_job(self, jid: str, chunk: int = 1000) -> Job:
        """Mark the job canceled (no more uploads), then every still-queued image canceled."""
        job = self.get_job(jid)
        if job.status in (JOB_CANCELED, JOB_FINISHED):
            return job  # nothing left to cancel: a finished job stays finished
        pipe = self.r.pipeline()
        pipe.hset(keys.job(jid), mapping={"status": JOB_CANCELED, "finished_at": repr(time.time())})
        if job.webhook:
            pipe.hset(keys.job(jid), "webhook_status", "pending")
            pipe.rpush(keys.WEBHOOK_OUTBOX, f"j:{jid}")
        pipe.execute()
        err = {"error_code": Canceled.code, "error_message": "the job was canceled before this image ran",
               "finished_at": time.time()}
        start = 0
        while True:
            ids = self.r.lrange(keys.job_items(jid), start, start + chunk - 1)
            if not ids:
                break
            self.transition_many((pid, CANCELED, (QUEUED,), err, False) for pid in ids)
            start += len(ids)
        return self.get_job(jid)

    def job_results(self, jid: str, cursor: int, limit: int) -> tuple[list[Prediction], int]:
        ids = self.r.lrange(keys.job_done(jid), cursor, cursor + limit - 1)
        preds = [p for p in self.get_many(ids) if p is not None]
        return preds, cursor + len(ids)

    # ------------------------------------------------------------------ workers
    def heartbeat(self, name: str, info: dict) -> None:
        now = time.time()
        pipe = self.r.pipeline(transaction=False)
        pipe.hset(keys.worker(name), mapping={k: _str(v) for k, v in {**info, "seen_at": now}.items()})
        pipe.expire(keys.worker(name), self.settings.worker_ttl_s)
        pipe.zadd(keys.WORKERS, {name: now})
        pipe.zremrangebyscore(keys.WORKERS, "-inf", now - 10 * self.settings.worker_ttl_s)
        pipe.execute()

    def request_reload(self) -> int:
        """Ask every worker to load the model its folder names now (`pinfer reload`); the new generation."""
        return int(self.r.incr(keys.MODEL_RELOAD))

    def reload_generation(self) -> int:
        """How many reloads were ever requested: a worker reloads when this grows past what it saw."""
        return int(self.r.get(keys.MODEL_RELOAD) or 0)

    def forget_worker(self, name: str) -> None:
        self.r.delete(keys.worker(name))
        self.r.zrem(keys.WORKERS, name)

    def live_workers(self) -> list[dict]:
        since = time.time() - self.settings.worker_ttl_s
        names = self.r.zrangebyscore(keys.WORKERS, since, "+inf")
        pipe = self.r.pipeline(transaction=False)
        for n in names:
            pipe.hgetall(keys.worker(n))
        return [{"name": n, **h} for n, h in zip(names, pipe.execute()) if h]

    def lease_core(self, host: str, holder: str, cores: Sequence[int], lease_s: float) -> int | None:
        got = self._lease(keys=[keys.core_leases(host)], args=[holder, time.time(), lease_s, *cores])
        return int(got) if got is not None else None

    def release_core(self, host: str, core: int) -> None:
        self.r.hdel(keys.core_leases(host), core)

    def queue_depths(self) -> dict[str, int]:
        pipe = self.r.pipeline(transaction=False)
        pipe.llen(keys.QUEUE_INTERACTIVE)
        pipe.llen(keys.QUEUE_BULK)
        pipe.zcard(keys.PENDING)
        inter, bulk, pending = pipe.execute()
        return {"interactive": inter, "bulk": bulk, "pending_images": pending}

    def unacked_messages(self) -> int:
        """Messages fetched by workers and not yet acknowledged (kombu's unacked hash)."""
        return self.r.hlen(keys.KOMBU_UNACKED)


def _str(v: object) -> str:
    if isinstance(v, float):
        return repr(v)
    if isinstance(v, (dict, list)):
        return json.dumps(v, separators=(",", ":"))
    return str(v)


def _binary_pool(client: redis.Redis) -> redis.ConnectionPool:
    """A pool with the same connection settings as ``client`` but returning bytes (fakeredis too)."""
    kwargs = dict(client.connection_pool.connection_kwargs)
    kwargs["decode_responses"] = False
    return client.connection_pool.__class__(connection_class=client.connection_pool.connection_class, **kwargs)


__all__ = ["Store", "Submitted", "Transitioned", "connect"]
