"""One ingest run: job selection, the upload threads and the results reader, and the bookkeeping that
lets it stop at any point (its :class:`~pinfer_client.StopToken`) and resume later.

Images are uploaded in chunks by a few threads while a reader thread follows the job's results
cursor and appends one line per image to ``--out`` as results arrive (:mod:`.ledger`); the state
file (:mod:`.state`) remembers the job and the cursor.
"""
from __future__ import annotations

import sys
import threading
import time
from collections import Counter
from concurrent.futures import FIRST_EXCEPTION, Future, ThreadPoolExecutor, wait
from typing import Callable

from tqdm import tqdm

from pinfer_client.ingest.ledger import ResultsFile, result_record
from pinfer_client.ingest.scan import ImageFile
from pinfer_client.ingest.state import load_state, save_state, state_path_for
from pinfer_client.ingest.summary import Summary
from pinfer_client.sdk import JOB_DONE_STATUSES, AddResult, ApiError, Client, ClientError
from pinfer_client.stop import Stopped, StopToken

RESULTS_PAGE = 1000
MAX_NAME = 1024  # longest image name the API takes (longer ones fail locally as name_too_long)


class Run:
    """One ingest run: job selection, upload threads, the results reader, and the bookkeeping
    that lets it stop at any point and resume later."""

    def __init__(self, images: list[ImageFile], output: ResultsFile, client: Client, api: str, *,
                 top_k: int | None, concurrency: int, chunk: int, job_name: str, progress: bool,
                 poll_interval: float, overload_patience: float, stop: StopToken,
                 on_upload: Callable[[AddResult], None] | None, log: Callable[[str], None]) -> None:
        self.images = images
        self.expected = {img.name for img in images}
        self.output = output
        self.client = client
        self.api = api
        self.top_k = top_k
        self.concurrency = concurrency
        self.chunk = chunk
        self.job_name = job_name
        self.poll_interval = poll_interval
        self.overload_patience = overload_patience
        self.stop = stop
        self.on_upload = on_upload
        self.log = log
        self.state_path = state_path_for(output.path)
        self.state: dict = {}
        self.lock = threading.Lock()
        self.wake = threading.Event()
        self.fatal: str | None = None
        self.finalized = False
        self.job_status = ""
        self.in_job: set[str] = set()
        self.counts: Counter[str] = Counter()
        self.futures: list[Future] = []
        self.reader: threading.Thread | None = None
        self.bar = self._progress_bar(progress)

    # -- small helpers --
    def _progress_bar(self, enabled: bool) -> tqdm:
        done = sum(1 for n in self.expected if n in self.output)
        return tqdm(total=len(self.expected), initial=done, unit="img", desc="results", file=sys.stderr,
                    disable=not enabled, dynamic_ncols=True, smoothing=0.05)

    def _fail(self, message: str) -> None:
        with self.lock:
            if self.fatal is None:
                self.fatal = message
        self.stop.set()
        self.wake.set()

    def _save_state(self, **changes: object) -> None:
        with self.lock:
            if self.finalized and not changes.get("_final"):
                return
            changes.pop("_final", None)
            self.state.update(changes)
            save_state(self.state_path, self.state)

    def _record(self, row: dict) -> None:
        """Store one result line from the server (a canceled one is not a result: not stored)."""
        name = row.get("name")
        if not isinstance(name, str):
            return
        if row.get("status") == "canceled":
            with self.lock:
                self.counts["canceled"] += 1
            return
        if self.output.write(result_record(row)):
            with self.lock:
                self.counts["new_results"] += 1
            if name in self.expected:
                self.bar.update(1)

    # -- job selection --
    def open_job(self) -> tuple[str, int] | None:
        """The job to upload into and the cursor to read from: the saved job when the API still
        has it open, else a new one (after draining a closed saved job). None: nothing left."""
        saved = load_state(self.state_path)
        if saved and saved.get("api") != self.client.base_url:
            self.log(f"state file names another API ({saved.get('api')}); starting a new job")
            saved = None
        if saved:
            job_id = str(saved["job_id"])
            cursor = int(saved.get("cursor") or 0)
            if self.output.repaired or not self.output.status:
                cursor = 0  # lines before the saved cursor may be gone: read the job again
            job = self._get_job(job_id)
            if job is None:
                self.log(f"job {job_id} is gone (expired?); starting a new job")
            elif job.get("status") == "canceled":
                self.log(f"job {job_id} was canceled; starting a new job")
            elif self.top_k is not None and job.get("top_k") not in (None, self.top_k):
                self.log(f"job {job_id} has top_k {job.get('top_k')}, not {self.top_k}; starting a new job")
            else:
                self.state = dict(saved)
                if job.get("status") == "open":
                    self.log(f"resuming job {job_id} at cursor {cursor}")
                    return job_id, cursor
                # closed or finished: collect what it has, then put what is left in a new job
                self.log(f"job {job_id} is {job.get('status')}; collecting its results")
                self._read_results(job_id, cursor)
                if self.stop.is_set() or not self._todo():
                    return None
        job = self.client.create_job(name=self.job_name, top_k=self.top_k)
        self.state = {"api": self.client.base_url, "job_id": job["id"], "cursor": 0,
                      "name": self.job_name, "top_k": job.get("top_k", self.top_k),
                      "format": "csv" if self.output.csv else "jsonl", "created_at": time.time()}
        self._save_state()
        return job["id"], 0

    def _get_job(self, job_id: str) -> dict | None:
        try:
            return self.client.get_job(job_id)
        except ApiError as exc:
            if exc.status in (404, 410):
                return None
            raise

    def _todo(self) -> list[ImageFile]:
        return [img for img in self.images if img.name not in self.output]

    # -- results reader --
    def _read_results(self, job_id: str, cursor: int) -> None:
        """Follow the cursor until the job is finished/canceled and everything is read (or stop)."""
        while not self.stop.is_set():
            rows, next_cursor, status = self.client.results(job_id, cursor, RESULTS_PAGE)
            for row in rows:
                self._record(row)
            self.job_status = status
            if next_cursor != cursor:
                self.output.sync()
                cursor = next_cursor
                self._save_state(cursor=cursor)
            self.bar.set_postfix_str(f"sent {self.counts['sent']}", refresh=False)
            if status in JOB_DONE_STATUSES and len(rows) < RESULTS_PAGE:
                return
            if len(rows) < RESULTS_PAGE:
                self.wake.wait(self.poll_interval)
                self.wake.clear()

    def _reader(self, job_id: str, cursor: int) -> None:
        try:
            self._read_results(job_id, cursor)
        except Stopped:
            pass
        except ClientError as exc:
            self._fail(f"reading results failed: {exc}")
        except Exception as exc:  # never die silently in a thread
            self._fail(f"reading results failed: {exc!r}")

    # -- uploads --
    def _upload_chunk(self, job_id: str, chunk: list[ImageFile]) -> None:
        try:
            self._upload_chunk_inner(job_id, chunk)
        except Stopped:
            pass
        except ApiError as exc:
            if exc.status == 409:
                self._fail(f"job {job_id} no longer accepts images ({exc.message}); canceled by someone else?")
            else:
                self._fail(f"upload failed: {exc}")
        except ClientError as exc:
            self._fail(f"upload failed: {exc}")
        except Exception as exc:
            self._fail(f"upload failed: {exc!r}")

    def _upload_chunk_inner(self, job_id: str, chunk: list[ImageFile]) -> None:
        if self.stop.is_set():
            return
        pending: list[tuple[str, bytes]] = []
        for img in chunk:
            if img.name in self.output:
                continue
            if len(img.name) > MAX_NAME:  # the API would refuse the whole request for it
                self._record({"name": img.name, "id": None, "status": "failed",
                              "error": {"code": "name_too_long",
                                        "message": f"names are limited to {MAX_NAME} characters"}})
                continue
            try:
                pending.append((img.name, img.path.read_bytes()))
            except OSError as exc:  # a local failure is a result too: the image cannot be classified
                self._record({"name": img.name, "id": None, "status": "failed",
                              "error": {"code": "unreadable_file", "message": str(exc)}})
        last_progress = time.monotonic()
        while pending:
            if self.stop.is_set():
                return
            res = self.client.add_images(job_id, pending, overload_retries=0)
            got_in = res.names_in
            with self.lock:
                self.in_job |= got_in
                self.counts["sent"] += len(pending)
                self.counts["uploaded"] += len(res.accepted) + len(res.rejected)
                self.counts["duplicates"] += len(res.duplicates)
            if self.on_upload is not None:
                self.on_upload(res)
            if not res.pending:
                return
            if not res.overloaded:
                raise ClientError(f"the server did not acknowledge {res.pending[:3]!r}")
            now = time.monotonic()
            if got_in:
                last_progress = now
            elif now - last_progress > self.overload_patience:
                raise ClientError(f"the server stayed overloaded for {self.overload_patience:.0f} s")
            left = set(res.pending)
            pending = [(n, d) for n, d in pending if n in left]
            delay = res.retry_after if res.retry_after is not None else self.client.backoff_delay(0)
            if self.stop.wait(delay):
                return

    def _upload_all(self, job_id: str) -> None:
        todo = self._todo()
        chunks = [todo[i:i + self.chunk] for i in range(0, len(todo), self.chunk)]
        pool = ThreadPoolExecutor(max_workers=self.concurrency, thread_name_prefix="pinfer-upload")
        try:
            self.futures = [pool.submit(self._upload_chunk, job_id, c) for c in chunks]
            pending = set(self.futures)
            while pending and not self.stop.is_set():
                _, pending = wait(pending, timeout=0.2, return_when=FIRST_EXCEPTION)
        finally:
            pool.shutdown(wait=False, cancel_futures=True)

    # -- the whole run --
    def execute(self) -> None:
        opened = self.open_job()
        if opened is None:
            return
        job_id, cursor = opened
        reader = threading.Thread(target=self._reader, args=(job_id, cursor), name="pinfer-results", daemon=True)
        self.reader = reader
        reader.start()
        self._upload_all(job_id)
        if self.stop.is_set():
            return
        self.client.close_job(job_id)
        self.wake.set()
        while reader.is_alive() and not self.stop.is_set():
            reader.join(0.2)
        if self.stop.is_set():
            return
        # names that were already in the job but whose result lay before the saved cursor
        lost = [n for n in self.expected if n not in self.output and n in self.in_job]
        if lost and cursor > 0 and self.job_status == "finished":
            self.log(f"{len(lost)} results are missing from {self.output.path}; reading the job from the start")
            self._read_results(job_id, 0)
        if self.job_status == "canceled":
            self.fatal = self.fatal or f"job {job_id} was canceled before every image had a result"

    def finish(self, summary: Summary) -> None:
        """Stop every thread, flush the output and save the state: safe to resume from here."""
        self.stop.set()
        self.wake.set()
        # let requests in flight end (bounded), so nothing of this run lands after it returned
        grace = min(10.0, self.client.timeout)
        # (futures canceled by shutdown() never count as done for wait(): leave them out)
        wait([f for f in self.futures if not f.cancelled()], timeout=grace)
        if self.reader is not None and self.reader is not threading.current_thread():
            self.reader.join(grace)
        self.output.sync()
        with self.lock:
            self.finalized = True
        if self.state:
            self._save_state(_final=True)
        self.bar.close()
        summary.job_id = self.state.get("job_id")
        summary.new_results = self.counts["new_results"]
        summary.uploaded = self.counts["uploaded"]
        summary.duplicates = self.counts["duplicates"]
        summary.canceled = self.counts["canceled"]
        summary.error = summary.error or self.fatal
