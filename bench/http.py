"""The load generator's HTTP: every call goes through ``pinfer_client.sdk.Client``, what users run.

One ``Client`` per base URL, shared by the load threads (it is thread-safe, with a connection pool
as large as the most threads a benchmark uses). The SDK retries a 429/503 after ``Retry-After``.
"""
from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Sequence

from pinfer_client.sdk import TERMINAL_STATUSES, Client

POOL = 32  # the most concurrent calls one benchmark makes on one base URL
_clients: dict[str, Client] = {}
_lock = threading.Lock()


def client(base: str) -> Client:
    with _lock:
        c = _clients.get(base)
        if c is None:
            c = _clients[base] = Client(base, timeout=60.0, retries=5, pool_size=POOL, long_poll=25.0)
        return c


def close_clients() -> None:
    with _lock:
        for c in _clients.values():
            c.close()
        _clients.clear()


def classify(base: str, data: bytes, timeout: float = 120.0) -> dict:
    """Submit with ``wait`` (``POST ?wait=``: the result in the same request when it comes within the
    client's long-poll), else long-poll until terminal. A synchronous server (the baseline) answers
    the submit with the finished record: no poll then."""
    c = client(base)
    rec = c.submit(data, wait=c.long_poll)
    if rec.get("status") in TERMINAL_STATUSES:
        return rec
    return c.wait(rec["id"], timeout=timeout, poll_interval=0.05)


def submit(base: str, data: bytes) -> dict:
    return client(base).submit(data)


def wait_result(base: str, pid: str, timeout: float = 120.0) -> dict:
    return client(base).wait(pid, timeout=timeout, poll_interval=0.05)


def get_status(base: str, pid: str) -> dict:
    return client(base).get(pid)


def stats(base: str) -> dict:
    """The /readyz body (queues, workers) whether or not the service is ready."""
    return client(base).readyz()[1]


def sequential_latencies(base: str, data: bytes, n: int, warm: int,
                         before_each: Callable[[], Any] | None = None) -> tuple[list[float], list[dict], list[Any]]:
    """One client, one image at a time: ``n`` submit -> result times in seconds (after ``warm``
    unmeasured ones), the records, and what ``before_each()`` returned before each sample."""
    for _ in range(warm):
        classify(base, data)
    lat, recs, probes = [], [], []
    for _ in range(n):
        if before_each is not None:
            probes.append(before_each())
        t0 = time.perf_counter()
        recs.append(classify(base, data))
        lat.append(time.perf_counter() - t0)
    return lat, recs, probes


def closed_loop(base: str, datas: Sequence[bytes], clients: int) -> tuple[float, list[float], list[dict]]:
    """``clients`` concurrent users, each classifying one image after the other (submit ->
    result) until ``datas`` is used up: (wall seconds, per-image seconds, records in order)."""
    def one(d: bytes) -> tuple[float, dict]:
        t = time.perf_counter()
        rec = classify(base, d)
        return time.perf_counter() - t, rec

    t0 = time.perf_counter()
    out = run_threads(one, datas, clients)
    return time.perf_counter() - t0, [x[0] for x in out], [x[1] for x in out]


def closed_loops(base: str, datas: Sequence[bytes], clients: int, rounds: int
                 ) -> tuple[float, list[float], list[dict]]:
    """``rounds`` closed loops over ``datas`` one after the other: (total wall seconds, every
    per-image latency, every record)."""
    wall, lat, recs = 0.0, [], []
    for _ in range(rounds):
        w, l, r = closed_loop(base, datas, clients)
        wall, lat, recs = wall + w, lat + l, recs + r
    return wall, lat, recs


def run_threads(fn: Callable[[Any], Any], items: Sequence[Any], threads: int) -> list[Any]:
    """``fn`` over ``items`` with a thread pool; results in order; the first exception is raised."""
    with ThreadPoolExecutor(threads) as pool:
        return list(pool.map(fn, items))
