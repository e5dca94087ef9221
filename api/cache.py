"""The result cache as the API sees it: an identical upload is answered from a stored result.

A result depends on the bytes, the model artifact, the precision, the resize mode and ``top_k``; the
API knows the bytes and ``top_k`` but not what the workers serve, so it reads that from their
heartbeats. Only when every ready worker serves the same (sha256, precision, resize) is a hit
possible: during a roll-out (two models at once) nothing is answered from the cache, so a client
never gets the old model's answer after the new one took over, nor a mix.
"""
from __future__ import annotations

import hashlib
import threading
import time
from dataclasses import dataclass

from shared.schema import SERVING
from shared.store import Store, cache_digest

#: How long one API process trusts its last reading of the workers' heartbeats. Short, so a roll-out
#: is noticed within a second, and long enough that a busy API reads them rarely.
SERVING_TTL_S = 1.0


@dataclass(frozen=True)
class Serving:
    sha256: str
    precision: str
    resize: str


class ResultCache:
    """One per API process (``Pinfer.cache``)."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.enabled = store.settings.cache_ttl_s > 0
        self._lock = threading.Lock()
        self._serving: Serving | None = None
        self._read_at = float("-inf")

    def serving(self) -> Serving | None:
        """The one model all ready workers serve, or None (no worker, or several models)."""
        now = time.monotonic()
        with self._lock:
            if now - self._read_at < SERVING_TTL_S:
                return self._serving
        ready = [w for w in self.store.live_workers() if w.get("state") in SERVING]
        models = {(w.get("sha256"), w.get("precision"), w.get("resize") or self.store.settings.resize)
                  for w in ready}
        found = None
        if len(models) == 1:
            sha, precision, resize = models.pop()
            if sha and precision:
                found = Serving(sha, precision, resize)
        with self._lock:
            self._serving, self._read_at = found, now
        return found

    def lookup(self, data: bytes, top_k: int) -> tuple[str | None, dict | None]:
        """(sha256 of ``data``, cached result or None). The sha goes into the record so the worker can
        fill the cache; both are None when the cache is off."""
        if not self.enabled:
            return None, None
        content = hashlib.sha256(data).hexdigest()
        model = self.serving()
        if model is None:
            return content, None
        hit = self.store.cache_get(cache_digest(content, model.sha256, model.precision, model.resize, top_k))
        if hit is None:
            return content, None
        hit.update(cached=True, timings={"queued_ms": 0.0, "inference_ms": 0.0, "batch_size": 0, "total_ms": 0.0})
        return content, hit
