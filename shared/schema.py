"""The records that cross processes (API <-> Redis <-> worker), and their public JSON shape.

A prediction is a Redis hash of flat string fields (cheap to update one field atomically in Lua);
``result`` is one JSON string written once by the worker. ``Prediction.public()`` is the single
place that decides what a client sees.
"""
from __future__ import annotations

import enum
import json
import secrets
from dataclasses import dataclass, field
from typing import Any

QUEUED, RUNNING, SUCCEEDED, FAILED, CANCELED = "queued", "running", "succeeded", "failed", "canceled"
TERMINAL = (SUCCEEDED, FAILED, CANCELED)
STATUSES = (QUEUED, RUNNING, SUCCEEDED, FAILED, CANCELED)
INTERACTIVE, BULK = "interactive", "bulk"

JOB_OPEN, JOB_CLOSED, JOB_FINISHED, JOB_CANCELED = "open", "closed", "finished", "canceled"

#: A webhook's ``webhook_status``: waiting for its event, queued for (another) attempt, or done.
WEBHOOK_WAITING, WEBHOOK_PENDING, WEBHOOK_DELIVERED, WEBHOOK_FAILED = "waiting", "pending", "delivered", "failed"
#: An Idempotency-Key record's ``state``: claimed by a request still running; the thing it created is
#: recorded (ID + HTTP status, by the creating script); the full answer is stored (replayed verbatim).
IDEM_PENDING, IDEM_CREATED, IDEM_DONE = "pending", "created", "done"


class WorkerState(enum.StrEnum):
    """A worker process's state, as its heartbeat reports it (a StrEnum: stored and compared as text)."""

    STARTING = "STARTING"          # loading, verifying and warming the model
    READY = "READY"                # waiting for work
    BUSY = "BUSY"                  # classifying a batch
    RELOADING = "RELOADING"        # between batches: loading a new model (a roll-out); serves the old one after a failure
    SETUP_FAILED = "SETUP_FAILED"  # the model could not be loaded; the heartbeat's ``error`` says why


#: States of a worker that has a model loaded and takes work: what /readyz, the launcher and the
#: result cache count as serving. A reloading worker still holds its old model and takes work again
#: in seconds, so a roll-out never makes /readyz (or a container's health check) fail.
SERVING = (WorkerState.READY, WorkerState.BUSY, WorkerState.RELOADING)


def new_id() -> str:
    """128 random bits, URL-safe base64 without padding (22 characters)."""
    return secrets.token_urlsafe(16)


def field_text(v: object) -> str:
    """How a value is written to a record's hash field: floats exactly (repr), dicts and lists as
    compact JSON, the rest as ``str``."""
    if isinstance(v, float):
        return repr(v)
    if isinstance(v, (dict, list)):
        return json.dumps(v, separators=(",", ":"))
    return str(v)


def _f(raw: dict, name: str) -> float | None:
    v = raw.get(name)
    return float(v) if v not in (None, "") else None


@dataclass
class Prediction:
    id: str
    status: str
    created_at: float
    top_k: int
    lane: str = INTERACTIVE
    started_at: float | None = None
    finished_at: float | None = None
    attempts: int = 0  # deliveries claimed by a worker
    runs: int = 0  # times the image was in flight (decode + forward pass started)
    alone_runs: int = 0  # ... of which in a forward pass of its own
    job_id: str | None = None
    name: str | None = None
    result: dict | None = None
    error: dict | None = None
    enqueued_at: float | None = None  # last time its ID was published (the sweeper republishes)
    webhook: dict | None = None  # {"url", "status", "attempts"}: filled by Store.get when one is registered
    request_id: str | None = None  # X-Request-ID of the upload, for the worker's log lines
    content_sha: str | None = None  # sha256 of the uploaded bytes (result cache), when the cache is on
    owner: str | None = None  # name of the API key that created it (None without API keys)

    @classmethod
    def from_redis(cls, pid: str, raw: dict[str, str]) -> "Prediction":
        err = None
        if raw.get("error_code"):
            err = {"code": raw["error_code"], "message": raw.get("error_message", "")}
        return cls(
            id=pid,
            status=raw["status"],
            created_at=float(raw["created_at"]),
            top_k=int(raw.get("top_k", 5)),
            lane=raw.get("lane", INTERACTIVE),
            started_at=_f(raw, "started_at"),
            finished_at=_f(raw, "finished_at"),
            attempts=int(raw.get("attempts", 0) or 0),
            runs=int(raw.get("runs", 0) or 0),
            alone_runs=int(raw.get("alone_runs", 0) or 0),
            job_id=raw.get("job_id") or None,
            name=raw.get("name") or None,
            result=json.loads(raw["result"]) if raw.get("result") else None,
            error=err,
            enqueued_at=_f(raw, "enqueued_at") or float(raw["created_at"]),
            request_id=raw.get("request_id") or None,
            content_sha=raw.get("sha") or None,
            owner=raw.get("owner") or None,
        )

    def public(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "id": self.id, "status": self.status, "created_at": self.created_at,
            "started_at": self.started_at, "finished_at": self.finished_at,
            "attempts": self.attempts, "job_id": self.job_id, "name": self.name,
        }
        if self.result:
            out.update(self.result)  # top_k, model, timings
        if self.error:
            out["error"] = self.error
        if self.webhook:
            out["webhook"] = self.webhook
        return out

    def result_line(self) -> dict[str, Any]:
        """The compact line of a job's results listing."""
        out: dict[str, Any] = {"id": self.id, "name": self.name, "status": self.status}
        if self.result:
            out["top_k"] = self.result.get("top_k")
        if self.error:
            out["error"] = self.error
        return out


@dataclass
class Job:
    id: str
    status: str
    created_at: float
    top_k: int
    name: str | None = None
    closed_at: float | None = None
    finished_at: float | None = None
    counts: dict[str, int] = field(default_factory=dict)
    webhook: dict | None = None  # {"url", "status", "attempts"}: filled by Store.get_job when one is registered
    owner: str | None = None  # name of the API key that created it (None without API keys)

    @classmethod
    def from_redis(cls, jid: str, raw: dict[str, str]) -> "Job":
        counts = {s: int(raw.get(s, 0) or 0) for s in STATUSES}
        counts["total"] = int(raw.get("total", 0) or 0)
        return cls(id=jid, status=raw["status"], created_at=float(raw["created_at"]),
                   top_k=int(raw.get("top_k", 5)), name=raw.get("name") or None,
                   closed_at=_f(raw, "closed_at"), finished_at=_f(raw, "finished_at"), counts=counts,
                   owner=raw.get("owner") or None)

    def public(self, rate_per_s: float | None = None) -> dict[str, Any]:
        remaining = self.counts.get(QUEUED, 0) + self.counts.get(RUNNING, 0)
        eta = round(remaining / rate_per_s, 1) if rate_per_s else None
        order = ("total",) + STATUSES
        return {
            "id": self.id, "name": self.name, "status": self.status, "top_k": self.top_k,
            "counts": {k: self.counts.get(k, 0) for k in order},
            "rate_per_s": None if rate_per_s is None else round(rate_per_s, 2),
            "eta_s": 0.0 if remaining == 0 else eta,
            "created_at": self.created_at, "closed_at": self.closed_at, "finished_at": self.finished_at,
            **({"webhook": self.webhook} if self.webhook else {}),
        }
