"""``Idempotency-Key`` on the POSTs that create something (``/v1/predictions``, ``/v1/jobs``).

A client that lost the answer to a POST (timeout, connection reset by a proxy) sends it again with
the same key and gets the same answer: the same ID and status code, nothing created twice. The key
is scoped to the caller's API key and kept for PINFER_RESULT_TTL_S, as long as what it created.

* same key, same request (method, route, parameters, sha256 of the body) -> the stored answer again,
  with ``Idempotent-Replayed: true``;
* same key, another request -> 422 ``idempotency_mismatch``;
* same key while the first is still being handled -> 409 ``idempotency_in_progress`` + Retry-After.

Only successful answers are kept: after an error (429, 415 …) the key is released so that a retry
runs the request again. But once something was created, the key stays: the script that creates the
prediction or job records its ID and status under the key in the same atomic step
(``Store.submit(claim=…)``, ``Store.create_job(claim=…)``), so a retry after the API process died
(or after a 503 from PINFER_REDIS_WAIT_REPLICAS) gets that ID, answered afresh from the record, and
never creates a second one. Written by hand: the claim/replay needs the store's atomic scripts and
the API's error mapping; no Flask extension does that against Redis.
"""
from __future__ import annotations

import hashlib
import logging
from typing import Callable

from flask import Response, g, request

from api.extensions import pinfer
from shared import keys
from shared.errors import IdempotencyInProgress, IdempotencyMismatch, InvalidParameter
from shared.schema import IDEM_CREATED, IDEM_DONE
from shared.store import IdempotencyClaim, IdempotencyKeySeen

HEADER = "Idempotency-Key"
MAX_KEY = 255
log = logging.getLogger("pinfer.api")


def fingerprint(*parts: bytes | str) -> str:
    h = hashlib.sha256()
    for p in parts:
        b = p.encode() if isinstance(p, str) else p
        h.update(len(b).to_bytes(8, "big") + b)
    return h.hexdigest()


def claim(http_status: int) -> IdempotencyClaim | None:
    """This request's Idempotency-Key claim, for the store call that creates what it answers with
    ``http_status`` (None without a key)."""
    c = g.get("idempotency_claim")
    return None if c is None else IdempotencyClaim(c.key, c.fingerprint, http_status)


def idempotent(route: str, request_fingerprint: str, run: Callable[[], Response],
               replay: Callable[[str, int], Response], atomic: bool = False) -> Response:
    """Answer with ``run()``, or with the stored answer when the request carries a key seen before:
    verbatim once stored, or ``replay(id, status)`` when only the created ID was recorded (the first
    request's process died, or failed, after creating it).

    ``atomic``: the store script that creates the thing claims the key itself, in the same step
    (``Store.submit`` raises ``IdempotencyKeySeen`` instead of creating when the key is known), and
    ``replay`` rebuilds the same answer from the record (a prediction's 202 or cached 200). No claim
    is taken before ``run()`` and no answer is stored after it: two Redis round trips less per POST,
    and two concurrent requests with one key get one prediction and the same answer, never a 409.
    """
    key = request.headers.get(HEADER)
    if key is None:
        return run()
    if not 1 <= len(key) <= MAX_KEY or not key.isascii() or not key.isprintable():
        raise InvalidParameter(f"`{HEADER}` must be 1 to {MAX_KEY} printable ASCII characters")
    store = pinfer().store
    scope = g.get("api_key_name") or "-"
    rkey = keys.idempotency(scope, route, hashlib.sha256(key.encode()).hexdigest())
    if atomic:
        g.idempotency_claim = IdempotencyClaim(rkey, request_fingerprint)
        try:
            return run()
        except IdempotencyKeySeen as seen:
            return _answer_seen(seen.record, request_fingerprint, replay)
    seen = store.idempotency_begin(rkey, request_fingerprint)
    if seen is not None:
        return _answer_seen(seen, request_fingerprint, replay)
    g.idempotency_claim = IdempotencyClaim(rkey, request_fingerprint)
    try:
        resp = run()
    except BaseException:
        _release(rkey)
        raise
    if resp.status_code < 400:
        store.idempotency_finish(rkey, resp.status_code, resp.get_data(as_text=True),
                                 resp.headers.get("Location", ""))
    else:
        _release(rkey)
    return resp


def _answer_seen(seen: dict, request_fingerprint: str, replay: Callable[[str, int], Response]) -> Response:
    """The answer to a request whose key is already known: refused when the request differs, the
    first answer again when it is known, 409 while the first request is still being handled."""
    if seen["fingerprint"] != request_fingerprint:
        raise IdempotencyMismatch(f"this {HEADER} was already used for a different request; "
                                  "use a new key for a new request")
    if seen["state"] == IDEM_CREATED:
        resp = replay(seen["id"], int(seen["status"]))
        resp.headers["Idempotent-Replayed"] = "true"
        return resp
    if seen["state"] != IDEM_DONE:
        raise IdempotencyInProgress(f"the first request with this {HEADER} is still being handled; "
                                    "retry to get its answer", retry_after_s=1)
    resp = Response(seen["body"], status=int(seen["status"]), mimetype="application/json")
    if seen["location"]:
        resp.headers["Location"] = seen["location"]
    resp.headers["Idempotent-Replayed"] = "true"
    return resp


def _release(rkey: str) -> None:
    try:
        pinfer().store.idempotency_abort(rkey)
    except Exception as exc:  # Redis away: the claim expires after keys.IDEMPOTENCY_PENDING_S by itself
        log.warning("could not release an idempotency key: %s", exc)
