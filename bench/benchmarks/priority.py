"""Interactive latency while a bulk job keeps both workers busy, against idle (target p95 ratio <= 2).

Two workers on two cores. First the idle figure on this stack (one image at a time). Then a bulk
job of 5000 images (2000 with --quick) is uploaded from a thread; once the bulk queue is non-empty
and both workers are busy, 60 single interactive classifications run one at a time. The job is
canceled at the end.
"""
from __future__ import annotations

import threading
import time
from typing import Any

from bench.benchmarks.bulk import upload
from bench.core import Ctx, Figures, summarize_ms, timing_stats
from bench.http import client, get_status, sequential_latencies, stats
from bench.stack import BenchError

NAME = "priority"


def run(ctx: Ctx, f: Figures) -> None:
    v = ctx.service_variant()
    n_bulk = 2000 if ctx.quick else 5000
    n_idle, n_loaded, warm = (20, 60, 3) if ctx.quick else (40, 60, 5)
    img = ctx.corpus.mid_jpeg()
    items = ctx.corpus.repeated(n_bulk)
    with ctx.stack("priority", v, cores=ctx.all_cores, workers=2) as st:
        c = client(st.base)
        idle, _, _ = sequential_latencies(st.base, img.data, n_idle, warm)
        stop = threading.Event()
        counters: dict[str, Any] = {}
        jid = c.create_job(name="bench-priority")["id"]

        def uploader() -> None:
            try:
                counters["in"] = upload(st.base, jid, items, counters, stop=stop)
                if not stop.is_set():
                    c.close_job(jid)
            except Exception as exc:
                counters["error"] = repr(exc)

        th = threading.Thread(target=uploader, daemon=True)
        th.start()
        try:
            done_at_start = wait_both_busy(st, jid, counters)
            t_meas = time.perf_counter()
            loaded, loaded_recs, backlog = sequential_latencies(
                st.base, img.data, n_loaded, 0, before_each=lambda: stats(st.base)["queues"]["bulk"])
            meas_s = time.perf_counter() - t_meas
            job = c.get_job(jid)
            bulk_done = job["counts"]["succeeded"] + job["counts"]["failed"] - done_at_start
            # bulk images finished while the interactive samples ran (results are in finish order)
            rows, _, _ = c.results(jid, done_at_start, limit=max(1, min(bulk_done, 40)))
            bulk_bs = [(get_status(st.base, r["id"]).get("timings") or {}).get("batch_size") for r in rows]
            bulk_bs = [b for b in bulk_bs if b]
        finally:
            stop.set()
            try:
                final = c.cancel_job(jid)
            except Exception as exc:
                final = {"error": repr(exc)}
            th.join(30)
        problems = st.log_problems()
    si, sl = summarize_ms(idle), summarize_ms(loaded)
    f.add("idle_p50", si["p50_ms"], "ms")
    f.add("idle_p95", si["p95_ms"], "ms")
    f.add("loaded_p50", sl["p50_ms"], "ms")
    f.add("loaded_p95", sl["p95_ms"], "ms")
    f.add("loaded_mean", sl["mean_ms"], "ms")
    f.add("loaded_max", sl["max_ms"], "ms")
    f.add("ratio_p95_loaded_idle", sl["p95_ms"] / si["p95_ms"])
    f.add("ratio_p50_loaded_idle", sl["p50_ms"] / si["p50_ms"])
    ts = timing_stats(loaded_recs)
    if ts:
        f.add("loaded_server_queued_mean", ts["server_queued_ms"], "ms")
        f.add("loaded_server_inference_mean", ts["server_inference_ms"], "ms")
        f.add("loaded_batch_size_mean", ts["batch_per_image"])
    f.add("bulk_backlog_nonempty_frac", sum(1 for b in backlog if b > 0) / max(1, len(backlog)))
    f.add("bulk_images_per_s_during", bulk_done / meas_s, "img/s")
    if bulk_bs:
        f.add("bulk_batch_size_during", sum(bulk_bs) / len(bulk_bs))
    f.add("bulk_uploaded", counters.get("in", 0))
    f.add("bulk_http_429", counters.get("http_429", 0))
    f.add("job_final_counts", final.get("counts", final))
    f.add("variant", v.name)
    slow = sorted(zip(loaded, loaded_recs), key=lambda x: -x[0])[:3]
    f.note("slowest loaded samples: " + "; ".join(
        f"{s * 1000:.0f} ms (queued {r.get('timings', {}).get('queued_ms')} ms, inference "
        f"{r.get('timings', {}).get('inference_ms')} ms, batch {r.get('timings', {}).get('batch_size')})"
        for s, r in slow))
    f.note(f"2 workers, variant {v.name}; idle {n_idle} samples first, then a bulk job of {n_bulk} images, "
           f"{n_loaded} sequential interactive classifications of {img.name}; job canceled at the end")
    if problems:
        f.note(f"error lines in logs: {problems}")


def wait_both_busy(st, jid: str, counters: dict) -> int:  # noqa: ANN001
    """Wait until the bulk queue is non-empty and both workers work on it; returns the job's
    finished count then. While interactive traffic is recent a worker claims PINFER_BULK_CHUNK
    bulk images at a time, so more running than that means two are at work (heartbeat states lag
    by up to 5 s); else 3 s after the first success."""
    from shared.settings import Settings

    chunk = Settings.from_env(st.full_env).bulk_chunk
    c = client(st.base)
    deadline = time.monotonic() + 120
    first_success = None
    while True:
        s = stats(st.base)
        job = c.get_job(jid)
        n = job["counts"]
        if n["succeeded"] and first_success is None:
            first_success = time.monotonic()
        if s["queues"]["bulk"] > 0 and n["succeeded"] > 0 and (
                n["running"] > chunk or time.monotonic() - first_success > 3):
            return n["succeeded"] + n["failed"]
        if "error" in counters:
            raise BenchError(f"bulk upload failed: {counters['error']}")
        if time.monotonic() > deadline:
            raise BenchError(f"bulk load did not start within 120 s: queues {s['queues']}, job {n}")
        time.sleep(0.1)
