"""Bulk jobs end to end: real redis-server, pinned Celery workers, gunicorn, and the real client.

The big-folder tests run on 2-worker stacks with the same bulk settings (PINFER_RESIZE=fast and
PINFER_BULK_CHUNK=16 for speed on a 2-core machine; the single submissions they are compared with go
through the same stack, so the same settings). They hold at most 100 pending images per job
(Retry-After 1 s): the ingest client meets real 429s on a big folder, and an interrupted ingest is
always interrupted before everything was uploaded. The 1,000-image folder runs on a stack of its own
serving the tiny fixture model: its points are the folder's scale (every image once, real 429s) and
batched results equal to single ones, not ResNet-18's cost, which made it the slowest test of the
suite. The SIGKILL and resume tests share a ResNet-18 stack (a batch must be slow enough to catch in
flight). Backpressure and cancel each get a 1-worker stack of their own.
Synchronisation is always on a condition (wait_until, the API's long-poll, a process exit), never
on a fixed sleep.
"""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import requests

from pinfer_client.ingest import ingest, load_state, state_path_for
from pinfer_client.sdk import Client
from pinfer.procs import ROOT, wait_until
from shared import keys
from shared.schema import TERMINAL
from tests.integration._images import add_broken_and_other_files, image_tree, named_images, source_photos

pytestmark = pytest.mark.integration
BULK_PENDING = 100  # the bulk stack's PINFER_MAX_PENDING_PER_JOB


# --- fixtures and helpers --------------------------------------------------------------------------
@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> list[Path]:
    return source_photos(tmp_path_factory.mktemp("photos"))


BULK_SETTINGS = {"PINFER_RESIZE": "fast", "PINFER_BULK_CHUNK": 16, "PINFER_MAX_PENDING_PER_JOB": BULK_PENDING,
                 "PINFER_RETRY_AFTER_S": 1}


@pytest.fixture(scope="module")
def bulk_stack(make_stack):
    return make_stack(workers=2, **BULK_SETTINGS)


@pytest.fixture
def tiny_bulk_stack(make_stack, tiny_model_dir):
    """The bulk stack serving the tiny fixture model; stopped after its test (frees two workers)."""
    stack = make_stack(workers=2, PINFER_MODEL_DIR=tiny_model_dir, **BULK_SETTINGS)
    yield stack
    stack.stop()


def read_lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def get_job(stack, jid: str) -> dict:
    return stack.client.get_job(jid)


def job_results(stack, jid: str) -> tuple[list[dict], str]:
    """Every result line of a job from cursor 0 (one page: the jobs here are small)."""
    rows, next_cursor, status = stack.client.results(jid, 0, limit=10_000)
    assert next_cursor == len(rows)
    return rows, status


def assert_same_top_k(got: list[dict], ref: list[dict], what: str) -> float:
    """Same top-5 classes in the same order, scores within 1e-4; returns the largest score gap."""
    assert [t["class_index"] for t in got] == [t["class_index"] for t in ref], (what, got, ref)
    assert [t["label"] for t in got] == [t["label"] for t in ref], what
    gap = max(abs(g["score"] - r["score"]) for g, r in zip(got, ref))
    assert gap <= 1e-4, (what, got, ref)
    return gap


class UploadRecorder:
    """A pass-through HTTP proxy in front of the API. For every ``POST /v1/jobs/<id>/images`` it
    records the image names sent (``sent``) and those the server stored (``accepted``), and it
    counts the jobs created: what really went over the wire, whatever the client believes. (The
    server dedupes names within a job, so its own state cannot tell a re-upload from a first one.)"""

    NAME = re.compile(rb'Content-Disposition: form-data; name="images"; filename="([^"\r\n]*)"')
    HOP = {"connection", "keep-alive", "transfer-encoding", "content-length", "content-encoding", "host",
           "proxy-connection", "te", "trailer", "upgrade"}

    def __init__(self, upstream: str) -> None:
        self.upstream = upstream
        self.lock = threading.Lock()
        self.sent: list[str] = []
        self.accepted: list[str] = []
        self.jobs_created = 0
        local = threading.local()
        rec = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def forward(self) -> None:
                n = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(n) if n else b""
                path = self.path.split("?")[0].rstrip("/")
                upload = self.command == "POST" and path.endswith("/images")
                with rec.lock:
                    if upload:
                        rec.sent.extend(m.decode() for m in rec.NAME.findall(body))
                    elif self.command == "POST" and path == "/v1/jobs":
                        rec.jobs_created += 1
                if not hasattr(local, "session"):
                    local.session = requests.Session()
                headers = {k: v for k, v in self.headers.items() if k.lower() not in rec.HOP}
                r = local.session.request(self.command, rec.upstream + self.path, data=body or None,
                                          headers=headers, timeout=120, allow_redirects=False)
                if upload and r.status_code in (202, 429):
                    with rec.lock:
                        rec.accepted.extend(d["name"] for d in r.json()["accepted"])
                self.send_response(r.status_code)
                for k, v in r.headers.items():
                    if k.lower() not in rec.HOP | {"server", "date"}:  # send_response wrote its own
                        self.send_header(k, v)
                self.send_header("Content-Length", str(len(r.content)))
                self.end_headers()
                self.wfile.write(r.content)

            do_GET = do_POST = do_DELETE = forward

            def log_message(self, *args) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.base = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, name="upload-recorder", daemon=True).start()

    def take(self) -> tuple[list[str], list[str]]:
        """(names sent, names stored) since the last call."""
        with self.lock:
            out = (self.sent, self.accepted)
            self.sent, self.accepted = [], []
            return out

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


# --- 1. a folder of 1,000 images --------------------------------------------------------------------
def test_ingest_folder_of_1000_images(tiny_bulk_stack, photos, tmp_path):
    stack = tiny_bulk_stack
    root = tmp_path / "holiday"
    images = image_tree(root, photos, 1000)
    broken, skipped = add_broken_and_other_files(root)
    out = tmp_path / "results.jsonl"

    refused = []  # upload answers that were (partly) 429: the job's pending bound was reached
    stop = threading.Event()
    watchdog = threading.Timer(300, stop.set)  # a hung run ends as interrupted (exit 130), not never
    watchdog.start()
    t0 = time.monotonic()
    try:
        summary = ingest([root], stack.base, out, progress=False, poll_interval=0.2, stop=stop,
                         on_upload=lambda res: refused.append(1) if res.overloaded else None)
    finally:
        watchdog.cancel()
    ingest_s = time.monotonic() - t0
    assert summary.exit_code == 0, summary.format()
    assert summary.error is None and not summary.interrupted and summary.missing == 0

    # --out: exactly one line per image file, non-image files skipped.
    lines = read_lines(out)
    names = [line["name"] for line in lines]
    assert len(names) == len(set(names)) == len(images) + len(broken)
    assert set(names) == set(images) | set(broken)
    by_name = {line["name"]: line for line in lines}
    assert summary.total == len(images) + len(broken)
    assert summary.skipped == len(skipped) == 3
    assert summary.uploaded == len(images) + len(broken) and summary.duplicates == 0

    # The broken files, as the API really answers them: unreadable bytes are refused at upload
    # (unsupported_format, an empty file included); a truncated JPEG has a valid header, is
    # accepted, and fails in the worker (corrupt_image).
    expected_codes = {"broken/truncated.jpg": "corrupt_image", "broken/not-an-image.jpg": "unsupported_format",
                      "broken/nested/empty.png": "unsupported_format"}
    for name, code in expected_codes.items():
        assert by_name[name]["status"] == "failed", by_name[name]
        assert by_name[name]["error"]["code"] == code, by_name[name]
    assert by_name["broken/truncated.jpg"]["id"] and by_name["broken/not-an-image.jpg"]["id"]
    assert "empty" in by_name["broken/nested/empty.png"]["error"]["message"]
    assert summary.failed == {"corrupt_image": 1, "unsupported_format": 2}
    assert summary.succeeded == len(images)
    not_ok = [n for n in images if by_name[n]["status"] != "succeeded" or len(by_name[n]["top_k"]) != 5]
    assert not not_ok, [by_name[n] for n in not_ok[:5]]

    # The job as the server sees it.
    job = get_job(stack, summary.job_id)
    assert job["status"] == "finished" and job["finished_at"] is not None
    assert job["counts"] == {"total": len(images) + 3, "queued": 0, "running": 0, "succeeded": len(images),
                             "failed": 3, "canceled": 0}
    rows, status = job_results(stack, summary.job_id)
    assert status == "finished" and sorted(r["name"] for r in rows) == sorted(names)

    # Each distinct photo once through POST /v1/predictions on the same stack: every copy of it in
    # the job (batched with other images) has the same top-5 as the photo classified on its own.
    distinct = sorted(set(images.values()))
    t1 = time.monotonic()
    with ThreadPoolExecutor(16) as pool:
        subs = list(pool.map(lambda p: stack.submit(p.read_bytes()), distinct))
        singles = dict(zip(distinct, pool.map(lambda s: stack.result(s["id"]), subs)))
    singles_s = time.monotonic() - t1
    assert all(r["status"] == "succeeded" for r in singles.values()), \
        [(p.name, r.get("error")) for p, r in singles.items() if r["status"] != "succeeded"]
    gap = max(assert_same_top_k(by_name[n]["top_k"], singles[src]["top_k"], n) for n, src in images.items())
    # The same broken bytes submitted alone fail the same way.
    text = stack.submit(broken["broken/not-an-image.jpg"], expect=415)
    assert text["error"]["code"] == "unsupported_format"
    trunc = stack.result(stack.submit(broken["broken/truncated.jpg"])["id"])
    assert trunc["status"] == "failed" and trunc["error"]["code"] == "corrupt_image"

    print(f"\ningest of {len(images)} images + {len(broken)} broken + {len(skipped)} skipped files: "
          f"{ingest_s:.1f}s ({len(lines) / ingest_s:.1f} images/s, {len(refused)} uploads answered 429); "
          f"{len(images)} results compared with "
          f"{len(distinct)} single submissions ({singles_s:.1f}s): largest score gap {gap:.2e}")


# --- 2. SIGKILL of a worker in the middle of a job --------------------------------------------------
def test_job_completes_after_worker_sigkill(bulk_stack, photos, tmp_path):
    """Production delivery settings (PINFER_VISIBILITY_TIMEOUT_S=30, restore every 5 s)."""
    stack = bulk_stack
    stack.wait_ready(2)
    root = tmp_path / "photos"
    images = image_tree(root, photos, 300)
    out = tmp_path / "results.jsonl"
    stop = threading.Event()
    done: dict = {}
    runner = threading.Thread(target=lambda: done.update(summary=ingest(
        [root], stack.base, out, progress=False, poll_interval=0.2, stop=stop)), daemon=True)
    runner.start()
    try:
        state_path = state_path_for(out)
        wait_until(lambda: load_state(state_path) is not None, 30, "the ingest job")
        jid = load_state(state_path)["job_id"]
        r = stack.store.r
        names = {w["name"]: int(w["pid"]) for w in stack.workers()}

        def running(ids: list[str]) -> list[tuple[str, str, str]]:
            """(id, started_at, worker) of every image of ``ids`` now running."""
            pipe = r.pipeline(transaction=False)
            for pid in ids:
                pipe.hmget(keys.prediction(pid), "status", "started_at", "worker")
            return [(pid, started, worker) for pid, (status, started, worker) in zip(ids, pipe.execute())
                    if status == "running"]

        victim: dict = {}

        def freeze_a_full_batch() -> bool:
            """SIGSTOP a worker that claimed a batch of 8 or more images (one claim gives them one
            started_at) less than 0.2 s ago, and keep it stopped if it still holds images running:
            a frozen worker cannot finish them, so the kill is sure to hit work in flight."""
            now = time.time()
            ids = r.lrange(keys.job_items(jid), 0, -1)
            batches = Counter((worker, started) for _, started, worker in running(ids)
                              if worker in names and now - float(started) < 0.2)
            full = [worker for (worker, _), n in batches.items() if n >= 8]
            if not full:
                return False
            pid, held = names[full[0]], []
            os.kill(pid, signal.SIGSTOP)
            try:
                held = [p for p, _, worker in running(ids) if worker == full[0]]
            finally:
                if not held:
                    os.kill(pid, signal.SIGCONT)  # it finished the batch in between: try again
            victim.update(pid=pid, held=held)
            return bool(held)

        wait_until(freeze_a_full_batch, 60, "a worker classifying a full batch")
        os.kill(victim["pid"], signal.SIGKILL)
        killed_at = time.monotonic()
        in_flight = victim["held"]

        runner.join(180)
        assert not runner.is_alive(), "ingest did not finish within 3 minutes of the kill"
    finally:
        stop.set()
        runner.join(30)
    recovery_s = time.monotonic() - killed_at
    summary = done["summary"]
    assert summary.exit_code == 0, summary.format()

    lines = read_lines(out)
    assert len(lines) == len({line["name"] for line in lines}) == len(images)
    assert {line["name"] for line in lines} == set(images)
    assert all(line["status"] == "succeeded" for line in lines), \
        [line for line in lines if line["status"] != "succeeded"][:5]
    job = get_job(stack, jid)
    assert job["status"] == "finished"
    assert job["counts"] == {"total": len(images), "queued": 0, "running": 0, "succeeded": len(images),
                             "failed": 0, "canceled": 0}
    # The batch the dead worker held was delivered again and classified exactly once more.
    again = stack.store.get_many(in_flight)
    assert [(p.status, p.attempts) for p in again] == [("succeeded", 2)] * len(in_flight)
    ids = r.lrange(keys.job_items(jid), 0, -1)
    redelivered = sum(1 for p in stack.store.get_many(ids) if p.attempts > 1)
    print(f"\nSIGKILL of worker {victim['pid']} with {len(in_flight)} images in flight: all {len(images)} results "
          f"{recovery_s:.1f}s after the kill; {redelivered} images were delivered again")
    # The launcher replaced the killed process: the stack is whole again for the next test.
    stack.wait_ready(2, exclude_pids={victim["pid"]})


# --- 3. Ctrl-C and resume of the CLI ----------------------------------------------------------------
def test_interrupted_cli_resumes_without_loss_or_duplicates(bulk_stack, photos, tmp_path):
    stack = bulk_stack
    root = tmp_path / "photos"
    images = image_tree(root, photos, 300)
    out = tmp_path / "results.jsonl"
    state_path = state_path_for(out)
    recorder = UploadRecorder(stack.base)
    cmd = [sys.executable, "-m", "pinfer.cli", "ingest", str(root), "--api", recorder.base, "--out", str(out),
           "--no-progress", "--poll-interval", "0.2"]
    try:
        first = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            # A third of the lines written: enough finished images for a re-upload to show, while
            # the job's pending bound (BULK_PENDING) keeps the last images from being uploaded yet.
            wait_until(lambda: out.exists() and out.read_bytes().count(b"\n") >= len(images) // 3, 60,
                       "a third of the results", first)
            first.send_signal(signal.SIGINT)
            _, err1 = first.communicate(timeout=60)
        finally:
            if first.poll() is None:
                first.kill()
        assert first.returncode == 130, err1
        assert "Re-run the same command to resume" in err1
        state = load_state(state_path)
        assert state is not None and state["job_id"]
        before = read_lines(out)
        had_result = {line["name"] for line in before}
        sent1, stored1 = recorder.take()
        assert 0 < len(had_result) < len(images), len(had_result)

        second = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=180)
        assert second.returncode == 0, second.stderr
        sent2, stored2 = recorder.take()
    finally:
        recorder.close()

    # The output: exactly one line per image, the first run's lines kept as they were.
    lines = read_lines(out)
    names = [line["name"] for line in lines]
    assert len(names) == len(set(names)) == len(images) and set(names) == set(images)
    assert lines[:len(before)] == before
    assert all(line["status"] == "succeeded" for line in lines)
    assert f"resumed    {len(had_result)} already had a result" in second.stdout

    # No image that already had a result was sent to the server again.
    assert not had_result & set(sent2), sorted(had_result & set(sent2))[:5]
    # The first run was stopped part way through the uploads; the second stored the rest: every
    # image stored exactly once, in one job (the saved one, reused).
    assert stored2, "the first run had uploaded everything: the resume uploaded nothing new"
    assert len(stored1) == len(set(stored1)) and len(stored2) == len(set(stored2))
    assert not set(stored1) & set(stored2)
    assert set(stored1) | set(stored2) == set(images)
    assert recorder.jobs_created == 1
    assert load_state(state_path)["job_id"] == state["job_id"]
    job = get_job(stack, state["job_id"])
    assert job["status"] == "finished"
    assert job["counts"] == {"total": len(images), "queued": 0, "running": 0, "succeeded": len(images),
                             "failed": 0, "canceled": 0}
    rows, _ = job_results(stack, state["job_id"])
    assert sorted(r["name"] for r in rows) == sorted(images)
    print(f"\nCLI interrupted with {len(had_result)}/{len(images)} lines written and {len(stored1)} images stored; "
          f"the resumed run sent {len(set(sent2))} images ({len(set(sent2) - set(stored2))} already in the job, "
          f"{len(stored2)} new), none of them with a result")


# --- 4. backpressure --------------------------------------------------------------------------------
def test_backpressure_429_then_completes(make_stack, photos):
    bound = 20
    stack = make_stack(workers=1, PINFER_MAX_PENDING_PER_JOB=bound, PINFER_MAX_PENDING_IMAGES=2 * bound,
                       PINFER_RETRY_AFTER_S=1, PINFER_RESIZE="fast", PINFER_BULK_CHUNK=16)
    items = named_images(photos, 80, "bp")
    jid = stack.client.create_job(name="backpressure")["id"]
    url = f"{stack.base}/v1/jobs/{jid}/images"
    accepted: list[str] = []
    peak = {"pending": 0}

    def watch() -> None:
        c = get_job(stack, jid)["counts"]
        peak["pending"] = max(peak["pending"], c["queued"] + c["running"])

    # A fast raw uploader: 16 images a request from 4 threads, each chunk sent once.
    def post(chunk):
        r = requests.post(url, files=[("images", (n, d)) for n, d in chunk], timeout=60)
        return chunk, r

    chunks = [items[i:i + 16] for i in range(0, len(items), 16)]
    with ThreadPoolExecutor(4) as pool:
        answers = list(pool.map(post, chunks[:4]))
    rest = [item for chunk in chunks[4:] for item in chunk]
    refused = 0
    for chunk, r in answers:
        assert r.status_code in (202, 429), r.text
        body = r.json()
        got = [d["name"] for key in ("accepted", "duplicates", "rejected") for d in body[key]]
        assert not body["duplicates"] and not body["rejected"]
        accepted += got
        if r.status_code == 429:
            refused += 1
            assert body["error"]["code"] == "overloaded"
            assert r.headers["Retry-After"] == "1"
            # Images are taken in order up to the bound: what got in is a prefix of the request.
            assert got == [n for n, _ in chunk[:len(got)]]
            rest += chunk[len(got):]
        watch()
    assert refused >= 1, "4 x 16 images at once against a bound of 20 were never refused"

    # The SDK sends the rest, honouring Retry-After; every wait it makes is one more 429.
    waits: list[float] = []

    def sleep(seconds: float) -> None:
        waits.append(seconds)
        watch()
        time.sleep(seconds)  # the client's own backoff (Retry-After), not test synchronisation

    client = Client(stack.base, sleep=sleep)
    left = [rest[i:i + 16] for i in range(0, len(rest), 16)]
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda c: client.add_images(jid, c, overload_retries=120), left))
    assert all(not res.pending and not res.overloaded for res in results)
    assert not any(res.duplicates or res.rejected for res in results)
    accepted += [d["name"] for res in results for d in res.accepted]
    assert len(accepted) == len(set(accepted)) == len(items)  # each image stored exactly once

    client.close_job(jid)
    wait_until(lambda: get_job(stack, jid)["status"] == "finished", 120, "the job to finish")
    job = get_job(stack, jid)
    assert job["counts"] == {"total": len(items), "queued": 0, "running": 0, "succeeded": len(items),
                             "failed": 0, "canceled": 0}
    rows, status = job_results(stack, jid)
    assert status == "finished"
    assert sorted(r["name"] for r in rows) == sorted(n for n, _ in items)
    assert all(r["status"] == "succeeded" for r in rows)
    assert peak["pending"] <= bound, peak
    print(f"\nbackpressure: {refused} of 4 raw requests and {len(waits)} SDK requests answered 429 "
          f"(Retry-After 1 s); peak queued+running seen {peak['pending']} <= {bound}; all {len(items)} "
          f"images classified once")


# --- 5. cancel --------------------------------------------------------------------------------------
def test_cancel_leaves_no_queued_work_and_counts_add_up(make_stack, photos):
    stack = make_stack(workers=1, PINFER_RESIZE="fast")
    items = named_images(photos, 400, "cancel")
    client = Client(stack.base)
    jid = client.create_job(name="to-cancel")["id"]
    chunks = [items[i:i + 16] for i in range(0, len(items), 16)]
    with ThreadPoolExecutor(4) as pool:
        adds = list(pool.map(lambda c: client.add_images(jid, c), chunks))
    assert all(len(a.accepted) == len(c) and not a.pending for a, c in zip(adds, chunks))
    ids = [d["id"] for a in adds for d in a.accepted]
    before = client.get_job(jid)["counts"]
    assert before["queued"] > 0, before  # one worker cannot keep up with the uploads

    canceled = client.cancel_job(jid)
    assert canceled["status"] == "canceled", canceled
    assert canceled["counts"]["canceled"] > 0, canceled
    refused = requests.post(f"{stack.base}/v1/jobs/{jid}/images", files=[("images", ("late.jpg", items[0][1]))],
                            timeout=30)
    assert refused.status_code == 409 and refused.json()["error"]["code"] == "conflict"

    # The images running at the cancel finish; then nothing is queued or running any more.
    wait_until(lambda: get_job(stack, jid)["counts"]["running"] == 0, 60, "the running images to finish")
    settled = get_job(stack, jid)
    c = settled["counts"]
    assert settled["status"] == "canceled"
    assert c["queued"] == 0 and c["running"] == 0 and c["canceled"] > 0
    assert c["total"] == len(items) == c["succeeded"] + c["failed"] + c["canceled"]

    # The worker drains every remaining broker message without classifying a canceled image.
    r = stack.store.r
    t0 = time.monotonic()
    wait_until(lambda: r.llen(keys.QUEUE_BULK) == 0 and r.hlen(keys.KOMBU_UNACKED) == 0, 120,
               "the bulk queue to drain")
    drain_s = time.monotonic() - t0
    assert get_job(stack, jid)["counts"] == c  # succeeded did not grow while it drained

    with ThreadPoolExecutor(8) as pool:
        records = list(pool.map(stack.client.get, ids))
    assert all(rec["status"] in TERMINAL for rec in records)
    by_status = {s: [rec for rec in records if rec["status"] == s] for s in TERMINAL}
    assert {s: len(v) for s, v in by_status.items()} == {s: c[s] for s in TERMINAL}
    for rec in by_status["canceled"]:  # never claimed by a worker, so never classified
        assert rec["attempts"] == 0 and rec["started_at"] is None and "top_k" not in rec, rec
        assert rec["error"]["code"] == "canceled"
    rows, status = job_results(stack, jid)
    assert status == "canceled" and sorted(row["id"] for row in rows) == sorted(ids)
    # The worker is idle and healthy: a new submission goes straight through.
    assert stack.result(stack.submit(items[0][1])["id"])["status"] == "succeeded"
    print(f"\ncancel: {before['queued']} queued of {len(items)} before the DELETE; end counts {c}; "
          f"bulk queue drained {drain_s:.1f}s after the last running image finished")
