"""Request ids and the API's own request log lines.

The id comes from ``X-Request-ID`` (nginx sets one when the client did not; a client may send its
own), else the API makes one. It is bound to every log line of the request (``shared.logs``),
returned in the response header, and stored on each prediction the request creates, so the
worker's log lines for that image carry the same id.
"""
from __future__ import annotations

import logging
import re
import time
import uuid

from flask import Flask, g, request

from shared import logs

log = logging.getLogger("pinfer.api.request")
_VALID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")  # anything else is replaced: it ends up in logs and Redis


def current_request_id() -> str | None:
    return g.get("request_id")


def init_app(app: Flask) -> None:
    # In text mode gunicorn's access log already has one line per request (with the id).
    log_requests = app.config["SETTINGS"].log_format == "json"

    @app.before_request
    def _bind() -> None:
        rid = request.headers.get("X-Request-ID", "")
        g.request_id = rid if _VALID.match(rid) else uuid.uuid4().hex
        g.log_t0 = time.perf_counter()
        logs.set_context(request_id=g.request_id, prediction_id=None, job_id=None)

    @app.after_request
    def _log(resp):
        rid = g.get("request_id")
        if rid:
            resp.headers["X-Request-ID"] = rid
        if rid and log_requests:
            t0 = g.get("log_t0")
            log.info("request", extra={
                "method": request.method, "path": request.path, "status": resp.status_code,
                "duration_ms": round((time.perf_counter() - t0) * 1000, 2) if t0 else None})
        return resp

    @app.teardown_request
    def _unbind(_exc) -> None:
        logs.set_context(request_id=None, prediction_id=None, job_id=None)
