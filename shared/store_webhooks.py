"""``Store``'s webhook side: the outbox the scripts fill, claims with a lease, and attempts.

A mixin of ``shared.store.Store`` (split out to keep each file readable); it uses the store's
clients, settings and scripts, and never talks to Redis any other way.
"""
from __future__ import annotations

import json
import time
from typing import TYPE_CHECKING, Any, Callable

from shared import keys
from shared.schema import WEBHOOK_PENDING, WEBHOOK_WAITING

if TYPE_CHECKING:
    import redis

    from shared.settings import Settings


class WebhookStore:
    r: "redis.Redis"
    settings: "Settings"
    _script: Callable[..., Any]  # Store._script: run a script of shared/lua with the data model

    def webhook_info(self, event: str, raw: dict[str, str]) -> dict:
        """The webhook as a client reads it on the prediction or job: URL, status, every attempt."""
        attempts = [json.loads(a) for a in self.r.lrange(keys.webhook_attempts(event), 0, -1)]
        return {"url": raw["webhook"], "status": raw.get("webhook_status") or WEBHOOK_WAITING, "attempts": attempts}

    def claim_webhook(self, lease_s: float) -> str | None:
        """The next event due for delivery, leased for ``lease_s`` (back in the outbox if we die)."""
        return self._script("webhook_claim", [keys.WEBHOOK_OUTBOX, keys.WEBHOOK_RETRY, keys.WEBHOOK_INFLIGHT],
                            {"now": repr(time.time()), "lease_s": lease_s}) or None

    def webhook_record(self, event: str) -> tuple[str, dict[str, str]]:
        """(kind, raw record) of an event: kind "prediction" or "job"; raw is empty when it expired."""
        kind, ident = keys.event_target(event)
        return kind, self.r.hgetall(keys.prediction(ident) if kind == "prediction" else keys.job(ident))

    def webhook_attempt_count(self, event: str) -> int:
        """How many delivery attempts of ``event`` are on record."""
        return self.r.llen(keys.webhook_attempts(event))

    def webhook_attempted(self, event: str, attempt: dict, outcome: str, retry_at: float | None = None) -> None:
        """Record one attempt and its consequence: outcome "delivered", "failed" or "retry" (at ``retry_at``)."""
        kind, ident = keys.event_target(event)
        key = keys.prediction(ident) if kind == "prediction" else keys.job(ident)
        pipe = self.r.pipeline()
        pipe.rpush(keys.webhook_attempts(event), json.dumps(attempt, separators=(",", ":")))
        pipe.expire(keys.webhook_attempts(event), self.settings.result_ttl_s)
        pipe.zrem(keys.WEBHOOK_INFLIGHT, event)
        if outcome == "retry":
            pipe.zadd(keys.WEBHOOK_RETRY, {event: retry_at or time.time()})
        if self.r.exists(key):          # an expired record is not recreated
            pipe.hset(key, "webhook_status", WEBHOOK_PENDING if outcome == "retry" else outcome)
        pipe.execute()
