"""A full queue, then workers: 1 worker against 2 on two cores, without worker start-up in the rate.

N interactive submissions (600, 200 with --quick) are queued with no worker running; then
``pinfer worker`` with PINFER_WORKERS=k starts and every result is awaited; k = 1, then 2 (fresh
stacks). rate = N / (last finished_at - first started_at); steady = images finished while every
worker was active / that window.
"""
from __future__ import annotations

import time
from collections import Counter

from bench.core import Ctx, Figures, statuses, timing_stats
from bench.http import run_threads, submit, wait_result

NAME = "drain"


def run(ctx: Ctx, f: Figures) -> None:
    v = ctx.service_variant()
    n = 200 if ctx.quick else 600
    items = ctx.corpus.repeated(n)
    rates, steady = {}, {}
    for k in (1, 2):
        with ctx.stack(f"drain-{k}", v, cores=ctx.server_cores if k == 1 else ctx.all_cores, workers=0) as st:
            ids = run_threads(lambda im: submit(st.base, im.data)["id"], items, 8)
            t0 = time.perf_counter()
            st.start_workers(k, wait=False)
            recs = [wait_result(st.base, pid, timeout=600) for pid in ids]
            wall = time.perf_counter() - t0
            r = st.redis_client()
            from shared import keys

            pipe = r.pipeline(transaction=False)
            for pid in ids:
                pipe.hget(keys.prediction(pid), "worker")
            who = pipe.execute()
            r.close()
            problems = st.log_problems()
        starts = [x["started_at"] for x in recs if x.get("started_at")]
        fins = [x["finished_at"] for x in recs if x.get("finished_at")]
        span = max(fins) - min(starts)
        rates[k] = n / span
        by_worker: dict[str, list[dict]] = {}
        for w, x in zip(who, recs):
            by_worker.setdefault(w or "?", []).append(x)
        # steady state: the window in which every worker was working
        lo = max(min(x["started_at"] for x in xs) for xs in by_worker.values())
        hi = min(max(x["finished_at"] for x in xs) for xs in by_worker.values())
        in_win = sum(1 for x in recs if lo <= x["finished_at"] <= hi)
        steady[k] = in_win / (hi - lo) if hi > lo else float("nan")
        f.add(f"images_per_s_{k}w", rates[k], "img/s")
        f.add(f"steady_images_per_s_{k}w", steady[k], "img/s")
        f.add(f"wall_incl_startup_{k}w", wall, "s")
        f.add(f"per_worker_{k}w", sorted(len(v) for v in by_worker.values()))
        f.add(f"worker_start_skew_{k}w", max(min(x["started_at"] for x in xs) for xs in by_worker.values())
              - min(starts), "s")
        ts = timing_stats(recs)
        f.add(f"batch_size_per_batch_{k}w", ts.get("batch_per_batch", 0.0))
        bs = Counter(x["timings"]["batch_size"] for x in recs if x.get("timings"))
        f.add(f"batch_size_histogram_images_{k}w", dict(sorted(bs.items())))
        f.add(f"statuses_{k}w", statuses(recs))
        if problems:
            f.note(f"{k} worker(s): error lines in logs: {problems}")
    f.add("ratio_2w_1w", rates[2] / rates[1])
    f.add("steady_ratio_2w_1w", steady[2] / steady[1])
    f.note(f"{n} interactive submissions queued with no worker, then `pinfer worker` PINFER_WORKERS=k; "
           "rate = N / (last finished_at - first started_at), i.e. without worker start-up "
           "(goal: ratio >= 1.85); steady = images finished while every worker was active / that window")
    f.add("variant", v.name)
