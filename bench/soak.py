"""``make soak``: a long run at about 70 % of capacity, mixing interactive and bulk work, with a worker
SIGKILL every 2 minutes. Not part of CI.

    python -m bench.soak [--minutes 10] [--load 0.7] [--kill-every 120] [--warmup 180]

1. Exports the model folder (``bench.variants``, as ``make bench`` does; ``PINFER_BENCH_MODEL_DIR``
   names an existing one), starts a private stack serving the reference variant (TorchScript fp32,
   exact resize; one pinned worker per core), measures its capacity with a short saturated burst,
   and sets the offered load to ``--load`` x that capacity, half interactive (single submissions,
   each long-polled to its result), half bulk (one job fed a chunk a second).
2. Runs ``--minutes``; every ``--kill-every`` seconds SIGKILLs one worker process (the launcher
   restarts it). Prints per minute: interactive p50/p99 latency (submit -> result), images done,
   and each API process's RSS and thread count (a plateau, or growth at a steady thread count).
3. Prints the RSS of every process of the stack at start, after ``--warmup`` seconds of load and at
   the end, and the number of accepted images without a terminal result (goal: 0; exit status 1
   otherwise), RSS growth after warm-up (goal: < 5 %), p99 flat.

Every HTTP call goes through ``pinfer_client.sdk`` (``bench.http``); the bulk upload is
``bench.benchmarks.bulk.upload``. What is left here is the load shape and the bookkeeping.
"""
from __future__ import annotations

import argparse
import itertools
import math
import os
import random
import shutil
import signal
import sys
import tempfile
import threading
import time
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from bench.benchmarks.bulk import upload
from bench.core import percentile
from bench.corpus import BenchImage, load_corpus, materialize
from bench.http import client, close_clients, submit, wait_result
from bench.stack import OUT_DIR, Stack, descendants
from bench.variants import REFERENCE, export_models
from pinfer_client.sdk import TERMINAL_STATUSES, ClientError


def rss_mib(pid: int) -> float | None:
    """Resident memory of ``pid`` in MiB, or None when it is gone."""
    try:
        import psutil

        return psutil.Process(pid).memory_info().rss / 2**20
    except Exception:
        return None


def api_memory(stack: Stack) -> str:
    """RSS and thread count of each API process, for the per-minute line: gthread workers start
    threads as concurrency first reaches a level, so memory that follows the thread count is
    warm-up, memory that grows at a steady thread count is a leak."""
    import psutil

    parts = []
    for pid, name in stack_pids(stack).items():
        if name != "api":
            continue
        try:
            p = psutil.Process(pid)
            parts.append(f"{p.memory_info().rss / 2**20:.0f} MiB/{p.num_threads()} thr")
        except Exception:
            continue
    return ", ".join(parts)


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


def redis_memory(stack: Stack) -> tuple[float, int]:
    """(used_memory in MiB, number of keys) of the stack's Redis: its RSS grows with the results it
    keeps for PINFER_RESULT_TTL_S, which is data, not a leak."""
    import redis

    r = redis.Redis.from_url(stack.redis_url)
    return r.info("memory")["used_memory"] / 2**20, int(r.dbsize())


def rss_of(snap: dict[int, tuple[str, float | None]], name: str) -> float:
    return sum(rss or 0.0 for n, rss in snap.values() if n == name)


def rss_snapshot(stack: Stack) -> dict[int, tuple[str, float | None]]:
    return {pid: (name, rss_mib(pid)) for pid, name in stack_pids(stack).items()}


def measure_capacity(stack: Stack, images: list[bytes], n: int = 64) -> float:
    """Images/s with the queue kept full (n concurrent submissions)."""
    t0 = time.monotonic()
    with ThreadPoolExecutor(16) as pool:
        ids = list(pool.map(lambda i: submit(stack.base, images[i % len(images)])["id"], range(n)))
        list(pool.map(lambda pid: wait_result(stack.base, pid), ids))
    return n / (time.monotonic() - t0)


def final_status(base: str, pid: str, timeout: float) -> str:
    """The prediction's terminal status, or what it still is (counted as lost) after ``timeout``."""
    try:
        return wait_result(base, pid, timeout=timeout)["status"]
    except ClientError as exc:
        return f"not terminal ({exc})"


def follow_job(base: str, jid: str, timeout: float) -> list[dict]:
    """Every result line of a closed job, until it is done or ``timeout`` seconds pass (the missing
    lines then count as lost)."""
    rows: list[dict] = []
    deadline = time.monotonic() + timeout
    for page in client(base).iter_pages(jid, poll_interval=0.5):  # empty pages too: the deadline is checked
        rows.extend(page.results)
        if page.done or time.monotonic() > deadline:
            break
    return rows


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="bench.soak", description=__doc__.split("\n\n")[0])
    ap.add_argument("--minutes", type=float, default=10.0, help="length of the loaded run")
    ap.add_argument("--load", type=float, default=0.7, help="fraction of the measured capacity to offer")
    ap.add_argument("--kill-every", type=float, default=120.0, help="seconds between worker SIGKILLs")
    ap.add_argument("--warmup", type=float, default=180.0,
                    help="seconds of load before the RSS baseline: every photo through both lanes, and the first "
                         "worker kill, its restart and the backlog it causes (the API's peak concurrency) behind it")
    return ap


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)

    def on_term(signum, _frame):  # noqa: ANN001 (SIGTERM like Ctrl-C: the with-block stops the stack)
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_term)
    corpus = load_corpus()
    images = [im.data for im in corpus.images]
    print(f"soak: {corpus.describe()}", flush=True)
    tmp = Path(tempfile.mkdtemp(prefix="pinfer-soak-"))
    try:
        OUT_DIR.mkdir(parents=True, exist_ok=True)
        exported = export_models(tmp / "model", materialize(corpus, tmp / "synthetic"), OUT_DIR / "export.log")
        with Stack("soak", Path(exported["model_dir"]), env=REFERENCE.env(),
                   workers=len(os.sched_getaffinity(0))) as stack:
            return soak(stack, images, args)
    except KeyboardInterrupt:
        print("\ninterrupted: stack stopped", file=sys.stderr)
        return 130
    finally:
        close_clients()
        shutil.rmtree(tmp, ignore_errors=True)


def soak(stack: Stack, images: list[bytes], args: argparse.Namespace) -> int:
    rss_start = rss_snapshot(stack)
    cap = measure_capacity(stack, images)
    rate = cap * args.load
    print(f"capacity {cap:.1f} images/s; offering {rate:.1f}/s (half interactive, half bulk) for "
          f"{args.minutes:g} min, a worker SIGKILL every {args.kill_every:g} s ({REFERENCE.name})", flush=True)
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
        threads: list[threading.Thread] = []
        while not stop.is_set():
            t = threading.Thread(target=one_interactive, args=(next(inter_order),), daemon=True)
            t.start()
            threads = [x for x in threads if x.is_alive()] + [t]
            stop.wait(gap)
        for t in threads:
            t.join(300)

    # Each lane cycles through the whole corpus in a shuffled order, so every photo (the largest sets
    # the allocator's high-water mark) has passed through both paths within the warm-up.
    inter_order = itertools.cycle(random.sample(images, len(images)))
    bulk_order = itertools.cycle(random.sample(images, len(images)))
    jid = client(stack.base).create_job(name="soak")["id"]
    bulk_n = [0]
    counters: dict = {}  # upload's tally of 429s

    def feeder() -> None:
        chunk = max(1, int(rate / 2))  # one chunk per second
        while not stop.is_set():
            items = [BenchImage(f"{bulk_n[0] + i}.jpg", next(bulk_order)) for i in range(chunk)]
            try:
                bulk_n[0] += upload(stack.base, jid, items, counters, stop=stop, chunk=chunk)
            except Exception as exc:
                with lock:
                    errors.append(f"bulk: {exc}")
            stop.wait(1.0)

    def killer() -> None:
        while not stop.wait(args.kill_every):
            try:
                ws = stack.ready_workers()
            except Exception as exc:
                with lock:
                    errors.append(f"killer: {exc}")
                continue
            if ws:
                victim = int(random.choice(ws)["pid"])
                os.kill(victim, signal.SIGKILL)
                print(f"  [{(time.monotonic() - start) / 60:.1f} min] SIGKILL worker {victim}", flush=True)

    threads = [threading.Thread(target=f, daemon=True) for f in (interactive, feeder, killer)]
    for t in threads:
        t.start()
    end, warm_at = start + args.minutes * 60, start + args.warmup
    warm: tuple | None = None  # (RSS snapshot, Redis data) once the warm-up is over
    for minute in range(math.ceil(args.minutes)):  # a line as each minute ends, warm-up minutes included
        boundary = min(start + (minute + 1) * 60, end)
        if warm is None and warm_at <= boundary:
            stop.wait(max(0.0, warm_at - time.monotonic()))
            warm = rss_snapshot(stack), redis_memory(stack)
        stop.wait(max(0.0, boundary - time.monotonic()))
        with lock:
            xs = [x * 1000 for x in lat.get(minute, [])]
        print(f"minute {minute + 1}: interactive n={len(xs)} p50={percentile(xs, 50):.0f} ms "
              f"p99={percentile(xs, 99):.0f} ms; bulk images sent so far {bulk_n[0]}; "
              f"API {api_memory(stack)}", flush=True)
    rss_warm, data_warm = warm or (rss_snapshot(stack), redis_memory(stack))
    rss_end, data_end = rss_snapshot(stack), redis_memory(stack)
    stop.set()
    for t in threads:
        t.join(330)
    client(stack.base).close_job(jid)
    job_rows = follow_job(stack.base, jid, timeout=600)
    # The job's own total too: an upload that raised after some images got in left bulk_n short.
    job = client(stack.base).get_job(jid)
    bulk_in = max(bulk_n[0], int((job.get("counts") or {}).get("total", 0)))
    finals = [final_status(stack.base, pid, timeout=300) for pid in accepted]
    lost = sum(1 for s in finals if s not in TERMINAL_STATUSES) + max(0, bulk_in - len(job_rows))
    not_ok = sum(1 for s in finals if s != "succeeded") + sum(1 for r in job_rows if r.get("status") != "succeeded")

    print("\nRSS (MiB)         start -> after warm-up -> end")
    grow = []
    fmt = lambda x: f"{x:8.1f}" if x else "       -"  # noqa: E731
    for pid in sorted(set(rss_start) | set(rss_warm) | set(rss_end),
                      key=lambda p: ((rss_start.get(p) or rss_warm.get(p) or rss_end.get(p))[0], p)):
        name = (rss_start.get(pid) or rss_warm.get(pid) or rss_end.get(pid))[0]
        s, w, e = (snap.get(pid, (name, None))[1] for snap in (rss_start, rss_warm, rss_end))
        note = ""
        if w and e:
            if name != "redis":
                grow.append(e / w - 1)
            note = f"({(e / w - 1) * 100:+.1f} % after warm-up)"
        elif not e:
            note = "(gone: killed/restarted)"
        else:
            note = "(new: a restart)"
        print(f"  {name:10s} {pid:7d} {fmt(s)} -> {fmt(w)} -> {fmt(e)}  {note}")
    print(f"\naccepted: {len(accepted)} interactive + {bulk_in} bulk (job counts {job.get('counts')}); "
          f"lost (no terminal result): {lost}; not succeeded: {not_ok}; bulk 429s: {counters.get('http_429', 0)}; "
          f"client errors: {len(errors)}"
          + (f" (first: {errors[0]})" if errors else ""))
    print(f"Redis data (used_memory, keys) after warm-up -> end: {data_warm[0]:.1f} MiB, {data_warm[1]} keys -> "
          f"{data_end[0]:.1f} MiB, {data_end[1]} keys: results kept for PINFER_RESULT_TTL_S, not a leak; its RSS "
          f"beyond that data {rss_of(rss_warm, 'redis') - data_warm[0]:+.1f} -> {rss_of(rss_end, 'redis') - data_end[0]:+.1f} MiB")
    if grow:
        print(f"largest RSS growth after warm-up of a pinfer process that lived throughout: {max(grow) * 100:+.1f} % "
              "(goal < 5 %)")
    problems = stack.log_problems()
    if problems:
        print(f"error lines in the logs ({stack.workdir}): {problems}")
    return 0 if lost == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
