"""Redis access for predictions, jobs and worker heartbeats: the only module that talks to Redis keys.

Both the API and the worker go through ``Store``; every state change runs one of the scripts in
``shared.lua`` so it is atomic. Records use a text client; image bytes a binary one.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Iterable, Sequence

import redis

from shared import keys, lua
from shared.errors import Conflict, NotFound, Overloaded
from shared.schema import (CANCELED, FAILED, INTERACTIVE, JOB_CANCELED, JOB_FINISHED, JOB_OPEN, QUEUED, RUNNING,
                           Job, Prediction)
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


def connect(url: str, decode: bool = True) -> redis.Redis:
    return redis.Redis.from_url(url, decode_responses=decode, health_check_interval=30,
                                socket_keepalive=True, retry_on_timeout=True)


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

    # ------------------------------------------------------------------ predictions
    def submit(self, pid: str, data: bytes, top_k: int, lane: str = INTERACTIVE, job_id: str | None = None,
               name: str | None = None, error: dict | None = None) -> Submitted:
        """Store bytes + record (and job bookkeeping) if the backpressure bounds allow it.

        ``error`` records an image rejected at submit as an already-failed job result, so a job's
        results have one line per image sent. Raises Overloaded, NotFound or Conflict.
        """
        now = time.time()
        status = FAILED if error else QUEUED
        fields = ["created_at", repr(now), "top_k", str(top_k), "lane", lane, "attempts", "0", "size", str(len(data))]
        if job_id:
            fields += ["job_id", job_id, "name", name or ""]
        if error:
            fields += ["error_code", error["code"], "error_message", error["message"], "finished_at", repr(now)]
        jkeys = ([keys.job(job_id), keys.job_pending(job_id), keys.job_items(job_id), keys.job_names(job_id),
                  keys.job_done(job_id)] if job_id else ["", "", "", "", ""])
        s = self.settings
        res = self._submit(
            keys=[keys.PENDING, keys.prediction(pid), keys.image(pid), *jkeys,
                  keys.INTERACTIVE_RECENT if lane == INTERACTIVE else ""],
            args=[pid, now, s.max_pending_images, s.image_ttl_s, s.result_ttl_s, data if not error else b"",
                  s.max_pending_per_job, name or "", status, s.interactive_window_s, *fields])
        outcome = res[0]
        if outcome == "ok":
            if error:
                self.r.publish(keys.DONE_CHANNEL, pid)
            return Submitted("ok", pid, now)
        if outcome == "duplicate":
            return Submitted("duplicate", res[1])
        if outcome == "overloaded":
            scope = res[1]
            limit = s.max_pending_images if scope == "global" else s.max_pending_per_job
            raise Overloaded(f"{limit} images are already waiting to be classified "
                             f"({'in total' if scope == 'global' else 'in this job'}); retry after "
                             f"{s.retry_after_s} s", retry_after_s=s.retry_after_s, scope=scope)
        if outcome == "no_job":
            raise NotFound(f"job {job_id} does not exist or has expired")
        raise Conflict(f"job {job_id} is {outcome[4:]}: it accepts no more images")

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
        return Prediction.from_redis(pid, raw) if raw else None

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
            self._transition(keys=[keys.prediction(pid), keys.image(pid), keys.PENDING],
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

    # ------------------------------------------------------------------ jobs
    def create_job(self, jid: str, name: str | None, top_k: int) -> Job:
        now = time.time()
        mapping = {"status": JOB_OPEN, "created_at": repr(now), "top_k": top_k, "name": name or "", "total": 0}
        pipe = self.r.pipeline()
        pipe.hset(keys.job(jid), mapping=mapping)
        pipe.expire(keys.job(jid), self.settings.result_ttl_s)
        pipe.execute()
        return self.get_job(jid)

    def get_job(self, jid: str) -> Job:
        raw = self.r.hgetall(keys.job(jid))
        if not raw:
            raise NotFound(f"job {jid} does not exist or has expired")
        return Job.from_redis(jid, raw)

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

    def close_job(self, jid: str) -> Job:
        if self._close(keys=[keys.job(jid)], args=[time.time()]) == "missing":
            raise NotFound(f"job {jid} does not exist or has expired")
        return self.get_job(jid)

    def cancel_job(self, jid: str, chunk: int = 1000) -> Job:
        """Mark the job canceled (no more uploads), then every still-queued image canceled."""
        job = self.get_job(jid)
        if job.status in (JOB_CANCELED, JOB_FINISHED):
            return job  # nothing left to cancel: a finished job stays finished
        self.r.hset(keys.job(jid), mapping={"status": JOB_CANCELED, "finished_at": repr(time.time())})
        err = {"error_code": "canceled", "error_message": "the job was canceled before this image ran",
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
