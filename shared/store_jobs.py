"""``Store``'s jobs: create, read, close, cancel, and the results cursor.

A mixin of ``shared.store.Store`` (split out to keep each file readable); it uses the store's
clients, settings and scripts, and never talks to Redis any other way.
"""
from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any, Callable

from shared import keys
from shared.errors import Canceled, NotFound
from shared.schema import CANCELED, JOB_CANCELED, JOB_FINISHED, QUEUED, WEBHOOK_PENDING, Job, Prediction

if TYPE_CHECKING:
    import redis

    from shared.settings import Settings
    from shared.store import IdempotencyClaim


class JobStore:
    r: "redis.Redis"
    settings: "Settings"
    _script: Callable[..., Any]  # Store._script: run a script of shared/lua with the data model
    _replicated: Callable[[str], None]
    transition_many: Callable[..., Any]
    get_many: Callable[..., list]
    webhook_info: Callable[..., dict]

    def create_job(self, jid: str, name: str | None, top_k: int, webhook: str | None = None,
                   owner: str | None = None, claim: "IdempotencyClaim | None" = None) -> Job:
        """Create an open job; ``claim``: the request's Idempotency-Key, recorded in the same step."""
        fields = {"created_at": repr(time.time()), "top_k": str(top_k), "name": name or "", "total": "0",
                  "owner": owner or ""}
        if webhook:
            fields["webhook"] = webhook
        options = {"id": jid, "now": fields["created_at"], "fields": fields}
        if claim is not None:
            options["idem"] = {"fingerprint": claim.fingerprint, "status": str(claim.http_status)}
        self._script("create_job", [keys.job(jid), keys.JOBS, claim.key if claim is not None else ""], options)
        self._replicated("the job")
        return self.get_job(jid)

    def get_job(self, jid: str) -> Job:
        raw = self.r.hgetall(keys.job(jid))
        if not raw:
            raise NotFound(f"job {jid} does not exist or has expired")
        job = Job.from_redis(jid, raw)
        if raw.get("webhook"):
            job.webhook = self.webhook_info(keys.job_event(jid), raw)
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
        if self._script("close_job", [keys.job(jid), keys.WEBHOOK_OUTBOX],
                        {"now": repr(time.time()), "event": keys.job_event(jid)}) == "missing":
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
            pipe.hset(keys.job(jid), "webhook_status", WEBHOOK_PENDING)
            pipe.rpush(keys.WEBHOOK_OUTBOX, keys.job_event(jid))
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
