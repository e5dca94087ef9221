"""A bulk job on one worker, then on two workers on two cores (fresh stacks).

The corpus x10 (x1 with --quick), names ``copy<i>/<file>``, uploaded in chunks of 16 from a
thread through ``pinfer_client.sdk`` (a 429 waits its ``Retry-After``), closed, and followed with the
results cursor. Rate = images / (first upload -> last result line read); ``ratio_2w_1w`` is the
scaling figure (target >= 1.85). Two workers take both cores, so here the load generator shares
them (it has little to do: one upload thread and one reader).
"""
from __future__ import annotations

import threading
import time
from collections import Counter
from typing import Any, Sequence

from bench.core import Ctx, Figures, timing_stats
from bench.corpus import BenchImage
from bench.http import client, get_status
from bench.stack import BenchError, Stack

NAME = "bulk"
CHUNK = 16


def upload(base: str, jid: str, items: Sequence[BenchImage], counters: dict, stop: threading.Event | None = None,
           chunk: int = CHUNK) -> int:
    """Send every item into job ``jid`` (429: wait ``Retry-After``, send what did not get in
    again). Returns how many got in; stops early when ``stop`` is set."""
    c = client(base)
    got = 0
    for s in range(0, len(items), chunk):
        pending = [(im.name, im.data) for im in items[s:s + chunk]]
        while pending:
            if stop is not None and stop.is_set():
                return got
            res = c.add_images(jid, pending, overload_retries=0)
            names_in = res.names_in
            got += sum(1 for n, _ in pending if n in names_in)
            pending = [(n, d) for n, d in pending if n not in names_in]
            if not pending:
                break
            if not res.overloaded:
                raise BenchError(f"add images: {len(pending)} not accepted without a 429")
            counters["http_429"] = counters.get("http_429", 0) + 1
            delay = res.retry_after if res.retry_after is not None else 1.0
            if stop is not None:
                if stop.wait(delay):
                    return got
            else:
                time.sleep(delay)
    return got


def run_job(st: Stack, items: Sequence[BenchImage], timeout: float) -> dict:
    """Upload (from a thread), close and follow one job to its last result."""
    c = client(st.base)
    jid = c.create_job(name=f"bench-{st.name}")["id"]
    counters: dict[str, Any] = {}
    t0 = time.perf_counter()

    def uploader() -> None:
        try:
            upload(st.base, jid, items, counters)
            c.close_job(jid)
            counters["seconds"] = time.perf_counter() - t0
        except Exception as exc:
            counters["error"] = repr(exc)

    th = threading.Thread(target=uploader, daemon=True)
    th.start()
    rows: list[dict] = []
    deadline = time.monotonic() + timeout
    for page in c.iter_pages(jid, poll_interval=0.2):  # empty pages too: the deadline is checked
        rows.extend(page.results)
        if len(rows) >= len(items) or time.monotonic() > deadline or "error" in counters:
            break
    wall = time.perf_counter() - t0
    th.join(30)
    if "error" in counters:
        raise BenchError(f"upload failed: {counters['error']}")
    if len(rows) < len(items):
        raise BenchError(f"job {jid}: {len(rows)}/{len(items)} results after {timeout:.0f} s")
    sample = [get_status(st.base, r["id"]) for r in rows[:64]]
    return {"wall": wall, "rows": rows, "upload_s": counters.get("seconds"), "job": c.get_job(jid),
            "sample": sample, "http_429": counters.get("http_429", 0)}


def run(ctx: Ctx, f: Figures) -> None:
    v = ctx.service_variant()
    mult = 1 if ctx.quick else 10
    items = ctx.corpus.repeated(len(ctx.corpus) * mult)
    rates, runs = {}, {}
    for k in (1, 2):
        cores = ctx.server_cores if k == 1 else ctx.all_cores
        with ctx.stack(f"bulk-{k}", v, cores=cores, workers=k) as st:
            r = run_job(st, items, timeout=len(items) / 3 + 120)
            r["problems"] = st.log_problems()
        runs[k] = r
        rates[k] = len(items) / r["wall"]
    inp = ctx.inprocess_rate(v)
    for k, r in runs.items():
        f.add(f"images_per_s_{k}w", rates[k], "img/s")
        if inp:
            f.add(f"overhead_per_image_{k}w", (k / rates[k] - 1 / inp) * 1000, "ms")
        f.add(f"upload_{k}w", r["upload_s"], "s")
        f.add(f"statuses_{k}w", dict(Counter(x.get("status") for x in r["rows"])))
        f.add(f"batch_size_sample_{k}w", timing_stats(r["sample"]).get("batch_per_image", 0.0))
        if r["http_429"]:
            f.add(f"http_429_{k}w", r["http_429"])
        if r["problems"]:
            f.note(f"{k} worker(s): error lines in logs: {r['problems']}")
        f.note(f"{k} worker(s): job counts {r['job']['counts']}, job rate_per_s {r['job'].get('rate_per_s')}")
    f.add("ratio_2w_1w", rates[2] / rates[1])
    f.add("variant", v.name)
    f.note(f"{len(items)} images (corpus x{mult}), chunks of {CHUNK} via pinfer_client.sdk; variant {v.name}; "
           "rate = images / (first upload -> last result read); overhead = cores/rate - 1/inprocess_rate")
