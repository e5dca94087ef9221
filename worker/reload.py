"""Model roll-out without a restart: when a worker loads a new model, and how a failure is kept harmless.

A new model arrives as a new ``manifest.json`` in PINFER_MODEL_DIR (``pinfer export-model`` writes the
artifacts first and replaces the manifest last, atomically), or as a request from ``pinfer reload``
(a Redis counter the heartbeat thread reads). The worker's inference thread asks ``Reloader.due()``
between batches; when it says so, ``Reloader.reload()`` reads the manifest, chooses the variant as at
start-up, verifies its sha256, loads and warms it, and only then replaces the runtime. A batch
therefore never mixes two models, and a load that fails (missing or tampered file, a manifest that
does not parse, a backend error) leaves the old model serving, with the reason and the refused sha
in ``Reloader.error`` for the heartbeat and ``/readyz``.

Why a stat poll and not inotify: the model folder is often a network or ConfigMap/PVC volume where
inotify does not fire, and one ``stat`` every PINFER_RELOAD_CHECK_S costs microseconds. The file is
hashed only when its (inode, size, mtime) changed, and a manifest once refused is not retried until
it changes again or ``pinfer reload`` asks (a bad artifact would otherwise be re-read every check).

No Celery here (``worker/app.py`` calls it from the consumer's event loop, the thread that runs
batches); the clock and the loader are injectable, so the decisions are unit-tested without torch.
"""
from __future__ import annotations

import hashlib
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from shared.settings import Settings

log = logging.getLogger(__name__)

#: How often the worker's event loop asks ``due()`` (the stat itself is rate-limited separately by
#: PINFER_RELOAD_CHECK_S). Short, so that `pinfer reload` is acted on within a heartbeat plus this.
TICK_S = 0.5

REQUESTED = "requested by `pinfer reload`"
CHANGED = "manifest.json changed"


@dataclass(frozen=True)
class Stamp:
    """What ``stat`` says about the manifest: a replaced file (``os.replace``) has a new inode."""

    inode: int
    size: int
    mtime_ns: int


def manifest_stamp(path: Path) -> Stamp | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return Stamp(st.st_ino, st.st_size, st.st_mtime_ns)


def manifest_digest(path: Path) -> str | None:
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()
    except OSError:
        return None


def _plan(settings: Settings):
    from worker.runtime import plan_model

    return plan_model(settings)


def _load(settings: Settings, plan: Any, threads: int | None):
    from worker.runtime import ModelRuntime

    return ModelRuntime(settings, threads=threads, plan=plan)


class Reloader:
    """Owns the runtime a worker serves and replaces it when the model folder changes or a reload is asked.

    Not thread-safe except ``request`` (an int assignment, from the heartbeat thread): ``due`` and
    ``reload`` run in the thread that runs batches, which is what keeps a swap between batches.
    """

    def __init__(self, settings: Settings, runtime: Any, generation: int = 0,
                 plan: Callable[[Settings], Any] = _plan,
                 load: Callable[[Settings, Any, int | None], Any] = _load,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.settings = settings
        self.runtime = runtime
        self.path = settings.manifest_path
        self.check_s = settings.reload_check_s
        self._plan, self._load, self._clock = plan, load, clock
        self._seen = self._wanted = generation  # `pinfer reload` generations: acted on / asked for
        # None: the first check hashes the manifest (it may have changed while the runtime loaded).
        self._stamp: Stamp | None = None
        self._refused: str | None = None  # digest of a manifest whose model failed to load
        self.served_manifest: str = runtime.manifest_sha256  # digest of the manifest the served model came from
        self._next_check = clock()
        self.error: dict | None = None
        self.reloads = 0

    # ------------------------------------------------------------------ deciding
    def request(self, generation: int) -> None:
        """The reload counter as the heartbeat thread read it; a value above the last one acted on asks."""
        if generation > self._wanted:
            self._wanted = generation

    def due(self) -> str | None:
        """Why to reload now, or None. Cheap enough for every tick: a memory compare, and a ``stat``
        at most every PINFER_RELOAD_CHECK_S."""
        if self._wanted > self._seen:
            return REQUESTED
        if self.check_s <= 0:
            return None
        now = self._clock()
        if now < self._next_check:
            return None
        self._next_check = now + self.check_s
        stamp = manifest_stamp(self.path)
        if stamp is None or stamp == self._stamp:
            return None
        self._stamp = stamp
        digest = manifest_digest(self.path)
        if digest is None:
            return None
        if digest == self.served_manifest:
            self.error = None  # the manifest is back to what is served (e.g. a bad one rolled back)
            return None
        if digest == self._refused:
            return None
        return CHANGED

    # ------------------------------------------------------------------ acting
    def reload(self, reason: str) -> bool:
        """Load what the model folder names now and swap it in; True when the served model changed.

        Nothing to load (the manifest names what is served, e.g. an export that only added another
        variant) is not an error. Any failure keeps the old runtime and sets ``error``.
        """
        self._seen = self._wanted
        t0 = time.perf_counter()
        current = self.runtime
        try:
            plan = self._plan(self.settings)
        except Exception as exc:
            self._fail(exc, manifest_digest(self.path), None)
            return False
        target = plan.info
        if target == current.info:
            self.served_manifest = plan.manifest_sha256
            self._refused, self.error = None, None
            log.info("model reload (%s): the manifest still names %s %s, already served", reason,
                     target.sha256[:12], plan.choice.variant.key)
            return False
        log.info("model reload (%s): loading %s %s (serving %s %s until it is verified and warm)", reason,
                 target.sha256[:12], plan.choice.variant.key, current.info.sha256[:12],
                 f"{current.precision}/{current.runtime}")
        try:
            new = self._load(self.settings, plan, getattr(current, "threads", None))
        except Exception as exc:
            self._fail(exc, plan.manifest_sha256, target.sha256)
            return False
        self.runtime, self.served_manifest = new, plan.manifest_sha256
        self._refused, self.error = None, None
        self.reloads += 1
        log.info("model reload: now serving %s (%s, pretrained=%s, %s/%s) instead of %s, after %.1fs",
                 new.info.name, new.info.sha256[:12], new.info.pretrained, new.precision, new.runtime,
                 current.info.sha256[:12], time.perf_counter() - t0)
        return True

    def _fail(self, exc: Exception, manifest_sha: str | None, sha: str | None) -> None:
        self._refused = manifest_sha
        self.error = {"reason": str(exc), "sha256": sha, "manifest_sha256": manifest_sha, "at": round(time.time(), 3)}
        log.error("model reload refused, still serving %s: %s", self.runtime.info.sha256[:12], exc)
