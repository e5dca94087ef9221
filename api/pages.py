"""The web pages: drop a photo and see its labels; the operator dashboard (both use the public API)."""
from __future__ import annotations

import time

from flask import Blueprint, jsonify, render_template

from api.extensions import pinfer
from api.health import snapshot

bp = Blueprint("pages", __name__)
RECENT_JOBS = 8


@bp.get("/")
def index():
    return render_template("index.html")


@bp.get("/dashboard")
def dashboard():
    """The operator page: plain HTML + inline script polling /v1/dashboard (no build, no CDN)."""
    return render_template("dashboard.html")


@bp.get("/v1/dashboard")
def dashboard_data():
    """What the dashboard draws: /v1/stats plus the newest jobs with rate and ETA, and the server time
    (the page computes images/s from successive worker heartbeats, timed by ``seen_at``)."""
    store = pinfer().store
    body = snapshot()
    body["time"] = time.time()
    body["jobs"] = [j.public(store.job_rate(j)) for j in store.recent_jobs(RECENT_JOBS)]
    return jsonify(body)
