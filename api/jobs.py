"""``/v1/jobs``: bulk ingestion. Images are stored and queued exactly like single predictions,
on the bulk lane, and a job adds counts, names, a results cursor, backpressure and cancel."""
from __future__ import annotations

import json
import logging

from flask import Blueprint, Response, jsonify, request, url_for

from api.errors import error_response
from api.auth import caller, check_owner
from api.extensions import pinfer
from api.idempotency import claim, fingerprint, idempotent
from api.predictions import task_message
from api.requestlog import current_request_id
from api.uploads import int_param, read_capped
from shared import logs, webhooks
from shared.errors import BadRequest, ImageError, InvalidParameter, InvalidWebhook, MissingImage, Overloaded
from shared.images import probe
from shared.schema import BULK, Job, new_id

bp = Blueprint("jobs", __name__, url_prefix="/v1/jobs")
MAX_NAME = 1024
log = logging.getLogger("pinfer.api.jobs")


def _job_json(job: Job) -> dict:
    return job.public(pinfer().store.job_rate(job))


def _my_job(jid: str) -> Job:
    """The job, or 404 when it is unknown or belongs to another API key."""
    job = pinfer().store.get_job(jid)
    check_owner(job.owner, f"job {jid}")
    return job


@bp.post("")
def create():
    fp = fingerprint("POST /v1/jobs", request.query_string, request.get_data(cache=True))
    return idempotent("jobs", fp, _create, lambda jid, status: _created(pinfer().store.get_job(jid)))


def _create():
    s = pinfer().settings
    body = request.get_json(silent=True) or {}
    if not isinstance(body, dict):
        raise InvalidParameter("the body must be a JSON object like {\"name\": ..., \"top_k\": 5}")
    top_k = body.get("top_k", request.args.get("top_k", s.default_top_k))
    if isinstance(top_k, str) and top_k.strip().isdigit():
        top_k = int(top_k)
    if not isinstance(top_k, int) or isinstance(top_k, bool):
        raise InvalidParameter(f"`top_k` must be an integer from 1 to {s.max_top_k}")
    if not 1 <= top_k <= s.max_top_k:
        raise InvalidParameter(f"`top_k` must be from 1 to {s.max_top_k}, not {top_k}")
    name = body.get("name")
    if name is not None and (not isinstance(name, str) or len(name) > MAX_NAME):
        raise InvalidParameter("`name` must be a string of at most 1024 characters")
    hook = body.get("webhook")
    if hook is not None and not isinstance(hook, str):
        raise InvalidWebhook("`webhook` must be a URL string")
    hook = webhooks.register(hook, s)
    return _created(pinfer().store.create_job(new_id(), name, top_k, webhook=hook, owner=caller(), claim=claim(201)))


def _created(job: Job):
    """201 with the job; also the answer to a retried POST whose first request created it (``idempotent``)."""
    resp = jsonify(_job_json(job))
    resp.status_code = 201
    resp.headers["Location"] = url_for("jobs.get", jid=job.id)
    return resp


@bp.post("/<jid>/images")
def add_images(jid: str):
    """Store and queue each file of the ``images`` field; stop at a backpressure bound with 429."""
    p = pinfer()
    s = p.settings
    job = _my_job(jid)
    files = request.files.getlist("images")
    if not files:
        raise MissingImage("send the images as files in the multipart field `images`")
    names = [f.filename or "" for f in files]
    if any(not n or len(n) > MAX_NAME for n in names) or len(set(names)) != len(names):
        raise BadRequest("every file needs a filename (the client's name for it, at most 1024 "
                         "characters), unique within the request")
    logs.set_context(job_id=jid)
    accepted, duplicates, rejected = [], [], []
    for f, name in zip(files, names):
        error, content_sha, hit = None, None, None
        try:
            data = read_capped(f.stream, s)
            probe(data, s)
            content_sha, hit = p.cache.lookup(data, job.top_k)
        except ImageError as exc:
            data, error = b"", exc.to_dict()
        pid = new_id()
        try:
            sub = p.store.submit(pid, data, job.top_k, BULK, jid, name, error=error, result=hit,
                                 content_sha=content_sha, owner=caller(), request_id=current_request_id(),
                                 message=None if error or hit is not None else task_message(pid, BULK))
        except Overloaded as exc:
            return error_response(exc, {"accepted": accepted, "duplicates": duplicates, "rejected": rejected})
        entry = {"name": name, "id": sub.id}
        if sub.outcome == "duplicate":
            duplicates.append(entry)
        elif error:
            rejected.append({**entry, "error": error})
        elif hit is not None:  # answered from the result cache: already succeeded, nothing to queue
            accepted.append({**entry, "cached": True})
        else:  # stored and queued in one step
            accepted.append(entry)
    log.info("images added", extra={"accepted": len(accepted), "duplicates": len(duplicates),
                                    "rejected": len(rejected)})
    return jsonify({"accepted": accepted, "duplicates": duplicates, "rejected": rejected}), 202


@bp.get("/<jid>")
def get(jid: str):
    return jsonify(_job_json(_my_job(jid)))


@bp.post("/<jid>/close")
def close(jid: str):
    _my_job(jid)
    return jsonify(_job_json(pinfer().store.close_job(jid)))


@bp.delete("/<jid>")
def cancel(jid: str):
    _my_job(jid)
    return jsonify(_job_json(pinfer().store.cancel_job(jid)))


@bp.get("/<jid>/results")
def results(jid: str):
    store = pinfer().store
    cursor = int_param(request, "cursor", 0, 0, 2**31)
    limit = int_param(request, "limit", 1000, 1, 10_000)
    job = _my_job(jid)  # 404 for unknown jobs; read before the list so "finished" is safe
    preds, nxt = store.job_results(jid, cursor, limit)
    body = "".join(json.dumps(p.result_line(), separators=(",", ":")) + "\n" for p in preds)
    resp = Response(body, mimetype="application/x-ndjson")
    resp.headers["X-Next-Cursor"] = str(nxt)
    resp.headers["X-Job-Status"] = job.status
    return resp
