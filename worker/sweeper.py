"""Finds accepted predictions whose broker message was lost, and publishes them again.

kombu's Redis transport pops a message with BRPOP *before* it records it in its ``unacked`` hash,
and a worker's event loop keeps one BRPOP outstanding while it runs a batch. A worker killed in
that window takes the popped message with it: nothing in Redis refers to it any more, and its
prediction would stay ``queued`` forever. (An API process that dies between storing an image and
publishing its ID leaves the same trace.) Every ``interval`` seconds one worker (Redis lock) looks
at predictions still ``queued`` with 0 attempts that are older than the grace period and older than
the message at the head of their queue (queues are FIFO, so such a message was already popped),
and that no unacked message refers to. A live worker may hold one popped message for the length
of a batch before recording it, so a prediction is republished only when two sweeps at least
``confirm_s`` apart both find it orphaned. The claim step makes a rare
double delivery harmless: a finished prediction is never classified twice. Reading kombu's
messages (queue items, the ``unacked`` hash) is worker.celery_adapter's job.
"""
from __future__ import annotations

import logging
import time
from typing import Callable

from shared import keys
from shared.schema import QUEUED
from shared.store import Store
from worker.celery_adapter import message_pid, unacked_pids

log = logging.getLogger("pinfer.sweeper")


class Sweeper:
    def __init__(self, store: Store, publish: Callable[[str, str], None], grace_s: float,
                 confirm_s: float = 4.0, limit: int = 500) -> None:
        self.store = store
        self.publish = publish
        self.grace_s = grace_s
        self.confirm_s = confirm_s
        self.limit = limit

    def sweep(self) -> list[str]:
        if not self.store.sweep_lock(max(5, int(self.grace_s))):
            return []
        try:
            return self._sweep()
        finally:
            self.store.sweep_unlock()

    def _head_enqueued_at(self, queue: str) -> float:
        """When the next message BRPOP will take from ``queue`` was published (inf when empty)."""
        head = self.store.queue_head(queue)
        pid = message_pid(head) if head else None
        rec = self.store.get(pid) if pid else None
        return rec.enqueued_at if rec else float("inf")

    def _sweep(self) -> list[str]:
        now = time.time()
        cutoff = min(now - self.grace_s, self._head_enqueued_at(keys.QUEUE_INTERACTIVE),
                     self._head_enqueued_at(keys.QUEUE_BULK))
        ttl = self.store.settings.image_ttl_s
        # The pending set is scored by created_at + image TTL (created_at <= enqueued_at).
        candidates = self.store.pending_due(cutoff + ttl, self.limit)
        if not candidates:
            self.store.set_sweep_suspects({})
            return []
        held = unacked_pids(self.store.unacked_payloads())
        orphans = [p for p in self.store.get_many(candidates)
                   if p is not None and p.status == QUEUED and p.attempts == 0 and p.id not in held
                   and p.enqueued_at < cutoff]
        seen = self.store.sweep_suspects()
        confirmed = [p for p in orphans if p.id in seen and float(seen[p.id]) <= now - self.confirm_s]
        for p in confirmed:
            log.warning("prediction %s was accepted %.0fs ago but its message is gone; publishing it again",
                        p.id, now - p.created_at)
            self.publish(p.id, p.lane)
            # Re-stamped: the new message sits behind the queue head, so it is not swept again.
            self.store.mark_enqueued(p.id, at=time.time())
        done = {p.id for p in confirmed}
        suspects = {p.id: seen.get(p.id, repr(now)) for p in orphans if p.id not in done}
        self.store.set_sweep_suspects(suspects)
        return sorted(done)
