"""Liveness, readiness and the operator's view of queues and workers."""
from __future__ import annotations

import json
from collections import Counter

from flask import Blueprint, jsonify

from api.extensions import pinfer
from shared.schema import SERVING

bp = Blueprint("health", __name__)


@bp.get("/healthz")
def healthz():
    return jsonify({"status": "ok"})


def snapshot() -> dict:
    store = pinfer().store
    store.ping()
    workers = store.live_workers()
    for w in workers:  # a JSON object in the heartbeat hash; "" once the worker cleared it
        w["reload_error"] = _decode(w.get("reload_error"))
    ready = [w for w in workers if w.get("state") in SERVING]
    by_sha = Counter(w.get("sha256") for w in ready if w.get("sha256"))
    models = {(w.get("model"), w.get("sha256"), w.get("pretrained"), w.get("precision"), w.get("runtime"),
               w.get("selection")) for w in ready}
    body = {
        "status": "ready" if ready else "not_ready",
        "redis": True,
        "workers": workers,
        "ready_workers": len(ready),
        "queues": store.queue_depths(),
        # selection: why the worker serves this precision/runtime (PINFER_PRECISION=auto's fallbacks).
        "models": [{"name": m[0], "sha256": m[1], "pretrained": m[2] == "1", "precision": m[3], "runtime": m[4],
                    "selection": m[5]} for m in sorted(models, key=str)],
        # A roll-out in progress: serving workers per artifact sha256 (more than one = rollout).
        "models_by_sha": dict(sorted(by_sha.items())),
        "rollout": len(by_sha) > 1,
        # Models a worker refused to roll out to (bad file, wrong sha): it keeps serving the old one.
        "reload_errors": [{"worker": w["name"], **w["reload_error"]} for w in workers if w["reload_error"]],
    }
    if ready:
        body["pretrained"] = all(m["pretrained"] for m in body["models"])
        if not body["pretrained"]:
            body["warning"] = ("the model was NOT built from the official ResNet-18 weights: labels are "
                               "meaningless. Run `pinfer export-model` with resnet18-f37072fd.pth.")
    else:
        body["reason"] = "no worker with a loaded model has sent a heartbeat recently"
    return body


def _decode(raw: str | None) -> dict | None:
    if not raw:
        return None
    try:
        value = json.loads(raw)
    except ValueError:
        return {"reason": raw}
    return value if isinstance(value, dict) else {"reason": str(value)}


@bp.get("/readyz")
def readyz():
    try:
        body = snapshot()
    except Exception as exc:  # Redis down: not ready, say why
        return jsonify({"status": "not_ready", "redis": False, "reason": f"redis: {exc}"}), 503
    return jsonify(body), (200 if body["status"] == "ready" else 503)


@bp.get("/v1/stats")
def stats():
    """Queue depths and workers, for operators (same data as /readyz, always 200)."""
    return jsonify(snapshot())
