"""``/v1/predictions``: submit one image, then poll (or long-poll) its result, or wait for it in the
submit itself (``?wait=``)."""
from __future__ import annotations

import hashlib
import logging
import threading
import time
from contextlib import ExitStack
from typing import Callable

from flask import Blueprint, jsonify, request, url_for

from api.auth import caller, check_owner
from api.extensions import pinfer
from api.idempotency import claim, fingerprint, idempotent
from api.requestlog import current_request_id
from api.uploads import float_param, int_param, single_image
from shared import logs, webhooks
from shared.errors import NotFound
from shared.images import probe
from shared.schema import INTERACTIVE, QUEUED, TERMINAL, Prediction, new_id

bp = Blueprint("predictions", __name__, url_prefix="/v1/predictions")
log = logging.getLogger("pinfer.api")


def task_message(pid: str, lane: str) -> tuple[str, str] | None:
    """The workers' message for ``pid``, which the submit script pushes as it stores the image.

    Built before the store call, so the image, its record and its message appear in one atomic step.
    Should building it fail, the image is still stored, queued with no message: exactly what the
    workers' sweeper looks for, so the client still gets a result.
    """
    try:
        return pinfer().task_message(pid, lane)
    except Exception as exc:
        log.warning("building the task message for %s failed (%s); the sweeper will publish it", pid, exc)
        return None


@bp.post("")
def submit():
    p = pinfer()
    s = p.settings
    data = single_image(request, s)  # before any form access: a raw body is not a form
    top_k = int_param(request, "top_k", s.default_top_k, 1, s.max_top_k)
    wait = float_param(request, "wait", 0.0, 0.0, s.max_wait_s)
    hook = request.args.get("webhook")
    if hook is None and request.mimetype == "multipart/form-data":
        hook = request.form.get("webhook")
    fp = fingerprint("POST /v1/predictions", str(top_k), hook or "", hashlib.sha256(data).digest())
    with ExitStack() as held:
        waiting: list[tuple[str, threading.Event | None]] = []

        def wait_for(pid: str) -> None:
            """Register the long-poll before the ID is queued: no result can slip by unseen."""
            waiting.append((pid, held.enter_context(p.waiters.waiting(pid))))

        resp = idempotent("predictions", fp, lambda: _submit(data, top_k, hook, wait_for if wait > 0 else None), _replay,
                          atomic=True)
        # A replay (the key was known) answers at once, as the first answer was: the waiter registered
        # for this request's own ID waits for nothing, since no prediction was created under it.
        if waiting and resp.status_code == 202 and "Idempotent-Replayed" not in resp.headers:
            pid, ev = waiting[0]
            resp = _answer_when_done(pid, ev, time.monotonic() + wait, resp)
    return resp


def _answer_when_done(pid: str, ev: threading.Event | None, deadline: float, accepted):
    """``POST ?wait=S``: the finished record (200) if it is stored before ``deadline``, else the 202
    as sent without ``wait``. The idempotency record keeps the 202: a retry gets the ID back."""
    if ev is None:  # PINFER_MAX_WAITERS reached in this process: answer at once, as without wait
        accepted.headers["Retry-After"] = "1"
        return accepted
    rec = _wait_terminal(pid, ev, deadline, read_first=False)
    if rec is None or rec.status not in TERMINAL:
        return accepted
    return _finished(rec)


def _finished(rec: Prediction):
    """A record answered whole (200): a cache hit at submit, a ``?wait`` that saw the result, or the
    replay of either."""
    link = url_for("predictions.get", pid=rec.id)
    resp = jsonify({**rec.public(), "links": {"self": link}})
    resp.headers["Location"] = link
    return resp


def _wait_terminal(pid: str, ev: threading.Event, deadline: float, read_first: bool) -> Prediction | None:
    """Sleep on the done channel until ``pid`` is terminal or ``deadline`` passes; the last record
    read, or None if none was. ``read_first``: read once before sleeping (a long-poll GET registers
    after its first read, so a result stored in between is only seen by reading again)."""
    store = pinfer().store
    rec = store.get(pid) if read_first else None
    while rec is None or rec.status not in TERMINAL:
        left = deadline - time.monotonic()
        if left <= 0:
            break
        ev.wait(min(left, 5.0))  # woken by the done channel; the 5 s re-read is a safety net
        ev.clear()
        rec = store.get(pid) or rec
    return rec


def _submit(data: bytes, top_k: int, hook: str | None, wait_for: Callable[[str], None] | None = None):
    p = pinfer()
    probe(data, p.settings)  # 415/413/422 from the header, without a full decode
    hook = webhooks.register(hook, p.settings)  # 400 invalid_webhook: malformed, private, or webhooks disabled
    pid = new_id()
    logs.set_context(prediction_id=pid)
    content_sha, hit = p.cache.lookup(data, top_k)
    if hit is not None:  # identical upload, same model: answered now, under its own ID, no inference
        p.store.submit(pid, data, top_k, INTERACTIVE, result=hit, content_sha=content_sha, owner=caller(),
                       webhook=hook, request_id=current_request_id(), claim=claim(200))
        log.info("accepted", extra={"lane": INTERACTIVE, "bytes": len(data), "cached": True})
        return _finished(p.store.get(pid))
    if wait_for is not None:  # before the script queues it: a worker may finish it at once
        wait_for(pid)
    sub = p.store.submit(pid, data, top_k, INTERACTIVE, content_sha=content_sha, owner=caller(), webhook=hook,
                         request_id=current_request_id(), claim=claim(202), message=task_message(pid, INTERACTIVE))
    log.info("accepted", extra={"lane": INTERACTIVE, "bytes": len(data)})
    return _accepted(pid, top_k, sub.created_at, url_for("predictions.get", pid=pid))


def _accepted(pid: str, top_k: int, created_at: float, link: str):
    resp = jsonify({"id": pid, "status": QUEUED, "top_k": top_k, "created_at": created_at, "links": {"self": link}})
    resp.status_code = 202
    resp.headers["Location"] = link
    return resp


def _replay(pid: str, status: int):
    """The answer to a retried POST whose first request created ``pid`` but did not store its answer
    (its process died): the same 202 (queued) or 200 (a cache hit), rebuilt from the record."""
    rec = pinfer().store.get(pid)
    if rec is None:
        raise NotFound(f"the prediction {pid} this Idempotency-Key created has expired")
    if status == 202:
        return _accepted(pid, rec.top_k, rec.created_at, url_for("predictions.get", pid=pid))
    return _finished(rec)


@bp.get("/<pid>")
def get(pid: str):
    p = pinfer()
    wait = float_param(request, "wait", 0.0, 0.0, p.settings.max_wait_s)
    rec = p.store.get(pid)
    if rec is None:
        raise NotFound(f"no prediction {pid} (unknown, or expired after PINFER_RESULT_TTL_S)")
    check_owner(rec.owner, f"prediction {pid}")
    capped = False
    if wait > 0 and rec.status not in TERMINAL:
        deadline = time.monotonic() + wait
        with p.waiters.waiting(pid) as ev:
            capped = ev is None
            if ev is not None:
                rec = _wait_terminal(pid, ev, deadline, read_first=True) or rec
    resp = jsonify(rec.public())
    if capped:  # too many long-polls in this process: answered at once, ask the client to pace itself
        resp.headers["Retry-After"] = "1"
    return resp

