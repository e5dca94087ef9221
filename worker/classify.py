"""What a worker does with a batch of prediction IDs, independent of Celery.

1. Claim each ID (queued/running -> running, attempts + 1) in one round trip. An ID already finished
   (a duplicate delivery) or canceled is skipped.
2. Just before a group of images is decoded and run through the model, the group is marked in
   flight (``runs`` + 1, and ``alone_runs`` + 1 when the group is one image). If the process dies, a
   crash has been charged to exactly the images that were in flight, never to images that only
   shared a delivery with them.
3. IDs that were in flight when a worker died are suspects: each runs in a forward pass of its own,
   after the fresh ones are stored (those never yet run alone first). A poison image therefore crashes
   alone on its next run, while a healthy neighbour runs alone and succeeds, whatever their order.
   An image that has been in flight PINFER_MAX_DELIVERIES times, at least once alone, is failed
   ``worker_crashed`` instead of looping: only an image that crashed with no other image beside it
   can be blamed.
4. Decode + preprocess each image; a bad one fails alone. One forward pass per chunk of at most
   PINFER_MAX_BATCH images. Results go back in one pipelined round trip.
Interactive items go first. While interactive traffic is recent (PINFER_INTERACTIVE_WINDOW_S), bulk
items run PINFER_BULK_CHUNK at a time, and between chunks the worker looks at the interactive queue
and hands the rest of the bulk items back (``Outcome.deferred``) when interactive work is waiting;
otherwise bulk runs in full batches, for throughput.
"""
from __future__ import annotations

import logging
import os
import signal
import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np

from shared import logs
from shared.errors import ImageExpired, ImageError, InferenceError, PinferError, WorkerCrashed
from shared.labels import load_labels
from shared.schema import FAILED, INTERACTIVE, QUEUED, RUNNING, SUCCEEDED
from shared.settings import Settings
from shared.store import Store, cache_digest
from shared.transforms import preprocess
from worker import metrics as m

log = logging.getLogger(__name__)


@dataclass
class Item:
    pid: str
    lane: str = INTERACTIVE
    tag: object = None  # the caller's handle (the Celery request)


@dataclass
class Outcome:
    done: list[Item] = field(default_factory=list)
    deferred: list[Item] = field(default_factory=list)
    batch_sizes: list[int] = field(default_factory=list)


@dataclass
class _Claimed:
    item: Item
    runs: int = 0
    alone_runs: int = 0
    created_at: float = 0.0
    started_at: float = 0.0
    top_k: int = 5
    request_id: str | None = None
    job_id: str | None = None
    content_sha: str | None = None  # set by the API when the result cache is on


class Classifier:
    def __init__(self, settings: Settings, store: Store, runtime, worker_name: str,
                 interactive_waiting: Callable[[], bool] | None = None,
                 interactive_recent: Callable[[], bool] | None = None) -> None:
        self.s = settings
        self.store = store
        self.runtime = runtime
        self.worker_name = worker_name
        self.labels = load_labels()
        self.interactive_waiting = interactive_waiting or store.interactive_waiting
        self.interactive_recent = interactive_recent or store.interactive_recent
        self.kill_marker = settings.chaos_kill_marker.encode() if settings.chaos_kill_marker else b""

    def run(self, items: Sequence[Item], may_defer: bool = True) -> Outcome:
        out = Outcome()
        interactive = [i for i in items if i.lane == INTERACTIVE]
        bulk = [i for i in items if i.lane != INTERACTIVE]
        self._process(interactive, out)
        # Full batches while nobody waits interactively; small chunks that yield while someone might.
        step = self.s.bulk_chunk if bulk and (interactive or self.interactive_recent()) else self.s.max_batch
        for start in range(0, len(bulk), step):
            # Also before the first chunk: kombu's event loop fires a due flush timer before it reads
            # the socket, so a flush right after a hand-back would otherwise run one more bulk chunk
            # ahead of the interactive message it handed back for.
            if may_defer and self.interactive_waiting():
                out.deferred.extend(bulk[start:])
                m.DEFERRED.inc(len(bulk) - start)
                break
            self._process(bulk[start:start + step], out)
        return out

    # ------------------------------------------------------------------ one group
    def _process(self, items: list[Item], out: Outcome) -> None:
        if not items:
            return
        claimed = self._claim(items)
        out.done.extend(items)
        fresh = [c for c in claimed if c.runs == 0]
        # Images that were in flight when a worker died run one at a time, those never yet run alone
        # first: a known crasher goes last, so it cannot take another suspect's turn again.
        suspects = sorted((c for c in claimed if c.runs > 0), key=lambda c: c.alone_runs > 0)
        for start in range(0, len(fresh), self.s.max_batch):
            self._classify(fresh[start:start + self.s.max_batch], out)
        for c in suspects:  # one at a time: a poison image only takes itself down
            self._classify([c], out)

    def _claim(self, items: list[Item]) -> list[_Claimed]:
        now = time.time()
        results = self.store.transition_many(
            (i.pid, RUNNING, (QUEUED, RUNNING), {"started_at": now, "worker": self.worker_name}, True)
            for i in items)
        mine = [item for item, t in zip(items, results) if t.outcome == "ok"]
        m.REDELIVERIES.inc(sum(1 for t in results if t.outcome == "ok" and t.attempts > 1))
        # (not "ok": finished already (a duplicate delivery), canceled, or expired)
        claimed, crashed = [], []
        for item, rec in zip(mine, self.store.get_many([i.pid for i in mine])):
            if rec is None:
                continue
            c = _Claimed(item, rec.runs, rec.alone_runs, rec.created_at, now, rec.top_k, rec.request_id, rec.job_id,
                         rec.content_sha)
            m.QUEUE_WAIT.labels(item.lane).observe(max(0.0, now - rec.created_at))
            if c.runs >= self.s.max_deliveries and c.alone_runs > 0:
                crashed.append(c)
            else:
                claimed.append(c)
        if crashed:
            self._fail([(c, WorkerCrashed(
                f"the worker process died each of the {c.runs} times it ran this image "
                f"({c.alone_runs} of them with no other image in the forward pass)")) for c in crashed])
        return claimed

    def _classify(self, group: list[_Claimed], out: Outcome) -> None:
        datas = self.store.start_run([c.item.pid for c in group])
        tensors, ok, failures = [], [], []
        for c, data in zip(group, datas):
            try:
                if data is None:
                    raise ImageExpired("the uploaded image expired before a worker reached it "
                                       f"(PINFER_IMAGE_TTL_S={self.s.image_ttl_s})")
                if self.kill_marker and self.kill_marker in data:
                    log.error("chaos marker found in %s: killing this worker process", c.item.pid)
                    os.kill(os.getpid(), signal.SIGKILL)
                t_pre = time.perf_counter()
                tensors.append(preprocess(data, self.s))
                m.PREPROCESS.observe(time.perf_counter() - t_pre)
                ok.append(c)
            except ImageError as exc:
                failures.append((c, exc))
        if ok:
            t0 = time.perf_counter()
            try:
                probs = self.runtime.forward(np.stack(tensors))
            except InferenceError as exc:
                failures.extend((c, exc) for c in ok)
                ok = []
            infer_s = time.perf_counter() - t0
            infer_ms = infer_s * 1000
        if failures:
            self._fail(failures)
        if ok:
            out.batch_sizes.append(len(ok))
            m.BATCH_SIZE.observe(len(ok))
            for _ in ok:
                m.INFERENCE.observe(infer_s)
            self._store_results(ok, probs, infer_ms)

    def _store_results(self, group: list[_Claimed], probs: np.ndarray, infer_ms: float) -> None:
        now = time.time()
        model = self.runtime.info.public()
        changes, cacheable = [], []
        for c, p in zip(group, probs):
            idx, scores = self.runtime.top_k(p, c.top_k)
            result = {
                "top_k": [{"label": self.labels[i], "class_index": int(i), "score": float(s)}
                          for i, s in zip(idx, scores)],
                "model": model,
                "timings": {"queued_ms": round((c.started_at - c.created_at) * 1000, 2),
                            "inference_ms": round(infer_ms, 2), "batch_size": len(group),
                            "total_ms": round((now - c.created_at) * 1000, 2)},
                "cached": False,
            }
            changes.append((c.item.pid, SUCCEEDED, (RUNNING,), {"result": result, "finished_at": now}, False))
            if c.content_sha:
                cacheable.append((cache_digest(c.content_sha, model["sha256"], model["precision"], self.s.resize,
                                               c.top_k), {k: v for k, v in result.items() if k != "timings"}))
        stored = self.store.transition_many(changes)
        for c, t in zip(group, stored):
            if t.outcome != "ok":  # canceled meanwhile: not this worker's result
                continue
            m.IMAGES.labels(c.item.lane, SUCCEEDED, "none").inc()
            m.END_TO_END.labels(c.item.lane).observe(max(0.0, now - c.created_at))
            with logs.bind(request_id=c.request_id, prediction_id=c.item.pid, job_id=c.job_id):
                log.info("classified", extra={"duration_ms": round((now - c.created_at) * 1000, 2),
                                              "batch_size": len(group), "inference_ms": round(infer_ms, 2)})
        if cacheable:
            try:  # the results are stored; a cache that cannot be filled only costs a later inference
                self.store.cache_put(cacheable)
            except Exception as exc:
                log.warning("result cache not updated: %s", exc)

    def _fail(self, failures: list[tuple[_Claimed, PinferError]]) -> None:
        now = time.time()
        stored = self.store.transition_many(
            (c.item.pid, FAILED, (QUEUED, RUNNING), {"error_code": e.code, "error_message": e.message,
                                                     "finished_at": now}, False)
            for c, e in failures)
        for (c, e), t in zip(failures, stored):
            if t.outcome != "ok":
                continue
            m.IMAGES.labels(c.item.lane, FAILED, e.code).inc()
            with logs.bind(request_id=c.request_id, prediction_id=c.item.pid, job_id=c.job_id):
                log.info("failed", extra={"error_code": e.code, "duration_ms": round((now - c.created_at) * 1000, 2)})
