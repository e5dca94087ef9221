"""Python client for the pinfer HTTP API (docs/http-api.md).

It runs on laptops, so it needs only ``requests``: no torch, numpy, celery, redis, or the server
packages. One pooled :class:`requests.Session` is shared by every call (and by threads), and each
call retries what is safe to retry:

* every call retries on connection errors, timeouts, 5xx and 429. Every POST carries an
  ``Idempotency-Key`` (a new one per call, the same on its retries), so the server answers a
  retried ``submit`` or ``create_job`` whose first answer was lost with that first answer: nothing
  is classified twice and no stray job is left (uploads to a job are deduped by name as well).
  A 409 ``idempotency_in_progress`` (the first try is still being handled) is retried too.

Waits use exponential backoff with jitter, or the server's ``Retry-After`` when it sends one.

The errors live in :mod:`pinfer_client.errors` and the bulk records in :mod:`pinfer_client.records`
(both re-exported here). What remains, about 400 lines, is one :class:`Client` with one method per
endpoint on one retry/transport core: split further, the retry rules would be read in two places.
"""
from __future__ import annotations

import json
import os
import random
import time
import uuid
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence
from urllib.parse import quote

import requests
from requests.adapters import HTTPAdapter
from urllib3.exceptions import ConnectTimeoutError, NewConnectionError

from pinfer_client.errors import (ApiError, ApiUnreachable, ClientError, Overloaded, WaitTimeout,
                                  parse_retry_after)
from pinfer_client.records import (JOB_DONE_STATUSES, TERMINAL_STATUSES, AddResult, ResultsPage,
                                   wire_name)
from pinfer_client.stop import Stopped, StopToken

#: Environment variable the API key is read from when none is passed (``Authorization: Bearer``).
API_KEY_ENV = "PINFER_API_KEY"
#: Sent with every POST (a new random key per call, the same on its retries).
IDEMPOTENCY_HEADER = "Idempotency-Key"

__all__ = [
    "AddResult",
    "ApiError",
    "ApiUnreachable",
    "Client",
    "ClientError",
    "JOB_DONE_STATUSES",
    "Overloaded",
    "ResultsPage",
    "StopToken",
    "Stopped",
    "TERMINAL_STATUSES",
    "WaitTimeout",
    "parse_retry_after",
    "wire_name",
]


ImageInput = bytes | bytearray | memoryview | str | os.PathLike
USER_AGENT = "pinfer-client/0.1"


# --- helpers ---------------------------------------------------------------------------------------
def _read_image(image: ImageInput) -> tuple[bytes, str]:
    """Bytes and a filename for an image given as bytes or a path."""
    if isinstance(image, (bytes, bytearray, memoryview)):
        return bytes(image), "image"
    path = Path(image)
    return path.read_bytes(), path.name


def _never_sent(exc: requests.RequestException) -> bool:
    """True when the connection was never established, so the server cannot have seen the request.
    A reset or timeout after connecting could have happened after the server acted on it."""
    if isinstance(exc, requests.exceptions.ConnectTimeout):
        return True
    if not isinstance(exc, requests.exceptions.ConnectionError):
        return False
    seen: set[int] = set()
    todo: list[Any] = [exc]
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, (NewConnectionError, ConnectTimeoutError, ConnectionRefusedError)):
            return True
        todo.extend([getattr(e, "reason", None), e.__cause__, e.__context__])
        todo.extend(a for a in getattr(e, "args", ()) if isinstance(a, BaseException))
    return False


# --- the client ------------------------------------------------------------------------------------
class Client:
    """A pinfer API client; thread-safe (share one across upload threads).

    ``retries`` bounds the retries of one call (0 = try once); ``timeout`` is the read timeout of
    a call (a long-poll adds its ``wait``). ``sleep`` exists so tests can record waits.
    ``stop`` (a :class:`StopToken`) makes every call stoppable: once it is set, a call raises
    :class:`Stopped` instead of sending another request, and its waits end at once.
    """

    def __init__(self, base_url: str, timeout: float = 30.0, retries: int = 5,
                 session: requests.Session | None = None, *, backoff: float = 0.5,
                 backoff_max: float = 30.0, max_retry_after: float = 120.0, long_poll: float = 25.0,
                 pool_size: int = 16, sleep: Callable[[float], Any] = time.sleep,
                 api_key: str | None = None, stop: StopToken | None = None) -> None:
        if "://" not in base_url:
            base_url = "http://" + base_url
        self.base_url = base_url.rstrip("/")
        # From the environment by default, so `pinfer ingest` never needs the key on its command line
        # (where `ps` and shell history would show it).
        self._api_key = api_key if api_key is not None else os.environ.get(API_KEY_ENV) or None
        self.timeout = float(timeout)
        self.retries = max(0, int(retries))
        self.backoff = backoff
        self.backoff_max = backoff_max
        self.max_retry_after = max_retry_after
        self.long_poll = long_poll
        self._sleep = sleep
        self._stop = stop
        self._own_session = session is None
        if session is None:
            session = requests.Session()
            adapter = HTTPAdapter(pool_connections=4, pool_maxsize=max(1, pool_size))
            session.mount("http://", adapter)
            session.mount("https://", adapter)
            session.headers["User-Agent"] = USER_AGENT
        self.session = session

    # -- lifecycle --
    def close(self) -> None:
        """Close the pooled connections (only when this client created the session)."""
        if self._own_session:
            self.session.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Client({self.base_url!r})"

    # -- plumbing --
    def backoff_delay(self, attempt: int) -> float:
        """Exponential backoff with jitter (half to full of base x 2^attempt), so clients that
        failed together do not come back together."""
        return min(self.backoff_max, self.backoff * (2 ** attempt)) * random.uniform(0.5, 1.0)

    def _pause(self, seconds: float) -> None:
        """Every wait between tries: on the stop token when there is one (raises Stopped)."""
        if self._stop is not None:
            self._stop.sleep(seconds)
        else:
            self._sleep(seconds)

    def _request(self, method: str, path: str, *, idempotent: bool, retry_429: bool = True,
                 ok: tuple[int, ...] = (), read_timeout: float | None = None,
                 **kwargs: Any) -> requests.Response:
        """Send one call with the retry policy; returns a 2xx answer (or one whose status is in
        ``ok``), raises ApiError / ApiUnreachable otherwise."""
        url = self.base_url + path
        timeout = (min(10.0, self.timeout), read_timeout or self.timeout)
        if self._api_key:
            kwargs["headers"] = {"Authorization": f"Bearer {self._api_key}", **(kwargs.get("headers") or {})}
        if method == "POST":
            # One key for every try of this call: the server answers a retry with the first answer,
            # so a POST whose answer was lost (timeout, reset by a proxy) is safe to send again.
            kwargs["headers"] = {IDEMPOTENCY_HEADER: uuid.uuid4().hex, **(kwargs.get("headers") or {})}
            idempotent = True
        attempt = 0
        while True:
            if self._stop is not None:
                self._stop.check()
            try:
                resp = self.session.request(method, url, timeout=timeout, **kwargs)
            except (requests.ConnectionError, requests.Timeout,
                    requests.exceptions.ChunkedEncodingError) as exc:
                if attempt >= self.retries or not (idempotent or _never_sent(exc)):
                    raise ApiUnreachable(f"{method} {url}: {exc}") from exc
                delay = self.backoff_delay(attempt)
            else:
                if resp.status_code < 400 or resp.status_code in ok:
                    return resp
                err = ApiError.from_response(resp)
                status = resp.status_code
                retryable = ((status == 429 and retry_429) or status == 503 or (idempotent and status >= 500)
                             or (status == 409 and err.code == "idempotency_in_progress"))
                if not retryable or attempt >= self.retries:
                    raise err
                if err.retry_after is not None:
                    # honour the server's hint, plus a little jitter to spread the herd
                    delay = min(self.max_retry_after, err.retry_after) * random.uniform(1.0, 1.1)
                else:
                    delay = self.backoff_delay(attempt)
            attempt += 1
            self._pause(delay)

    @staticmethod
    def _json(resp: requests.Response) -> dict:
        try:
            body = resp.json()
        except ValueError as exc:
            raise ApiError(resp.status_code, "bad_response",
                           f"expected JSON, got {resp.text[:200]!r}") from exc
        if not isinstance(body, dict):
            raise ApiError(resp.status_code, "bad_response", f"expected a JSON object, got {body!r}")
        return body

    @staticmethod
    def _id(value: str) -> str:
        return quote(str(value), safe="")

    # -- single predictions --
    def submit(self, image: ImageInput, top_k: int | None = None, wait: float | None = None) -> dict:
        """Queue one image; returns the 202 record (``id``, ``status: queued``, ...).

        With ``wait`` (seconds) the server holds the call until the result is stored or ``wait``
        passes: the finished record if it made it (check ``status``), else the 202 record. The bytes
        go as the raw request body (``top_k`` and ``wait`` as query parameters): the server then has
        no multipart form to parse."""
        data, _ = _read_image(image)
        params = {}
        if top_k is not None:
            params["top_k"] = str(top_k)
        if wait:
            params["wait"] = f"{wait:g}"
        resp = self._request("POST", "/v1/predictions", idempotent=True, params=params or None, data=data,
                             headers={"Content-Type": "application/octet-stream"},
                             read_timeout=self.timeout + (wait or 0.0))
        return self._json(resp)

    def get(self, pid: str, wait: float | None = None) -> dict:
        """The prediction record; with ``wait`` the server holds the call until it finishes or
        ``wait`` seconds pass (long-poll)."""
        params = {"wait": f"{wait:g}"} if wait else None
        read_timeout = self.timeout + (wait or 0.0)
        resp = self._request("GET", f"/v1/predictions/{self._id(pid)}", idempotent=True,
                             params=params, read_timeout=read_timeout)
        return self._json(resp)

    def wait(self, pid: str, timeout: float = 60.0, *, poll_interval: float = 0.5) -> dict:
        """Long-poll until the prediction is succeeded/failed/canceled; raises WaitTimeout.

        ``poll_interval`` is the least time between two calls, for a server that answers a
        long-poll at once (it caps concurrent waiters)."""
        deadline = time.monotonic() + timeout
        while True:
            started = time.monotonic()
            chunk = max(0.0, min(self.long_poll, deadline - started))
            try:
                record = self.get(pid, wait=chunk if chunk >= 0.01 else None)
            except ApiError as exc:
                # a server configured with a smaller PINFER_MAX_WAIT_S refuses our wait: ask for less
                if exc.status == 400 and exc.code == "invalid_parameter" and self.long_poll > 1.0:
                    self.long_poll = max(1.0, self.long_poll / 2)
                    continue
                raise
            if record.get("status") in TERMINAL_STATUSES:
                return record
            now = time.monotonic()
            if now >= deadline:
                raise WaitTimeout(pid, record)
            if now - started < poll_interval:
                self._pause(min(poll_interval - (now - started), deadline - now))

    def classify(self, image: ImageInput, top_k: int | None = None, timeout: float = 60.0) -> dict:
        """Submit and wait: the finished record (check ``status``; a failed one carries ``error``).

        One request when the result comes within the submit's own wait (``POST ?wait=``); else, or
        from a server that answers the submit at once, it long-polls the ID as before."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                rec = self.submit(image, top_k=top_k, wait=min(self.long_poll, timeout))
                break
            except ApiError as exc:
                # a server with a smaller PINFER_MAX_WAIT_S refuses our wait (nothing was stored): ask for less
                if exc.status == 400 and exc.code == "invalid_parameter" and "`wait`" in exc.message \
                        and self.long_poll > 1.0:
                    self.long_poll = max(1.0, self.long_poll / 2)
                    continue
                raise
        if rec.get("status") in TERMINAL_STATUSES:
            return rec
        return self.wait(rec["id"], timeout=max(0.0, deadline - time.monotonic()))

    # -- bulk jobs --
    def create_job(self, name: str | None = None, top_k: int | None = None) -> dict:
        """Create an open job; returns the job record."""
        body = {k: v for k, v in (("name", name), ("top_k", top_k)) if v is not None}
        return self._json(self._request("POST", "/v1/jobs", idempotent=True, json=body))

    def add_images(self, job_id: str, items: Sequence[tuple[str, bytes]], *,
                   overload_retries: int | None = None) -> AddResult:
        """Upload ``(name, bytes)`` pairs to a job (multipart field ``images``, filename = name).

        On a 429 the server says which images got in; only the others are sent again, after
        ``Retry-After``, up to ``overload_retries`` times (default: ``retries``). Images still
        not in are returned in ``pending`` with ``overloaded=True`` rather than raised, so the
        caller knows exactly which to send later. Connection errors and 5xx are retried as a
        whole: names already in come back as duplicates."""
        bad = [name for name, _ in items if wire_name(name) != name]
        if bad:
            raise ValueError(f"names {bad[:3]!r} would not reach the server unchanged; send wire_name(name)")
        limit = self.retries if overload_retries is None else max(0, overload_retries)
        result = AddResult()
        pending = list(items)
        waits = 0
        path = f"/v1/jobs/{self._id(job_id)}/images"
        while pending:
            files = [("images", (name, data, "application/octet-stream")) for name, data in pending]
            resp = self._request("POST", path, idempotent=True, retry_429=False, ok=(429,), files=files)
            body = self._json(resp) if resp.content else {}
            for key in ("accepted", "duplicates", "rejected"):
                getattr(result, key).extend(body.get(key) or [])
            got_in = {d.get("name") for key in ("accepted", "duplicates", "rejected")
                      for d in body.get(key) or []}
            pending = [(n, d) for n, d in pending if n not in got_in]
            if resp.status_code != 429:
                break  # a 202 lists everything; anything missing is reported in ``pending``
            result.retry_after = parse_retry_after(resp.headers.get("Retry-After"))
            if not pending:
                break
            if waits >= limit:
                result.overloaded = True
                break
            delay = result.retry_after if result.retry_after is not None else self.backoff_delay(waits)
            self._pause(min(self.max_retry_after, delay) * random.uniform(1.0, 1.1))
            waits += 1
        result.pending = [n for n, _ in pending]
        return result

    def close_job(self, job_id: str) -> dict:
        """Say no more images will come (the job can then become ``finished``)."""
        return self._json(self._request("POST", f"/v1/jobs/{self._id(job_id)}/close", idempotent=True))

    def get_job(self, job_id: str) -> dict:
        """The job record with its counts, rate and ETA."""
        return self._json(self._request("GET", f"/v1/jobs/{self._id(job_id)}", idempotent=True))

    def cancel_job(self, job_id: str) -> dict:
        """Cancel what is still queued; finished images keep their result."""
        return self._json(self._request("DELETE", f"/v1/jobs/{self._id(job_id)}", idempotent=True))

    def results(self, job_id: str, cursor: int = 0, limit: int = 1000) -> tuple[list[dict], int, str]:
        """One page of finished results: ``(results, next_cursor, job_status)``."""
        resp = self._request("GET", f"/v1/jobs/{self._id(job_id)}/results", idempotent=True,
                             params={"cursor": cursor, "limit": limit})
        rows: list[dict] = []
        for line in resp.text.splitlines():
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except ValueError as exc:
                    raise ApiError(resp.status_code, "bad_response", f"bad results line {line[:200]!r}") from exc
        try:
            next_cursor = int(resp.headers["X-Next-Cursor"])
        except (KeyError, ValueError):
            next_cursor = cursor + len(rows)
        return rows, next_cursor, resp.headers.get("X-Job-Status", "")

    def iter_pages(self, job_id: str, cursor: int = 0, *, limit: int = 1000, poll_interval: float = 1.0,
                   stop: Any = None) -> Iterator[ResultsPage]:
        """Follow the cursor page by page (empty pages too) until the job is finished or canceled
        and every result has been read. ``stop`` (a threading.Event) ends it early."""
        while True:
            rows, next_cursor, status = self.results(job_id, cursor, limit)
            done = status in JOB_DONE_STATUSES and len(rows) < limit
            yield ResultsPage(rows, next_cursor, status, done)
            if done:
                return
            cursor = next_cursor
            if len(rows) < limit:
                if stop is not None:
                    if stop.wait(poll_interval):
                        return
                else:
                    self._pause(poll_interval)

    def iter_results(self, job_id: str, cursor: int = 0, *, limit: int = 1000, poll_interval: float = 1.0,
                     stop: Any = None) -> Iterator[dict]:
        """Every result line from ``cursor`` on, as they finish, until the job is done."""
        for page in self.iter_pages(job_id, cursor, limit=limit, poll_interval=poll_interval, stop=stop):
            yield from page.results

    # -- health --
    def healthz(self) -> dict:
        """``{"status": "ok"}`` while the API process is alive."""
        return self._json(self._request("GET", "/healthz", idempotent=True))

    def readyz(self) -> tuple[bool, dict]:
        """``(ready, body)``: a 503 is an answer here (not ready yet), not an error."""
        resp = self._request("GET", "/readyz", idempotent=True, ok=(503,), retry_429=True)
        try:
            body = resp.json()
        except ValueError:
            body = {}
        return resp.status_code == 200, body if isinstance(body, dict) else {}
