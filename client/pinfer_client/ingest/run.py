"""``pinfer ingest``: classify a folder tree through a bulk job, resumably.

    pinfer ingest PATH... --api URL --out results.jsonl [--csv] [--top-k K] [--concurrency N]
                  [--chunk N] [--name JOBNAME] [--no-progress]

Images are uploaded in chunks by a few threads while a reader thread follows the job's results
cursor and appends one line per image to ``--out`` as results arrive. A small state file beside it
(``<out>.state.json``) remembers the job and the cursor, so running the same command again after a
crash, a Ctrl-C or a lost API continues where it stopped: names that already have a line are never
uploaded again, names already in the job come back as duplicates (their results arrive through the
cursor), and the output ends with exactly one line per image.

Also runnable as ``python -m client.ingest``. Programmatic use: :func:`ingest` returns a
:class:`Summary`.
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import os
import sys
import threading
import time
from collections import Counter
from concurrent.futures import FIRST_EXCEPTION, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence, TextIO

from tqdm import tqdm

from client.sdk import JOB_DONE_STATUSES, AddResult, ApiError, Client, ClientError, wire_name

#: What counts as an image (by suffix, case-insensitive); everything else is skipped and counted.
IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff"})
CSV_COLUMNS = ("name", "id", "status", "label1", "score1", "class_index1", "top_k", "error_code", "error_message")
STATE_VERSION = 1
RESULTS_PAGE = 1000
MAX_NAME = 1024  # longest image name the API takes (longer ones fail locally as name_too_long)
DEFAULT_API = "http://127.0.0.1:8000"

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130


class UsageError(Exception):
    """Raised for problems with the command line or the output file that no retry can fix."""


class _Stopped(Exception):
    """Raised inside a worker thread to unwind quickly once the run is stopping."""


# --- finding images --------------------------------------------------------------------------------
@dataclass(frozen=True)
class ImageFile:
    """One image to classify: ``name`` is the name it has in the job and in ``--out``."""

    name: str
    path: Path


def scan_paths(paths: Sequence[str | os.PathLike]) -> tuple[list[ImageFile], int]:
    """Images under ``paths`` (folders walked recursively, sorted) and the count of skipped
    non-image files. Names are relative to the PATH they were found under, prefixed by that
    PATH's basename when several PATHs are given, so they stay unique."""
    if not paths:
        raise UsageError("no PATH given")
    unique: dict[Path, str | os.PathLike] = {}
    for raw in paths:  # the same PATH given twice counts once
        unique.setdefault(Path(raw).resolve(), raw)
    several = len(unique) > 1
    images: dict[str, ImageFile] = {}
    skipped = 0
    for raw in unique.values():
        root = Path(raw)
        if not root.exists():
            raise UsageError(f"{raw}: no such file or folder")
        found: list[tuple[str, Path]] = []
        if root.is_dir():
            prefix = (root.resolve().name + "/") if several else ""
            for folder, dirs, files in os.walk(root):
                dirs.sort()
                for fname in files:
                    path = Path(folder) / fname
                    if path.suffix.lower() in IMAGE_SUFFIXES:
                        found.append((prefix + path.relative_to(root).as_posix(), path))
                    else:
                        skipped += 1
        elif root.suffix.lower() in IMAGE_SUFFIXES:
            found.append((root.name, root))
        else:
            skipped += 1
        for rel, path in sorted(found):
            name = wire_name(rel)
            other = images.get(name)
            if other is not None:
                if other.path.resolve() == path.resolve():
                    continue  # the same file given twice
                raise UsageError(f"two files would get the same name {name!r}: {other.path} and {path}; "
                                 "ingest them separately or rename a folder")
            images[name] = ImageFile(name, path)
    return list(images.values()), skipped


# --- the output file -------------------------------------------------------------------------------
def result_record(row: dict) -> dict:
    """The line stored for one result: name, id, status, then top_k or error."""
    out = {"name": row.get("name"), "id": row.get("id"), "status": row.get("status")}
    if row.get("status") == "succeeded":
        out["top_k"] = row.get("top_k") or []
    else:
        out["error"] = row.get("error") or {"code": "unknown", "message": "no error given"}
    return out


def _csv_row(rec: dict) -> list:
    top = rec.get("top_k") or []
    first = top[0] if top else {}
    err = rec.get("error") or {}
    compact = json.dumps([[t.get("label"), t.get("score"), t.get("class_index")] for t in top],
                         ensure_ascii=False, separators=(",", ":")) if top else ""
    message = " ".join(str(err.get("message", "")).split())  # one physical line per row
    return [rec.get("name"), rec.get("id") or "", rec.get("status"), first.get("label", ""),
            first.get("score", ""), first.get("class_index", ""), compact, err.get("code", ""), message]


class ResultsFile:
    """``--out``: append-only, one line per image name, flushed line by line so a crash loses at
    most a partial last line, which :meth:`open` cuts off (and the run fetches again)."""

    def __init__(self, path: Path, use_csv: bool) -> None:
        self.path = path
        self.csv = use_csv
        self.status: dict[str, tuple[str, str]] = {}  # name -> (status, error code)
        self.repaired = False
        self._fh: TextIO | None = None
        self._lock = threading.Lock()

    def open(self) -> None:
        """Load the names already present, cut a crash-truncated last line, open for appending.

        Only the last line can be torn (each line is one write ending in a newline); any other bad
        line means ``--out`` is not ours, and it is refused rather than rewritten."""
        raw = self.path.read_bytes() if self.path.exists() else b""
        body, sep, tail = raw.rpartition(b"\n")
        header_seen = False
        for number, line in enumerate(body.split(b"\n") if sep else [], start=1):
            if not line.strip():
                continue
            parsed = self._parse(line, header_seen)
            if parsed is None:
                raise UsageError(f"{self.path}:{number} is not a line pinfer ingest wrote "
                                 f"({'CSV' if self.csv else 'JSON Lines'} expected); use another --out")
            if parsed == "header":
                header_seen = True
            else:
                self.status.setdefault(parsed[0], (parsed[1], parsed[2]))
        if tail:
            keep = len(body) + len(sep)
            # a JSON object that parses is whole (its last byte is the closing brace): keep it and
            # add the newline; a CSV row without its newline may be cut inside a field: drop it
            parsed = None if self.csv else self._parse(tail, header_seen)
            with self.path.open("r+b") as fh:
                fh.truncate(keep)
                if isinstance(parsed, tuple):
                    fh.seek(keep)
                    fh.write(tail + b"\n")
                    self.status.setdefault(parsed[0], (parsed[1], parsed[2]))
                else:
                    self.repaired = True
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fh = self.path.open("a", encoding="utf-8", newline="")
        if self.csv and not header_seen:
            self._write_line(self._csv_line(list(CSV_COLUMNS)))

    def _parse(self, line: bytes, header_seen: bool) -> tuple[str, str, str] | str | None:
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError:
            return None
        if self.csv:
            try:
                row = next(csv.reader([text]))
            except (csv.Error, StopIteration):
                return None
            if tuple(row) == CSV_COLUMNS:
                return "header" if not header_seen else None
            if not header_seen or len(row) != len(CSV_COLUMNS):
                return None
            return row[0], row[2], row[7]
        try:
            rec = json.loads(text)
        except ValueError:
            return None
        if not isinstance(rec, dict) or not isinstance(rec.get("name"), str):
            return None
        return rec["name"], str(rec.get("status")), str((rec.get("error") or {}).get("code", ""))

    @staticmethod
    def _csv_line(row: list) -> str:
        buf = io.StringIO()
        csv.writer(buf, lineterminator="\n").writerow(row)
        return buf.getvalue()

    def _write_line(self, text: str) -> None:
        assert self._fh is not None
        self._fh.write(text)
        self._fh.flush()

    def __contains__(self, name: object) -> bool:
        return name in self.status

    def write(self, rec: dict) -> bool:
        """Append one result unless its name already has a line (or the file is closed)."""
        with self._lock:
            name = rec["name"]
            if self._fh is None or name in self.status:
                return False
            if self.csv:
                self._write_line(self._csv_line(_csv_row(rec)))
            else:
                self._write_line(json.dumps(rec, ensure_ascii=False) + "\n")
            self.status[name] = (rec["status"], str((rec.get("error") or {}).get("code", "")))
            return True

    def sync(self) -> None:
        """Make the lines durable before the state file's cursor moves past them."""
        with self._lock:
            if self._fh is not None:
                self._fh.flush()
                os.fsync(self._fh.fileno())

    def close(self) -> None:
        with self._lock:
            if self._fh is not None:
                self._fh.flush()
                self._fh.close()
                self._fh = None


# --- the state file --------------------------------------------------------------------------------
def state_path_for(out: Path) -> Path:
    """``<out>.state.json``, beside the results."""
    return out.with_name(out.name + ".state.json")


def load_state(path: Path) -> dict | None:
    """The saved state, or None when absent or unreadable (then a new job is made)."""
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(state, dict) or state.get("version") != STATE_VERSION or not state.get("job_id"):
        return None
    return state


def save_state(path: Path, state: dict) -> None:
    """Write atomically (temp file + rename): a crash leaves the old state or the new, never half."""
    state = dict(state, version=STATE_VERSION, updated_at=time.time())
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(state, indent=1) + "\n", encoding="utf-8")
    os.replace(tmp, path)


# --- summary ---------------------------------------------------------------------------------------
@dataclass
class Summary:
    """How a run ended; ``exit_code`` is what the CLI returns."""

    out: Path
    total: int = 0                      # images found
    skipped: int = 0                    # non-image files
    already_done: int = 0               # images that had a line before this run
    new_results: int = 0                # lines written by this run
    succeeded: int = 0                  # over all images (this run and earlier ones)
    failed: dict[str, int] = field(default_factory=dict)  # error code -> images
    missing: int = 0                    # images without a line at the end
    uploaded: int = 0                   # images this run got into a job (accepted + rejected)
    duplicates: int = 0                 # sent again but already in the job
    canceled: int = 0                   # results that came back canceled (not written)
    elapsed_s: float = 0.0
    job_id: str | None = None
    interrupted: bool = False
    error: str | None = None

    @property
    def rate(self) -> float:
        """Results per second of this run."""
        return self.new_results / self.elapsed_s if self.elapsed_s > 0 else 0.0

    @property
    def exit_code(self) -> int:
        if self.interrupted:
            return EXIT_INTERRUPTED
        return EXIT_FAILED if self.missing else EXIT_OK

    def format(self) -> str:
        """The human summary printed at the end."""
        failed = sum(self.failed.values())
        by_code = ", ".join(f"{c} {n}" for c, n in sorted(self.failed.items()))
        lines = [f"pinfer ingest: {self.total} images -> {self.out}" + (f" (job {self.job_id})" if self.job_id else ""),
                 f"  succeeded  {self.succeeded}",
                 f"  failed     {failed}" + (f"  ({by_code})" if by_code else ""),
                 f"  skipped    {self.skipped} non-image files"]
        if self.already_done:
            lines.append(f"  resumed    {self.already_done} already had a result")
        if self.canceled:
            lines.append(f"  canceled   {self.canceled} (job canceled; not written)")
        if self.missing:
            lines.append(f"  missing    {self.missing} without a result")
        lines.append(f"  elapsed    {self.elapsed_s:.1f} s  ({self.rate:.1f} images/s)")
        return "\n".join(lines)


# --- the run ---------------------------------------------------------------------------------------
class _Run:
    """One ingest run: job selection, upload threads, the results reader, and the bookkeeping
    that lets it stop at any point and resume later."""

    def __init__(self, images: list[ImageFile], output: ResultsFile, client: Client, api: str, *,
                 top_k: int | None, concurrency: int, chunk: int, job_name: str, progress: bool,
                 poll_interval: float, overload_patience: float, stop: threading.Event,
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
        except _Stopped:
            pass
        except ClientError as exc:
            self._fail(f"reading results failed: {exc}")
        except Exception as exc:  # never die silently in a thread
            self._fail(f"reading results failed: {exc!r}")

    # -- uploads --
    def _upload_chunk(self, job_id: str, chunk: list[ImageFile]) -> None:
        try:
            self._upload_chunk_inner(job_id, chunk)
        except _Stopped:
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


def ingest(paths: Sequence[str | os.PathLike], api: str, out: str | os.PathLike, *, csv: bool = False,
           top_k: int | None = None, concurrency: int = 4, chunk: int = 16, name: str | None = None,
           progress: bool = True, retries: int = 5, timeout: float = 30.0, poll_interval: float = 0.5,
           overload_patience: float = 600.0, client: Client | None = None,
           stop: threading.Event | None = None, on_upload: Callable[[AddResult], None] | None = None,
           log: Callable[[str], None] | None = None) -> Summary:
    """Classify every image under ``paths`` into ``out``; see the module docstring.

    Setting ``stop`` (a threading.Event) ends the run like a Ctrl-C: state saved, output flushed,
    ``Summary.interrupted`` set. ``on_upload`` sees every upload answer (progress, tests).
    Raises UsageError for bad paths or an ``out`` that is not a results file."""
    started = time.monotonic()
    log = log or _log
    out_path = Path(out)
    images, skipped = scan_paths(paths)
    output = ResultsFile(out_path, csv)
    output.open()
    summary = Summary(out=out_path, total=len(images), skipped=skipped,
                      already_done=sum(1 for img in images if img.name in output))
    run: _Run | None = None
    stop = stop or threading.Event()
    own_client = client is None
    try:
        if summary.already_done < len(images):
            if output.repaired:
                log(f"repaired {out_path}: cut a partial last line left by an interrupted run")

            def interruptible_sleep(seconds: float) -> None:
                if stop.wait(seconds):
                    raise _Stopped()

            if client is None:
                client = Client(api, timeout=timeout, retries=retries, pool_size=concurrency + 2,
                                sleep=interruptible_sleep)
            default_name = name or Path(paths[0]).resolve().name or "pinfer-ingest"
            run = _Run(images, output, client, api, top_k=top_k, concurrency=max(1, concurrency),
                       chunk=max(1, chunk), job_name=default_name, progress=progress,
                       poll_interval=poll_interval, overload_patience=overload_patience, stop=stop,
                       on_upload=on_upload, log=log)
            try:
                run.execute()
                if stop.is_set() and run.fatal is None:
                    summary.interrupted = True
            except KeyboardInterrupt:
                summary.interrupted = True
            except _Stopped:
                summary.interrupted = run.fatal is None
            except ClientError as exc:
                summary.error = str(exc)
            finally:
                run.finish(summary)
    finally:
        output.close()
        if own_client and client is not None:
            client.close()
    summary.elapsed_s = time.monotonic() - started
    for img in images:
        status, code = output.status.get(img.name, ("", ""))
        if status == "succeeded":
            summary.succeeded += 1
        elif status:
            summary.failed[code or "unknown"] = summary.failed.get(code or "unknown", 0) + 1
        else:
            summary.missing += 1
    return summary


def _log(message: str) -> None:
    tqdm.write(f"pinfer ingest: {message}", file=sys.stderr)


# --- command line ----------------------------------------------------------------------------------
def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pinfer ingest",
        description="Classify every image under PATH... through a pinfer bulk job. Resumable: run the "
                    "same command again after an interruption and it continues where it stopped.")
    parser.add_argument("paths", nargs="+", metavar="PATH", help="image files or folders (walked recursively)")
    parser.add_argument("--api", default=os.environ.get("PINFER_API_URL", DEFAULT_API),
                        help="API base URL (default: $PINFER_API_URL or %(default)s)")
    parser.add_argument("--out", required=True, type=Path,
                        help="results file, one line per image (JSON Lines; CSV with --csv)")
    parser.add_argument("--csv", action="store_true", help="write CSV instead of JSON Lines")
    parser.add_argument("--top-k", type=_positive_int, default=None, help="labels per image (server default: 5)")
    parser.add_argument("--concurrency", type=_positive_int, default=4, help="upload threads (default: 4)")
    parser.add_argument("--chunk", type=_positive_int, default=16, help="images per upload request (default: 16)")
    parser.add_argument("--name", default=None, help="job name (default: the first PATH's folder name)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--retries", type=int, default=5, help="retries of a failing call (default: 5)")
    parser.add_argument("--timeout", type=float, default=30.0, help="seconds to wait for one answer (default: 30)")
    parser.add_argument("--poll-interval", type=float, default=0.5, help=argparse.SUPPRESS)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """``pinfer ingest``: 0 every image has a result, 1 the run could not finish, 2 usage, 130 Ctrl-C."""
    args = build_parser().parse_args(argv)
    try:
        summary = ingest(args.paths, args.api, args.out, csv=args.csv, top_k=args.top_k,
                         concurrency=args.concurrency, chunk=args.chunk, name=args.name,
                         progress=not args.no_progress, retries=args.retries, timeout=args.timeout,
                         poll_interval=args.poll_interval)
    except UsageError as exc:
        print(f"pinfer ingest: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except OSError as exc:  # the output or state file cannot be written (permissions, disk full)
        print(f"pinfer ingest: error: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        print("pinfer ingest: interrupted. Re-run the same command to resume.", file=sys.stderr)
        return EXIT_INTERRUPTED
    print(summary.format())
    if summary.interrupted:
        print(f"pinfer ingest: interrupted; state saved in {state_path_for(args.out)}. "
              "Re-run the same command to resume.", file=sys.stderr)
    elif summary.exit_code != EXIT_OK:
        reason = summary.error or f"{summary.missing} images have no result"
        print(f"pinfer ingest: could not finish: {reason}. Re-run the same command to resume.", file=sys.stderr)
    return summary.exit_code


if __name__ == "__main__":
    sys.exit(main())
