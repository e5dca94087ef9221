"""Redis fails under load: killed (SIGKILL) and restarted from its append-only file, then kept down
for 30 s. Throughout, a steady submitter and long-polling clients run against the real API and
workers, which are never restarted.

Every 202 must end terminal (succeeded); every other answer must be a 503 `service_unavailable`
with `Retry-After`, never another 5xx; the worker launcher must not restart its workers (flap).
"""
from __future__ import annotations

import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import pytest
import requests

from pinfer.procs import free_port, wait_until
from pinfer.stack import Stack
from tests.integration.conftest import TERMINAL, jpeg

pytestmark = pytest.mark.integration


@dataclass
class Traffic:
    """A submitter (about 8 images/s) and long-pollers, recording every answer."""

    base: str
    accepted: list[str] = field(default_factory=list)
    refused: list[tuple[int, str | None, str | None]] = field(default_factory=list)  # status, code, Retry-After
    polled: list[tuple[int, str | None, str | None]] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)

    def submit_loop(self) -> None:
        http, n = requests.Session(), 0
        while not self.stop.is_set():
            n += 1
            try:
                r = http.post(f"{self.base}/v1/predictions", files={"image": ("x.jpg", jpeg(extra=b"%d" % n))},
                              timeout=30)
            except requests.RequestException as exc:  # the API itself must never drop a request
                self.refused.append((0, type(exc).__name__, None))
                continue
            if r.status_code == 202:
                self.accepted.append(r.json()["id"])
            else:
                self.refused.append((r.status_code, _code(r), r.headers.get("Retry-After")))
            self.stop.wait(0.12)  # the submitter's own pace, not synchronisation

    def poll_loop(self) -> None:
        http, i = requests.Session(), 0
        while not self.stop.is_set():
            if i >= len(self.accepted):
                self.stop.wait(0.1)
                continue
            pid = self.accepted[i]
            try:
                r = http.get(f"{self.base}/v1/predictions/{pid}", params={"wait": 5}, timeout=30)
            except requests.RequestException as exc:
                self.polled.append((0, type(exc).__name__, None))
                continue
            if r.status_code == 200:
                if r.json()["status"] in TERMINAL:
                    i += 1
            else:
                self.polled.append((r.status_code, _code(r), r.headers.get("Retry-After")))
                self.stop.wait(float(r.headers.get("Retry-After") or 1))  # a polite client backs off


def _code(r: requests.Response) -> str | None:
    try:
        return r.json()["error"]["code"]
    except (ValueError, KeyError, TypeError):
        return None


def test_redis_killed_and_down_30s_under_load_loses_nothing(tmp_path, model_dir):
    port = free_port()
    stack = Stack.create(tmp_path, model_dir)
    stack.env.update({"PINFER_WORKERS": "1", "PINFER_API_PROCESSES": "1", "PINFER_API_THREADS": "32",
                      "PINFER_MAX_WAITERS": "16", "PINFER_VISIBILITY_TIMEOUT_S": "8",
                      "PINFER_BATCH_TIME_LIMIT_S": "6", "PINFER_RESTORE_INTERVAL_S": "1",
                      "PINFER_HEARTBEAT_S": "1", "PINFER_RETRY_AFTER_S": "1"})
    with stack:  # stopped however the test ends
        check_redis_faults(stack, port, tmp_path)


def check_redis_faults(stack: Stack, port: int, tmp_path) -> None:
    redis_proc = stack.start_redis(port=port, durable=True)
    threads: list[threading.Thread] = []
    traffic = Traffic("")
    try:
        launcher = stack.start_workers(1, log=tmp_path / "workers.log", wait=False)
        api = stack.start_api(log=tmp_path / "api.log")
        traffic.base = stack.base
        stack.wait_ready(1, proc=launcher)
        worker_pids = {w["pid"] for w in stack.workers()}

        threads = [threading.Thread(target=traffic.submit_loop)] + \
                  [threading.Thread(target=traffic.poll_loop) for _ in range(2)]
        for t in threads:
            t.start()
        wait_until(lambda: len(traffic.accepted) >= 10, 60, "traffic flowing")

        # 1. SIGKILL, then back at once from the append-only file
        redis_proc.popen.send_signal(signal.SIGKILL)
        redis_proc.popen.wait(10)
        accepted_at_kill = len(traffic.accepted)
        redis_proc = stack.start_redis(port=port, durable=True)
        wait_until(lambda: len(traffic.accepted) >= accepted_at_kill + 10, 90, "submissions after the restart")

        # 2. down for 30 s (an orderly stop: it writes its file; the clients keep going)
        redis_proc.stop(signal.SIGTERM, 30)
        time.sleep(30)  # the outage itself: the test's input, not synchronisation
        accepted_before_up = len(traffic.accepted)
        redis_proc = stack.start_redis(port=port, durable=True)
        wait_until(lambda: len(traffic.accepted) >= accepted_before_up + 10, 90, "submissions after the outage")
    finally:
        traffic.stop.set()
        for t in threads:
            t.join(60)
    with ThreadPoolExecutor(8) as pool:
        finals = list(pool.map(lambda pid: stack.result(pid, timeout=120)["status"], traffic.accepted))
    lost = [pid for pid, s in zip(traffic.accepted, finals) if s != "succeeded"]
    assert not lost, f"{len(lost)} of {len(traffic.accepted)} accepted images did not succeed: {lost[:5]}"
    for status, code, retry_after in traffic.refused + traffic.polled:
        assert status == 503 and code == "service_unavailable" and retry_after, (status, code, retry_after)
    assert traffic.refused, "the outage refused nothing: nothing was tested"
    assert launcher.popen.poll() is None and api.popen.poll() is None, "a process died"
    assert {w["pid"] for w in stack.workers()} == worker_pids, "the launcher restarted its workers"
    print(f"\nredis faults: {len(traffic.accepted)} accepted, all succeeded; {len(traffic.refused)} submissions "
          f"and {len(traffic.polled)} polls refused with 503 + Retry-After")
