"""The deployment topology on loopback: nginx (rendered from deploy/nginx.conf) in front of two
gunicorn API replicas, pinned Celery workers, and compose-style worker replicas sharing one host's
cores through Redis core leases.

Everything is a real process started the way a user starts it (pinfer.procs, pinfer/topology.py);
waits are on observable conditions (wait_until, process exit), never on fixed sleeps.
"""
from __future__ import annotations

import collections
import json
import os
import re
import signal
import socket
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import requests

from pinfer.procs import Proc, free_port, wait_until
from shared import keys
from tests.integration.conftest import TERMINAL, jpeg
from pinfer.topology import nginx_binary, nginx_test, render_nginx_conf, start_nginx

pytestmark = pytest.mark.integration

ALL_CORES = frozenset(os.sched_getaffinity(0))


@pytest.fixture(scope="module")
def pinned(make_stack):
    """Private Redis + `pinfer worker` with two pinned workers (no API: the tests add their own)."""
    return make_stack(workers=2, api=False)


# --------------------------------------------------------------------------- process helpers
def ppid(pid: int) -> int:
    stat = Path(f"/proc/{pid}/stat").read_text()
    return int(stat.rsplit(")", 1)[1].split()[1])  # after "(comm)": state, ppid, ...


def thread_affinities(pid: int) -> dict[int, frozenset[int]]:
    """Affinity of every thread of ``pid`` (torch / OpenMP threads must be pinned too)."""
    out = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            out[int(tid)] = frozenset(os.sched_getaffinity(int(tid)))
        except ProcessLookupError:  # a short-lived thread ended meanwhile
            pass
    return out


# --------------------------------------------------------------------------- 1. nginx + 2 APIs
RETRYABLE = (502, 503, 504)
ATTEMPTS = 6          # first try + 5 retries, backoff 0.05 .. 0.8 s
WINDOW = 8            # a client long-polls its oldest result once it has this many outstanding
CLIENTS = 8
RESTART_AFTER = 150
MIN_SUBMISSIONS = 500
MIN_AFTER_RESTART = 20  # submissions the restarted replica must have answered itself
POST_202 = re.compile(r'"POST /v1/predictions[^"]*" 202 ')
GET_200 = re.compile(r'"GET /v1/predictions/[^"]*" 200 ')


@dataclass
class Tally:
    lock: threading.Lock = field(default_factory=threading.Lock)
    accepted: int = 0
    results: dict = field(default_factory=dict)          # id -> final status
    retries: collections.Counter = field(default_factory=collections.Counter)  # (kind, cause) -> n
    failures: list = field(default_factory=list)         # what no retry fixed, or a non-retryable answer

    def retry(self, kind: str, cause: str) -> None:
        with self.lock:
            self.retries[(kind, cause)] += 1

    def fail(self, what: str) -> None:
        with self.lock:
            self.failures.append(what)


def call(http: requests.Session, tally: Tally, kind: str, method: str, url: str, **kw):
    """One request with the client's retry policy; returns the final response or None (counted)."""
    cause = ""
    for attempt in range(ATTEMPTS):
        if attempt:
            tally.retry(kind, cause)
            time.sleep(0.05 * 2 ** (attempt - 1))  # client back-off between retries, not a test wait
        try:
            r = http.request(method, url, timeout=60, **kw)
        except requests.ConnectionError as exc:
            cause = type(exc).__name__
            continue
        if r.status_code in RETRYABLE:
            cause = f"HTTP {r.status_code}"
            continue
        return r
    tally.fail(f"{kind}: {cause} after {ATTEMPTS} attempts")
    return None


def client(base: str, images: list[bytes], seed: int, tally: Tally, stop: threading.Event) -> None:
    http = requests.Session()
    outstanding: collections.deque[str] = collections.deque()

    def poll(pid: str) -> None:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            r = call(http, tally, "GET", "GET", f"{base}/v1/predictions/{pid}", params={"wait": 10})
            if r is None:
                return
            if r.status_code != 200:
                return tally.fail(f"GET {pid}: {r.status_code} {r.text[:200]}")
            body = r.json()
            if body["status"] in TERMINAL:
                with tally.lock:
                    tally.results[pid] = body["status"] if body["status"] == "succeeded" else body
                return
        tally.fail(f"GET {pid}: not finished after 120 s")

    try:
        i = seed
        while not stop.is_set():
            data = images[i % len(images)]
            i += CLIENTS
            r = call(http, tally, "POST", "POST", f"{base}/v1/predictions", files={"image": ("img.jpg", data)})
            if r is None:
                continue
            if r.status_code != 202:
                tally.fail(f"POST: {r.status_code} {r.text[:200]}")
                continue
            outstanding.append(r.json()["id"])
            with tally.lock:
                tally.accepted += 1
            while len(outstanding) >= WINDOW:
                poll(outstanding.popleft())
        while outstanding:
            poll(outstanding.popleft())
    except Exception as exc:  # anything unexpected is a failure the main thread reports
        tally.fail(f"client {seed} crashed: {exc!r}")


def served(log: Path, pattern: re.Pattern) -> int:
    try:
        return len(pattern.findall(log.read_text(errors="replace")))
    except FileNotFoundError:
        return 0


def start_nginx_proc(conf: Path, port: int, log: Path) -> Proc:
    return Proc("nginx", start_nginx(conf, wait_for=f"127.0.0.1:{port}", timeout=20, log=log))


def test_two_api_replicas_behind_nginx_survive_a_restart(pinned):
    if nginx_binary() is None:
        pytest.skip("nginx is not installed")
    stack = pinned
    work = stack.workdir / "topology"
    work.mkdir()
    port_a, port_b, port_n = free_port(), free_port(), free_port()
    logs = {"A1": work / "api-a-1.log", "A2": work / "api-a-2.log", "B": work / "api-b.log"}

    api_a = stack.start_api(port_a, log=logs["A1"])  # the fixture stops whatever is still running
    api_b = stack.start_api(port_b, log=logs["B"])

    conf = render_nginx_conf([f"127.0.0.1:{port_a}", f"127.0.0.1:{port_b}"], f"127.0.0.1:{port_n}",
                             work / "nginx")
    checked = nginx_test(conf)
    assert checked.returncode == 0, checked.stderr
    nginx = start_nginx_proc(conf, port_n, work / "nginx" / "stdout.log")
    stack.procs.append(nginx)
    base = f"http://127.0.0.1:{port_n}"
    assert requests.get(base + "/readyz", timeout=5).json()["status"] == "ready"

    images = [jpeg(((37 * i) % 256, (91 * i + 40) % 256, (53 * i + 90) % 256)) for i in range(64)]
    tally, stop = Tally(), threading.Event()
    threads = [threading.Thread(target=client, args=(base, images, n, tally, stop), name=f"client-{n}")
               for n in range(CLIENTS)]
    api_a2 = None
    t0 = time.monotonic()
    try:
        for t in threads:
            t.start()
        wait_until(lambda: tally.accepted >= RESTART_AFTER or tally.failures, 120, f"{RESTART_AFTER} accepted")
        assert not tally.failures, tally.failures[:10]

        # Graceful stop of replica A (what `docker compose restart api` / a rolling deploy does).
        t_stop = time.monotonic()
        assert api_a.stop(signal.SIGTERM, 60) == 0, "gunicorn A did not exit cleanly on SIGTERM"
        accepted_at_stop = tally.accepted
        t_down = time.monotonic()
        api_a2 = stack.start_api(port_a, log=logs["A2"])  # returns once it answers /healthz
        t_up = time.monotonic()

        # Keep the load on until the total is reached AND nginx sends work to the new A again
        # (it rests a replica for fail_timeout=10s after max_fails=3 refused connections).
        wait_until(lambda: (tally.accepted >= MIN_SUBMISSIONS and served(logs["A2"], POST_202) >= MIN_AFTER_RESTART)
                   or tally.failures, 120, "load through the restarted replica")
    finally:
        stop.set()
        for t in threads:
            t.join(180)
    elapsed = time.monotonic() - t0
    assert not any(t.is_alive() for t in threads), "a client is stuck"

    try:
        assert not tally.failures, f"{len(tally.failures)} failures no retry fixed: {tally.failures[:10]}"
        assert tally.accepted >= MIN_SUBMISSIONS
        assert len(tally.results) == tally.accepted, "some accepted IDs were never long-polled to the end"
        not_ok = {pid: st for pid, st in tally.results.items() if st != "succeeded"}
        assert not not_ok, list(not_ok.items())[:5]

        posts = {name: served(log, POST_202) for name, log in logs.items()}
        gets = {name: served(log, GET_200) for name, log in logs.items()}
        assert posts["A1"] > 0 and posts["B"] > 0 and posts["A2"] >= MIN_AFTER_RESTART, posts
        # Every accepted submission was answered by exactly one replica; a POST whose 202 was lost on
        # the way back (connection closed by the stopping replica) shows up as an extra record.
        records = sum(1 for _ in stack.store.r.scan_iter(keys.prediction("*"), count=1000))
        assert records >= tally.accepted
        assert sum(posts.values()) == records, (posts, records)

        retries = sum(tally.retries.values())
        detail = ", ".join(f"{k} {c}: {n}" for (k, c), n in sorted(tally.retries.items())) or "none"
        print(f"\ntopology: {tally.accepted} submissions by {CLIENTS} clients through nginx in {elapsed:.1f}s "
              f"= {tally.accepted / elapsed:.1f} images/s end to end (submit + classify + long-poll); "
              f"retries {retries} ({detail}); "
              f"A stopped after {accepted_at_stop} accepted, SIGTERM->exit {t_down - t_stop:.1f}s, "
              f"restart->healthy {t_up - t_down:.1f}s; "
              f"202s served A1/A2/B = {posts['A1']}/{posts['A2']}/{posts['B']}, "
              f"long-polls A1/A2/B = {gets['A1']}/{gets['A2']}/{gets['B']}; "
              f"records in Redis {records} ({records - tally.accepted} accepted but answer lost)")
    finally:
        for p in (nginx, api_a2, api_b):
            if p is not None:
                p.stop(signal.SIGTERM, 60)


# --------------------------------------------------------------------------- 1b. nginx's own errors
def post_headers_only(port: int, target: str, length: int) -> tuple[int, dict, dict]:
    """Announce a body of ``length`` bytes and send none: nginx judges the size from the header."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall((f"POST {target} HTTP/1.1\r\nHost: pinfer\r\nContent-Type: application/octet-stream\r\n"
                   f"Content-Length: {length}\r\nConnection: close\r\n\r\n").encode())
        data = b""
        while b"\r\n\r\n" not in data:
            data += s.recv(65536) or pytest.fail(f"connection closed before a response: {data!r}")
        head, _, body = data.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        headers = {k.strip().lower(): v.strip() for k, v in (line.split(":", 1) for line in lines[1:])}
        # Read the announced body only: nginx lingers on a connection whose request body it refused.
        while len(body) < int(headers["content-length"]):
            body += s.recv(65536) or pytest.fail(f"connection closed inside the body: {body!r}")
    return int(lines[0].split()[1]), headers, json.loads(body)


@pytest.mark.parametrize("target,limit,code", [
    ("/v1/predictions", "21m", "image_too_large"),
    ("/v1/predictions?top_k=3&wait=5", "21m", "image_too_large"),
    ("/v1/jobs/j123/images", "200m", "request_too_large"),
    ("/v1/jobs", "21m", "request_too_large"),
])
def test_nginx_413_carries_the_apis_code_for_the_route(tmp_path, target, limit, code):
    """A body over nginx's limit gets the code the API gives on that route (docs/http-api.md):
    clients branch on it, so a bulk upload must not be told `image_too_large`."""
    if nginx_binary() is None:
        pytest.skip("nginx is not installed")
    port = free_port()
    conf = render_nginx_conf([f"127.0.0.1:{free_port()}"], f"127.0.0.1:{port}", tmp_path)
    nginx = start_nginx_proc(conf, port, tmp_path / "stdout.log")
    try:
        size = int(limit[:-1]) * 1024 * 1024
        status, headers, body = post_headers_only(port, target, size + 1)
        assert status == 413, body
        assert body["error"]["code"] == code, body
        assert headers["content-type"].startswith("application/json") and headers.get("x-request-id")
    finally:
        nginx.stop(signal.SIGTERM, 10)


# --------------------------------------------------------------------------- 2. pinning
def test_each_worker_pinned_to_its_own_core(pinned):
    workers = pinned.workers()
    assert len(workers) == 2, workers
    launcher = next(p for p in pinned.procs if p.name == "workers").popen.pid
    cores = []
    for w in workers:
        pid = int(w["pid"])
        assert ppid(pid) == launcher, f"worker {pid} is not a child of the launcher"
        affinity = os.sched_getaffinity(pid)
        assert len(affinity) == 1, (w["name"], affinity)
        assert affinity == {int(w["core"])}, (w["name"], w["core"], affinity)
        # Every thread (torch intra-op, heartbeat, Celery's) inherited the pin.
        assert set(thread_affinities(pid).values()) == {frozenset(affinity)}, w["name"]
        assert w["threads"] == "1", (w["name"], w["threads"])  # torch: one thread for its one core
        cores.append(int(w["core"]))
    assert len(set(cores)) == 2, cores
    assert set(cores) <= ALL_CORES


# --------------------------------------------------------------------------- 3. core leases
HOST = "testhost"


def lease_holders(stack) -> dict[int, int]:
    """core -> launcher pid holding its lease (holder is ``hostname:pid|expiry``)."""
    raw = stack.store.r.hgetall(keys.core_leases(HOST))
    return {int(core): int(v.rsplit("|", 1)[0].rsplit(":", 1)[1]) for core, v in raw.items()}


def worker_of(stack, launcher: Proc) -> dict | None:
    """The ready worker whose parent is this launcher (one worker per replica)."""
    for w in stack.workers():
        try:
            if ppid(int(w["pid"])) == launcher.popen.pid:
                return w
        except FileNotFoundError:  # a heartbeat of a process that is gone
            pass
    return None


# A replica's OMP_NUM_THREADS: only an unpinned worker may follow it (a pinned one uses its core).
REPLICA_OMP_THREADS = "2"


def start_replica(stack, name: str) -> Proc:
    proc = stack.start_workers(1, log=stack.workdir / f"{name}.log", wait=False,
                               env={"PINFER_CORE_LEASE": "1", "PINFER_HOST_ID": HOST,
                                    "OMP_NUM_THREADS": REPLICA_OMP_THREADS})
    proc.name = name
    return proc


@pytest.mark.skipif(len(ALL_CORES) < 2, reason="needs two cores to lease")
def test_core_leases_give_compose_replicas_distinct_cores(make_stack):
    stack = make_stack(workers=0, api=False)
    ncores = len(ALL_CORES)
    replicas = [start_replica(stack, f"replica{i}") for i in range(ncores)]  # one per core: all leased
    found: dict[str, dict] = {}

    def all_ready(procs) -> bool:
        for p in procs:
            if p.popen.poll() is not None:
                raise AssertionError(f"{p.name} exited with {p.popen.returncode}")
            w = worker_of(stack, p)
            if w is not None:
                found[p.name] = w
        return all(p.name in found for p in procs)

    wait_until(lambda: all_ready(replicas), 120, "one ready worker per replica")
    pinned_to = {}
    for p in replicas:
        w = found[p.name]
        affinity = os.sched_getaffinity(int(w["pid"]))
        assert len(affinity) == 1 and affinity == {int(w["core"])}, (p.name, w["core"], affinity)
        assert w["threads"] == "1", (p.name, w["threads"])
        pinned_to[p.name] = next(iter(affinity))
    assert len(set(pinned_to.values())) == ncores, pinned_to  # distinct cores, no configuration
    holders = lease_holders(stack)
    assert holders == {pinned_to[p.name]: p.popen.pid for p in replicas}, holders

    # One replica too many: nothing left to lease, so it runs unpinned (and says so).
    extra = start_replica(stack, "replica-extra")
    wait_until(lambda: all_ready([extra]), 120, "the extra replica's worker")
    w = found[extra.name]
    assert w["core"] == ""
    assert os.sched_getaffinity(int(w["pid"])) == ALL_CORES
    # Not a thread per host core: what OMP_NUM_THREADS says (compose sets 1).
    assert w["threads"] == REPLICA_OMP_THREADS, w
    log = (stack.workdir / "replica-extra.log").read_text()
    assert re.search(rf"WARNING pinfer\.launcher: no free core left on host {HOST}", log), log[-2000:]
    assert lease_holders(stack) == holders, "the unpinned replica must not take a lease"

    # Stopping a replica (SIGTERM, as `docker compose stop` does) gives its core back.
    gone = replicas[0]
    assert gone.stop(signal.SIGTERM, 60) == 0
    freed = pinned_to[gone.name]
    left = lease_holders(stack)
    assert freed not in left, left
    assert left == {c: pid for c, pid in holders.items() if c != freed}, left

    for p in (extra, *replicas[1:]):
        assert p.stop(signal.SIGTERM, 60) == 0, p.name
    assert lease_holders(stack) == {}
