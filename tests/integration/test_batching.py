"""Adaptive micro-batching end to end: a real pinned worker, Redis, gunicorn.

The batch window (PINFER_MAX_WAIT_MS) is set long on purpose, so that an image held for it would
stand out in the timings every result records (created_at, started_at, finished_at, batch_size).
"""
from __future__ import annotations

import os
import signal
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import pytest

from tests.integration.conftest import jpeg

pytestmark = pytest.mark.integration

WINDOW_MS = 2000
MAX_BATCH = 8



def test_a_lone_image_is_not_held_for_the_batch_window(make_stack, tiny_model_dir):
    stack = make_stack(workers=1, PINFER_MODEL_DIR=tiny_model_dir, PINFER_MAX_WAIT_MS=WINDOW_MS,
                       PINFER_MAX_BATCH=MAX_BATCH)
    for i in range(3):  # one at a time: each finds the worker idle and nothing else queued
        r = stack.result(stack.submit(jpeg((40 * i, 90, 160)))["id"])
        assert r["status"] == "succeeded", r
        assert r["timings"]["batch_size"] == 1, r["timings"]
        # Held for the window, it would have started WINDOW_MS after it was submitted.
        assert (r["started_at"] - r["created_at"]) * 1000 < WINDOW_MS / 2, r
    # Submit and wait in one request (POST ?wait): the answer to the submit is the result itself.
    resp = stack.http.post(f"{stack.base}/v1/predictions", params={"wait": 30}, data=jpeg((10, 200, 10)),
                           headers={"Content-Type": "image/jpeg"}, timeout=60)
    assert resp.status_code == 200, resp.text
    r = resp.json()
    assert r["status"] == "succeeded" and r["timings"]["batch_size"] == 1, r
    assert resp.headers["Location"] == f"/v1/predictions/{r['id']}"


def test_images_submitted_while_the_worker_is_busy_share_forward_passes(make_stack, tiny_model_dir):
    stack = make_stack(workers=1, PINFER_MODEL_DIR=tiny_model_dir, PINFER_MAX_WAIT_MS=WINDOW_MS,
                       PINFER_MAX_BATCH=MAX_BATCH)
    worker_pid = int(stack.workers()[0]["pid"])
    n = MAX_BATCH + 3
    # A stopped worker stands for one busy in a long forward pass: its event loop reads nothing.
    os.kill(worker_pid, signal.SIGSTOP)
    try:
        with ThreadPoolExecutor(n) as pool:
            ids = [s["id"] for s in pool.map(lambda i: stack.submit(jpeg((20 * i, 40, 200))), range(n))]
    finally:
        os.kill(worker_pid, signal.SIGCONT)
    results = [stack.result(pid) for pid in ids]
    assert [r["status"] for r in results] == ["succeeded"] * n

    # What queued up meanwhile runs as one full batch, then the rest together, at once.
    sizes = Counter(r["timings"]["batch_size"] for r in results)
    assert sizes == {MAX_BATCH: MAX_BATCH, 3: 3}, sizes
    full = [r for r in results if r["timings"]["batch_size"] == MAX_BATCH]
    rest = [r for r in results if r["timings"]["batch_size"] == 3]
    assert len({r["started_at"] for r in full}) == 1 and len({r["started_at"] for r in rest}) == 1
    # The remainder was not held for the window once the full batch was done.
    assert (rest[0]["started_at"] - max(r["finished_at"] for r in full)) * 1000 < WINDOW_MS / 2
