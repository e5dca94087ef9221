"""``Store``'s worker side: heartbeats, core leases, queue lengths and the sweeper's reads and lock.

A mixin of ``shared.store.Store`` (split out to keep each file readable); it uses the store's
clients, settings and scripts, and never talks to Redis any other way.
"""
from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any, Callable, Sequence

from shared import keys
from shared.schema import field_text

if TYPE_CHECKING:
    import redis

    from shared.settings import Settings


class WorkerStore:
    r: "redis.Redis"
    settings: "Settings"

    _script: Callable[..., Any]  # Store._script: run a script of shared/lua with the data model

    # ------------------------------------------------------------------ heartbeats
    def heartbeat(self, name: str, info: dict) -> None:
        now = time.time()
        pipe = self.r.pipeline(transaction=False)
        pipe.hset(keys.worker(name), mapping={k: field_text(v) for k, v in {**info, "seen_at": now}.items()})
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
        got = self._script("lease_core", [keys.core_leases(host)],
                           {"holder": holder, "now": repr(time.time()), "lease_s": lease_s, "cores": list(cores)})
        return int(got) if got is not None else None

    def release_core(self, host: str, core: int) -> None:
        self.r.hdel(keys.core_leases(host), core)

    # ------------------------------------------------------------------ queues
    def queue_depths(self) -> dict[str, int]:
        pipe = self.r.pipeline(transaction=False)
        pipe.llen(keys.QUEUE_INTERACTIVE)
        pipe.llen(keys.QUEUE_BULK)
        pipe.zcard(keys.PENDING)
        inter, bulk, pending = pipe.execute()
        return {"interactive": inter, "bulk": bulk, "pending_images": pending}

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

    def unacked_messages(self) -> int:
        """Messages fetched by workers and not yet acknowledged (kombu's unacked hash)."""
        return self.r.hlen(keys.KOMBU_UNACKED)

    # ------------------------------------------------------------------ the sweeper (worker/sweeper.py)
    def sweep_lock(self, ttl_s: int) -> bool:
        """Take the sweep lock for ``ttl_s`` (only one worker sweeps at a time); False when held."""
        return bool(self.r.set(keys.SWEEP_LOCK, "1", nx=True, ex=ttl_s))

    def sweep_unlock(self) -> None:
        self.r.delete(keys.SWEEP_LOCK)

    def queue_head(self, queue: str) -> str | None:
        """The raw message BRPOP will take next from ``queue`` (None when empty)."""
        return self.r.lindex(queue, -1)

    def pending_due(self, until: float, limit: int) -> list[str]:
        """IDs in the pending set scored up to ``until`` (created_at + image TTL), oldest first."""
        return self.r.zrangebyscore(keys.PENDING, "-inf", until, start=0, num=limit)

    def unacked_payloads(self) -> list[str]:
        """kombu's unacked entries ([message, exchange, routing key] JSON): messages a worker holds."""
        return self.r.hvals(keys.KOMBU_UNACKED)

    def sweep_suspects(self) -> dict[str, str]:
        """Prediction ID -> when a sweep first saw it orphaned."""
        return self.r.hgetall(keys.SWEEP_SUSPECTS)

    def set_sweep_suspects(self, suspects: dict[str, str]) -> None:
        """Replace the suspects with ``suspects`` (forgotten after keys.SWEEP_SUSPECTS_TTL_S)."""
        pipe = self.r.pipeline()
        pipe.delete(keys.SWEEP_SUSPECTS)
        if suspects:
            pipe.hset(keys.SWEEP_SUSPECTS, mapping=suspects)
            pipe.expire(keys.SWEEP_SUSPECTS, keys.SWEEP_SUSPECTS_TTL_S)
        pipe.execute()
