"""Long-polls against gunicorn: many waiting clients never starve submissions."""
from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

from tests.integration.conftest import jpeg

pytestmark = pytest.mark.integration


def test_hundreds_of_long_polls_do_not_block_submissions(make_stack):
    # No workers, so every long-poll really waits; 2 processes x 100 waiters < 300 clients.
    cap = 100
    stack = make_stack(workers=0, PINFER_API_THREADS=256, PINFER_MAX_WAITERS=cap, PINFER_API_PROCESSES=2)
    pid = stack.submit(jpeg())["id"]
    n = 300
    started = threading.Barrier(n + 1)
    statuses: list[tuple[int, str, str | None]] = []
    at_cap = threading.Event()  # set once the capped (immediate) answers are all in

    def poll(_):
        started.wait()
        r = requests.get(f"{stack.base}/v1/predictions/{pid}", params={"wait": 8}, timeout=30)
        statuses.append((r.status_code, r.json()["status"], r.headers.get("Retry-After")))
        if sum(1 for *_, ra in statuses if ra == "1") >= n - 2 * cap:
            at_cap.set()

    with ThreadPoolExecutor(n) as pool:
        futures = [pool.submit(poll, i) for i in range(n)]
        started.wait()
        # Both processes now hold their full share of long-polls; the rest were answered at once.
        assert at_cap.wait(20), "the waiter cap never answered the surplus long-polls"
        t0 = time.monotonic()
        r = requests.post(f"{stack.base}/v1/predictions", files={"image": ("a.jpg", jpeg())}, timeout=30)
        submit_s = time.monotonic() - t0
        assert r.status_code == 202, r.text
        for f in futures:
            f.result()
    assert all(code == 200 and status == "queued" for code, status, _ in statuses)
    # Past the per-process cap, `wait` answers at once and asks the client to pace itself.
    assert submit_s < 5, f"a submission waited {submit_s:.1f}s behind {n} long-polls"
