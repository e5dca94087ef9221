"""``make soak``: a long run at about 70 % of capacity, mixing interactive and bulk work, with a worker
SIGKILL every 2 minutes. Not part of CI.

    python -m bench.soak [--minutes 10] [--load 0.7] [--kill-every 120]

1. Starts a private stack (one pinned worker per core), measures its capacity with a short
   saturated burst, and sets the offered load to ``--load`` x that capacity, half interactive
   (single submissions, each long-polled to its result), half bulk (one job fed in chunks).
2. Runs ``--minutes``; every ``--kill-every`` seconds SIGKILLs one worker process (the launcher
   restarts it). Prints per minute: interactive p50/p99 latency (submit -> result), images done.
3. Prints the RSS of every process of the stack after warm-up and at the end, and the number of
   accepted images without a terminal result (goal: 0), RSS growth (goal: < 5 %), p99 flat.
"""
from __future__ import annotations

import argparse
import os
import random
import signal
import sys
import threading
import time
from collections import defaultdict
from pathlib import Path

from bench.stack import (BulkClient, Stack, descendants, load_corpus, model_dir, percentile, submit,
                         wait_result)

TERMINAL = ("succeeded", "failed", "canceled")


def rss_kib(pid: int) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def stack_pids(stack: Stack) -> dict[int, str]:
    """Every process of the stack with a short name (redis, api, launcher, worker)."""
    out: dict[int, str] = {}
    if stack.redis is not None:
        out[stack.redis.popen.pid] = "redis"
    for p in stack.api_procs:
        out[p.popen.pid] = "api-master"
        out.update({pid: "api" for pid, _ in descendants(p.popen.pid)})
    for p in stack.worker_procs:
        out[p.popen.pid] = "launcher"
        out.update({pid: "worker" for pid, _ in descendants(p.popen.pid)})
    return out


def measure_capacity(stack: Stack, images: list[bytes], n: int = 64) -> float:
    """Images/s with the queue kept full (n concurrent submissions)."""
    from concurrent.futures import ThreadPoolExecutor

    t0 = time.monotonic()
    with ThreadPoolExecutor(16) as pool:
        ids = list(pool.map(lambda i: submit(stack.base, images[i % len(images)])["id"], range(n)))
        list(pool.map(lambda pid: wait_result(stack.base, pid), ids))
    return n / (time.monotonic() - t0)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="bench.soak")
    ap.add_argument("--minutes", type=float, default=10.0)
    ap.add_argument("--load", type=float, default=0.7, help="fraction of the measured capacity to offer")
    ap.add_argument("--kill-every", type=float, default=120.0, help="seconds between worker SIGKILLs")
    ap.add_argument("--warmup", type=float, default=30.0, help="seconds before the first RSS reading")
    args = ap.parse_args(argv)

    images = [im.data for im in load_corpus().images]
    workdir = Path(os.environ.get("TMPDIR", "/tmp")) / f"pinfer-soak-{os.getpid()}"
    with Stack("soak", model_dir(workdir), workers=len(os.sched_getaffinity(0))) as stack:
        cap = measure_capacity(stack, images)
        rate = cap * args.load
        print(f"capacity {cap:.1f} images/s; offering {rate:.1f}/s (half interactive, half bulk) for "
              f"{args.minutes:g} min, a worker SIGKILL every {args.kill_every:g} s", flush=True)
        stop = threading.Event()
        start = time.monotonic()
        lat: dict[int, list[float]] = defaultdict(list)  # minute -> interactive latencies (s)
        done: dict[int, int] = defaultdict(int)
        accepted: list[str] = []
        errors: list[str] = []
        lock = threading.Lock()

        def one_interactive(data: bytes) -> None:
            t0 = time.monotonic()
            try:
                pid = submit(stack.base, data)["id"]
                with lock:
                    accepted.append(pid)
                wait_result(stack.base, pid, timeout=300)
            except Exception as exc:  # counted, and shown at the end
                with lock:
                    errors.append(f"interactive: {exc}")
                return
            minute = int((time.monotonic() - start) // 60)
            with lock:
                lat[minute].append(time.monotonic() - t0)
                done[minute] += 1

        def interactive() -> None:
            gap = 2.0 / rate
            threads = []
            while not stop.is_set():
                t = threading.Thread(target=one_interactive, args=(random.choice(images),), daemon=True)
                t.start()
                threads.append(t)
                stop.wait(gap)
            for t in threads:
                t.join(300)

        bulk = BulkClient(stack.base)
        jid = bulk.create_job("soak")
        bulk_n = [0]

        def feeder() -> None:
            chunk = max(1, int(rate / 2))  # one chunk per second
            while not stop.is_set():
                items = [(f"{bulk_n[0] + i}.jpg", random.choice(images)) for i in range(chunk)]
                try:
                    bulk_n[0] += bulk.add_images(jid, items, stop=stop)
                except Exception as exc:
                    errors.append(f"bulk: {exc}")
                stop.wait(1.0)

        def killer() -> None:
            while not stop.wait(args.kill_every):
                ws = stack.ready_workers()
                if ws:
                    victim = int(random.choice(ws)["pid"])
                    os.kill(victim, signal.SIGKILL)
                    print(f"  [{(time.monotonic() - start) / 60:.1f} min] SIGKILL worker {victim}", flush=True)

        threads = [threading.Thread(target=f, daemon=True) for f in (interactive, feeder, killer)]
        for t in threads:
            t.start()
        stop.wait(args.warmup)
        rss_start = {pid: (name, rss_kib(pid)) for pid, name in stack_pids(stack).items()}
        end = start + args.minutes * 60
        minute = 0
        while time.monotonic() < end:
            stop.wait(min(60.0, end - time.monotonic()))
            with lock:
                xs = [x * 1000 for x in lat.get(minute, [])]
            print(f"minute {minute + 1}: interactive n={len(xs)} p50={percentile(xs, 50):.0f} ms "
                  f"p99={percentile(xs, 99):.0f} ms; bulk images sent so far {bulk_n[0]}", flush=True)
            minute += 1
        rss_end = {pid: (name, rss_kib(pid)) for pid, name in stack_pids(stack).items()}
        stop.set()
        for t in threads:
            t.join(330)
        bulk.close_job(jid)
        job_rows = bulk.follow(jid, bulk_n[0], timeout=600)
        finals = [wait_result(stack.base, pid, timeout=300)["status"] for pid in accepted]
        lost = sum(1 for s in finals if s not in TERMINAL) + (bulk_n[0] - len(job_rows))
        not_ok = sum(1 for s in finals if s != "succeeded") + sum(1 for r in job_rows if r["status"] != "succeeded")

        print("\nRSS (MiB)       after warm-up -> end")
        grow = []
        for pid, (name, before) in sorted(rss_start.items(), key=lambda kv: kv[1][0]):
            after = rss_end.get(pid, (name, None))[1]
            if before and after:
                grow.append(after / before - 1)
                print(f"  {name:10s} {pid:7d} {before / 1024:8.1f} -> {after / 1024:8.1f}  ({(after / before - 1) * 100:+.1f} %)")
            else:
                print(f"  {name:10s} {pid:7d} {'-' if not before else f'{before / 1024:.1f}'} -> (gone: restarted)")
        print(f"\naccepted: {len(accepted)} interactive + {bulk_n[0]} bulk; lost (no terminal result): {lost}; "
              f"not succeeded: {not_ok}; client errors: {len(errors)}"
              + (f" (first: {errors[0]})" if errors else ""))
        if grow:
            print(f"largest RSS growth of a process that lived throughout: {max(grow) * 100:+.1f} % (goal < 5 %)")
        return 0 if lost == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
