"""``GET /openapi.json``: an OpenAPI 3 description of the whole HTTP API (docs/http-api.md in
machine-readable form), for client generators and for fuzzing the running API (schemathesis).

Written by hand, not generated from the routes, so that a test (tests/unit/test_openapi.py) can
catch a route or an error code added without being described here.
"""
from __future__ import annotations

from flask import Blueprint, jsonify

bp = Blueprint("openapi", __name__)

#: Every ``error.code`` the API can answer with or store in a failed result (shared/errors.py, plus
#: the codes api/errors.py makes from werkzeug's own HTTP errors).
ERROR_CODES = [
    "bad_request", "invalid_parameter", "missing_image", "unauthorized", "not_found", "conflict",
    "idempotency_mismatch", "idempotency_in_progress", "invalid_image", "unsupported_format",
    "image_too_large", "too_many_pixels", "request_too_large", "bad_aspect_ratio", "corrupt_image",
    "image_expired", "overloaded", "service_unavailable", "worker_crashed", "inference_error", "canceled",
    "internal_error", "model_artifact_error", "weights_unavailable", "method_not_allowed",
    "unsupported_media_type", "invalid_webhook",
]

_ID = {"type": "string", "minLength": 1, "maxLength": 64}


def _err(description: str, retry_after: bool = False) -> dict:
    out: dict = {"description": description,
                 "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}
    if retry_after:
        out["headers"] = {"Retry-After": {"schema": {"type": "integer"}, "description": "seconds"}}
    return out


_COMMON = {"401": _err("API keys are on and the key is missing or invalid"),
           "503": _err("Redis unreachable; nothing was stored", retry_after=True)}
_PREDICTION = {"$ref": "#/components/schemas/Prediction"}
_JOB = {"$ref": "#/components/schemas/Job"}
_IDEMPOTENCY = {"name": "Idempotency-Key", "in": "header", "required": False,
                "schema": {"type": "string", "minLength": 1, "maxLength": 255, "pattern": "^[ -~]+$"}}


def _json(schema: dict, description: str) -> dict:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def spec() -> dict:
    top_k_q = {"name": "top_k", "in": "query", "required": False, "schema": {"type": "integer", "minimum": 1}}
    webhook_q = {"name": "webhook", "in": "query", "required": False,
                 "schema": {"type": "string", "format": "uri", "maxLength": 2048}}
    wait_q = {"name": "wait", "in": "query", "required": False, "schema": {"type": "number", "minimum": 0},
              "description": "seconds (at most PINFER_MAX_WAIT_S) to hold the request until the result is stored"}
    pid = {"name": "pid", "in": "path", "required": True, "schema": _ID}
    jid = {"name": "jid", "in": "path", "required": True, "schema": _ID}
    image_body = {"required": True, "content": {
        "multipart/form-data": {"schema": {"type": "object", "required": ["image"], "properties": {
            "image": {"type": "string", "format": "binary"}, "top_k": {"type": "integer", "minimum": 1},
            "webhook": {"type": "string", "format": "uri"}}}},
        "application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}}
    return {
        "openapi": "3.0.3",
        "info": {"title": "pinfer", "version": "1",
                 "description": "Image classification: submit an image, poll (or long-poll) its result; bulk jobs. "
                                "See docs/http-api.md."},
        "components": {
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer",
                                           "description": "only when the server has PINFER_API_KEYS_FILE"}},
            "schemas": {
                "Error": {"type": "object", "required": ["error"], "properties": {"error": {
                    "type": "object", "required": ["code", "message"], "properties": {
                        "code": {"type": "string", "enum": ERROR_CODES}, "message": {"type": "string"},
                        "details": {"type": "object"}}}}},
                "Prediction": {"type": "object", "required": ["id", "status"], "properties": {
                    "id": {"type": "string"},
                    "status": {"type": "string", "enum": ["queued", "running", "succeeded", "failed", "canceled"]},
                    "cached": {"type": "boolean"}, "links": {"type": "object"}}},
                "Job": {"type": "object", "required": ["id", "status", "counts"], "properties": {
                    "id": {"type": "string"},
                    "status": {"type": "string", "enum": ["open", "closed", "finished", "canceled"]},
                    "counts": {"type": "object"}}},
                "Upload": {"type": "object", "properties": {
                    "accepted": {"type": "array"}, "duplicates": {"type": "array"}, "rejected": {"type": "array"}}},
            }},
        "security": [{}, {"bearer": []}],
        "paths": {
            "/v1/predictions": {"post": {
                "summary": "Submit one image (and with wait, wait for its result)",
                "parameters": [top_k_q, webhook_q, _IDEMPOTENCY, wait_q],
                "requestBody": image_body,
                "responses": {"202": _json(_PREDICTION, "accepted and queued (with wait: not finished within it)"),
                              "200": _json(_PREDICTION, "finished: answered from the result cache (cached: true), "
                                           "or with wait, classified within it"),
                              "400": _err("bad parameter, no image, or refused webhook URL"), "409": _err("same Idempotency-Key in progress", True),
                              "413": _err("too large"), "415": _err("not a supported image format"),
                              "422": _err("bad aspect ratio, or Idempotency-Key reused for another request"),
                              "429": _err("overloaded", True), **_COMMON}}},
            "/v1/predictions/{pid}": {"get": {
                "summary": "A prediction (long-poll with wait)", "parameters": [pid, wait_q],
                "responses": {"200": _json(_PREDICTION, "the prediction"), "400": _err("bad wait"),
                              "404": _err("unknown, expired, or another key's"), **_COMMON}}},
            "/v1/jobs": {"post": {
                "summary": "Create a bulk job", "parameters": [top_k_q, _IDEMPOTENCY],
                "requestBody": {"required": False, "content": {"application/json": {"schema": {
                    "type": "object", "properties": {"name": {"type": "string", "maxLength": 1024},
                                                     "top_k": {"type": "integer", "minimum": 1},
                                                     "webhook": {"type": "string", "format": "uri"}}}}}},
                "responses": {"201": _json(_JOB, "created"), "400": _err("bad parameter or refused webhook URL"),
                              "409": _err("same Idempotency-Key in progress", True),
                              "422": _err("Idempotency-Key reused for another request"), **_COMMON}}},
            "/v1/jobs/{jid}": {
                "get": {"summary": "A job with counts, rate and ETA", "parameters": [jid],
                        "responses": {"200": _json(_JOB, "the job"), "404": _err("unknown"), **_COMMON}},
                "delete": {"summary": "Cancel what is still queued", "parameters": [jid],
                           "responses": {"200": _json(_JOB, "the job"), "404": _err("unknown"), **_COMMON}}},
            "/v1/jobs/{jid}/images": {"post": {
                "summary": "Add images (multipart field `images`, filename = the client's name)", "parameters": [jid],
                "requestBody": {"required": True, "content": {"multipart/form-data": {"schema": {
                    "type": "object", "required": ["images"], "properties": {
                        "images": {"type": "array", "items": {"type": "string", "format": "binary"}}}}}}},
                "responses": {"202": _json({"$ref": "#/components/schemas/Upload"}, "what got in"),
                              "400": _err("no images or bad names"), "404": _err("unknown"),
                              "409": _err("job closed or canceled"), "413": _err("request too large"),
                              "429": _err("overloaded: send the rest later", True), **_COMMON}}},
            "/v1/jobs/{jid}/close": {"post": {
                "summary": "No more images will come", "parameters": [jid],
                "responses": {"200": _json(_JOB, "the job"), "404": _err("unknown"), **_COMMON}}},
            "/v1/jobs/{jid}/results": {"get": {
                "summary": "Finished images as JSON Lines, from a cursor", "parameters": [
                    jid, {"name": "cursor", "in": "query", "required": False, "schema": {"type": "integer", "minimum": 0}},
                    {"name": "limit", "in": "query", "required": False,
                     "schema": {"type": "integer", "minimum": 1, "maximum": 10000}}],
                "responses": {"200": {"description": "one JSON object per line; X-Next-Cursor, X-Job-Status",
                                      "content": {"application/x-ndjson": {"schema": {"type": "string"}}}},
                              "400": _err("bad cursor or limit"), "404": _err("unknown"), **_COMMON}}},
            "/v1/stats": {"get": {"summary": "Queues and workers (operators)",
                                  "responses": {"200": _json({"type": "object"}, "snapshot"), **_COMMON}}},
            "/v1/dashboard": {"get": {"summary": "What /dashboard draws: stats, recent jobs, server time",
                                      "responses": {"200": _json({"type": "object"}, "snapshot"), **_COMMON}}},
            "/metrics": {"get": {"summary": "Prometheus metrics of the API and, at scrape time, of Redis",
                                 "security": [{}],
                                 "responses": {"200": {"description": "Prometheus text format",
                                                       "content": {"text/plain": {}}}}}},
            "/dashboard": {"get": {"summary": "The operator page", "security": [{}],
                                   "responses": {"200": {"description": "HTML", "content": {"text/html": {}}}}}},
            "/healthz": {"get": {"summary": "Liveness", "security": [{}],
                                 "responses": {"200": _json({"type": "object"}, "alive")}}},
            "/readyz": {"get": {"summary": "Readiness: Redis and a worker with a loaded model", "security": [{}],
                                "responses": {"200": _json(_READINESS, "ready"),
                                              "503": _json(_READINESS, "not ready, and why")}}},
            "/": {"get": {"summary": "The web page", "security": [{}],
                          "responses": {"200": {"description": "HTML", "content": {"text/html": {}}}}}},
            "/openapi.json": {"get": {"summary": "This description", "security": [{}],
                                      "responses": {"200": _json({"type": "object"}, "OpenAPI 3")}}},
        },
    }


#: /readyz's body; the roll-out fields are absent only when Redis cannot be read.
_READINESS = {"type": "object", "required": ["status", "redis"], "properties": {
    "status": {"type": "string", "enum": ["ready", "not_ready"]},
    "redis": {"type": "boolean"},
    "models_by_sha": {"type": "object", "additionalProperties": {"type": "integer"},
                      "description": "serving workers per model artifact sha256"},
    "rollout": {"type": "boolean", "description": "more than one model is served (a roll-out in progress)"},
    "reload_errors": {"type": "array", "description": "workers that refused a new model and serve their old one",
                      "items": {"type": "object", "properties": {
                          "worker": {"type": "string"}, "reason": {"type": "string"},
                          "sha256": {"type": "string", "nullable": True},
                          "manifest_sha256": {"type": "string", "nullable": True},
                          "at": {"type": "number"}}}},
}}


@bp.get("/openapi.json")
def spec_json():
    return jsonify(spec())
