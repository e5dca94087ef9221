"""The one place where errors become HTTP: ``{"error": {"code": ..., "message": ...}}``."""
from __future__ import annotations

import logging

import redis
from flask import Flask, jsonify
from werkzeug.exceptions import HTTPException, RequestEntityTooLarge

from api.metrics import REJECTED
from shared.errors import Overloaded, PinferError, ServiceUnavailable

log = logging.getLogger("pinfer.api")


def error_response(err: PinferError, extra: dict | None = None):
    body = {"error": err.to_dict(), **(extra or {})}
    resp = jsonify(body)
    resp.status_code = err.status or 500  # a ResultError has no HTTP status of its own
    if err.status == 401:
        resp.headers["WWW-Authenticate"] = 'Bearer realm="pinfer"'
    retry_after = getattr(err, "retry_after_s", None)  # 429, 503, 409 in progress: say when to retry
    if retry_after is not None:
        resp.headers["Retry-After"] = str(retry_after)
    if isinstance(err, Overloaded):
        REJECTED.labels(str(err.details.get("scope") or "global")).inc()
    return resp


def init_app(app: Flask) -> None:
    @app.errorhandler(PinferError)
    def _pinfer(err: PinferError):
        return error_response(err)

    @app.errorhandler(RequestEntityTooLarge)
    def _too_large(err: RequestEntityTooLarge):
        limit = app.config["SETTINGS"].max_request_bytes
        resp = jsonify({"error": {"code": "request_too_large",
                                  "message": f"the request body exceeds {limit} bytes"}})
        resp.status_code = 413
        return resp

    @app.errorhandler(HTTPException)
    def _http(err: HTTPException):
        code = (err.name or "error").lower().replace(" ", "_")
        resp = jsonify({"error": {"code": code, "message": err.description}})
        resp.status_code = err.code or 500
        return resp

    @app.errorhandler(redis.RedisError)
    def _redis(err: redis.RedisError):
        log.error("redis error: %s", err)
        return error_response(ServiceUnavailable(f"the store is unavailable ({type(err).__name__}); "
                                                 "nothing was accepted, retry later",
                                                 retry_after_s=app.config["SETTINGS"].retry_after_s))

    @app.errorhandler(Exception)
    def _unexpected(err: Exception):
        log.exception("unhandled error")
        return error_response(PinferError("internal error; it has been logged"))
