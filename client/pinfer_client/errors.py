"""What the client raises: one base class (:class:`ClientError`) and the API's error answer parsed
into a stable machine ``code`` (docs/http-api.md, shared/errors.py on the server)."""
from __future__ import annotations

import time
from email.utils import parsedate_to_datetime
from typing import Any

import requests

# --- errors ----------------------------------------------------------------------------------------
class ClientError(Exception):
    """Base of everything this client raises, so callers can catch one type."""


class ApiError(ClientError):
    """Raised when the API answered with an error status; ``code`` is the stable machine code
    from ``{"error": {"code", "message"}}`` (see shared/errors.py) that callers branch on."""

    def __init__(self, status: int, code: str, message: str, *, body: Any = None,
                 retry_after: float | None = None) -> None:
        super().__init__(f"{status} {code}: {message}")
        self.status = status
        self.code = code
        self.message = message
        self.body = body
        self.retry_after = retry_after

    @classmethod
    def from_response(cls, resp: requests.Response) -> "ApiError":
        """Parse an error answer; a non-JSON body (a proxy's HTML page) still gives a usable code."""
        body: Any = None
        try:
            body = resp.json()
        except ValueError:
            body = None
        code, message = f"http_{resp.status_code}", (resp.reason or "").strip() or "HTTP error"
        if isinstance(body, dict) and isinstance(body.get("error"), dict):
            code = str(body["error"].get("code") or code)
            message = str(body["error"].get("message") or message)
        elif body is None and resp.text:
            message = f"{message}: {resp.text.strip()[:200]}"
        kind = Overloaded if resp.status_code == 429 or code == "overloaded" else cls
        return kind(resp.status_code, code, message, body=body,
                    retry_after=parse_retry_after(resp.headers.get("Retry-After")))


class Overloaded(ApiError):
    """Raised when the server still answered 429 after the retries; ``retry_after`` says when to
    come back. Uploads do not raise it: :meth:`Client.add_images` reports what got in instead."""


class ApiUnreachable(ClientError):
    """Raised when no answer came back (refused, reset, timed out) after the allowed retries."""


class WaitTimeout(ClientError, TimeoutError):
    """Raised by :meth:`Client.wait` when the prediction is still not finished at the deadline;
    ``last`` is the last record seen, so the caller can keep the ID and wait again later."""

    def __init__(self, pid: str, last: dict) -> None:
        super().__init__(f"prediction {pid} still {last.get('status')!r} at the deadline")
        self.pid = pid
        self.last = last


def parse_retry_after(value: str | None) -> float | None:
    """Seconds from a ``Retry-After`` header (delta-seconds or an HTTP date), None if absent/bad."""
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        return max(0.0, parsedate_to_datetime(value).timestamp() - time.time())
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
