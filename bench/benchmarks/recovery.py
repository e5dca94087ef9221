"""SIGKILL of a worker mid-batch, production delivery settings: nothing lost, and how long until all is done.

One worker, PINFER_VISIBILITY_TIMEOUT_S as configured (30 s default); 60 images submitted; as soon
as some are ``running``, the Celery worker process (pid from ``/readyz``) gets SIGKILL; then every
result is long-polled. ``recovery`` = last ``finished_at`` - kill time.
"""
from __future__ import annotations

import os
import signal
import threading
import time

from bench.core import Ctx, Figures, errors, statuses
from bench.http import get_status, run_threads, submit, wait_result
from bench.stack import BenchError, ready_times

NAME = "recovery"


def run(ctx: Ctx, f: Figures) -> None:
    v = ctx.service_variant()
    n = 60
    items = ctx.corpus.repeated(n)
    with ctx.stack("recovery", v, workers=1) as st:
        st.wait_workers(1)  # its heartbeat names the pid to kill
        vis = st.full_env.get("PINFER_VISIBILITY_TIMEOUT_S") or "30 (default)"
        ids = run_threads(lambda im: submit(st.base, im.data)["id"], items, 8)
        deadline = time.monotonic() + 60
        running = 0
        while time.monotonic() < deadline:
            sts = run_threads(lambda pid: get_status(st.base, pid)["status"], ids, 8)
            running = sts.count("running")
            if running:
                break
            time.sleep(0.02)
        if not running:
            raise BenchError("no prediction reached `running` within 60 s")
        done_before = sum(1 for s in sts if s in ("succeeded", "failed"))
        victims = [w for w in st.ready_workers()]
        if not victims:
            raise BenchError("no ready worker to kill")
        victim = int(victims[0]["pid"])
        killed_at = time.time()
        os.kill(victim, signal.SIGKILL)

        new_ready: dict[str, float] = {}
        stop = threading.Event()

        log = st.worker_logs[0]
        n_ready = len(ready_times(log))

        def watch() -> None:  # when did the launcher's replacement say `ready.` (else: heartbeat)?
            while not stop.is_set():
                try:
                    times = ready_times(log)
                    if len(times) > n_ready:
                        new_ready["t"] = times[n_ready] - killed_at
                        return
                    if any(int(w["pid"]) != victim for w in st.ready_workers()):
                        new_ready["t"] = time.time() - killed_at
                        new_ready["via"] = "heartbeat"
                        return
                except Exception:
                    pass
                stop.wait(0.1)

        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()
        try:
            recs = run_threads(lambda pid: wait_result(st.base, pid, timeout=180), ids, 16)
        finally:
            stop.set()
            watcher.join(5)
        client_done = time.time() - killed_at
        problems = st.log_problems()
    fins = [r["finished_at"] for r in recs if r.get("finished_at")]
    recovery = max(fins) - killed_at
    redelivered = [r for r in recs if (r.get("attempts") or 0) > 1]
    f.add("recovery", recovery, "s")
    f.add("recovery_client_observed", client_done, "s")
    f.add("redelivered", len(redelivered))
    f.add("running_at_kill", running)
    f.add("finished_before_kill", done_before)
    f.add("new_worker_ready_after", new_ready.get("t", float("nan")), "s")
    after = sorted(fi - killed_at for fi in fins if fi > killed_at)
    f.add("finished_after_kill_within_10s", sum(1 for a in after if a <= 10))
    f.add("finished_after_kill_after_25s", sum(1 for a in after if a > 25))
    f.add("held_back_not_redelivered", sum(1 for r in recs if (r.get("attempts") or 0) <= 1
                                           and r.get("finished_at", 0) - killed_at > 25))
    if redelivered:
        f.add("redelivered_finished_after", min(r["finished_at"] for r in redelivered) - killed_at, "s")
    f.add("statuses", statuses(recs))
    if errors(recs):
        f.add("errors", errors(recs))
    f.note(f"{n} images, 1 worker, PINFER_VISIBILITY_TIMEOUT_S={vis}; SIGKILL of the Celery worker "
           "process (pid from /readyz) while a batch was running; recovery = last finished_at - kill time")
    if problems:
        f.note(f"error lines in logs (a killed worker logs some): {problems}")
