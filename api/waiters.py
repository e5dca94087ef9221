"""Long-polls without polling: one pub/sub listener thread per API process wakes waiting requests.

Workers publish each finished prediction ID on ``keys.DONE_CHANNEL``. A request that wants to wait
registers an Event *before* it re-reads the record, so a result stored in between is never missed.
If the subscription drops, every waiter is woken to re-read (messages may have been lost), and the
listener reconnects. At most ``max_waiters`` requests wait at once per process; past that ``wait``
answers at once, so long-polls can never occupy every server thread and starve submissions.
"""
from __future__ import annotations

import logging
import threading
from contextlib import contextmanager
from typing import Iterator

from api.metrics import LONGPOLLS
from shared.store import Store

log = logging.getLogger("pinfer.api.waiters")


class Waiters:
    def __init__(self, store: Store, max_waiters: int) -> None:
        self.store = store
        self.max_waiters = max_waiters
        self._events: dict[str, set[threading.Event]] = {}
        self._count = 0
        self._lock = threading.Lock()
        self._subscribed = threading.Event()
        self._thread: threading.Thread | None = None

    @contextmanager
    def waiting(self, pid: str) -> Iterator[threading.Event | None]:
        """Yield an Event set when ``pid`` finishes, or None when the waiter cap is reached."""
        self._ensure_listener()
        ev = threading.Event()
        with self._lock:
            if self._count >= self.max_waiters:
                ev = None
            else:
                self._count += 1
                self._events.setdefault(pid, set()).add(ev)
        if ev is not None:
            LONGPOLLS.inc()
        try:
            yield ev
        finally:
            if ev is not None:
                LONGPOLLS.dec()
                with self._lock:
                    self._count -= 1
                    bucket = self._events.get(pid)
                    if bucket is not None:
                        bucket.discard(ev)
                        if not bucket:
                            del self._events[pid]

    def _ensure_listener(self) -> None:
        # Started lazily: gunicorn forks after the app is built, and threads do not survive a fork.
        if self._thread is None or not self._thread.is_alive():
            with self._lock:
                if self._thread is None or not self._thread.is_alive():
                    self._subscribed.clear()
                    self._thread = threading.Thread(target=self._listen, name="pinfer-waiters", daemon=True)
                    self._thread.start()
        self._subscribed.wait(2.0)

    def _wake(self, pid: str | None) -> None:
        with self._lock:
            buckets = list(self._events.values()) if pid is None else [self._events.get(pid, ())]
            for bucket in buckets:
                for ev in bucket:
                    ev.set()

    def _listen(self) -> None:
        backoff = 0.2
        while True:
            pubsub = None
            try:
                pubsub = self.store.subscribe_done()
                self._subscribed.set()
                backoff = 0.2
                for msg in pubsub.listen():
                    if msg.get("type") == "message":
                        data = msg["data"]
                        self._wake(data.decode() if isinstance(data, bytes) else data)
            except Exception as exc:  # connection lost: wake everyone to re-read, then reconnect
                log.warning("done-channel subscription lost (%s); reconnecting", exc)
            finally:
                self._subscribed.clear()
                self._wake(None)
                try:
                    if pubsub is not None:
                        pubsub.close()
                except Exception:
                    pass
            threading.Event().wait(backoff)  # reconnect backoff (not synchronisation)
            backoff = min(backoff * 2, 5.0)
