"""The pinfer HTTP API: a Flask application factory (``gunicorn 'api:create_app()'``).

The API validates uploads from their header and stores the bytes in Redis together with the task
message naming the ID (by task name), in one atomic step. It never imports the worker or torch.
"""
from __future__ import annotations

from typing import Any

from flask import Flask

from shared.settings import Settings


def create_app(test_config: dict[str, Any] | None = None) -> Flask:
    app = Flask(__name__)
    config = dict(test_config or {})
    settings = config.pop("SETTINGS", None) or Settings.from_env()
    app.config.update(SETTINGS=settings, JSON_SORT_KEYS=False, MAX_CONTENT_LENGTH=settings.max_request_bytes)
    app.config.update(config)
    app.json.sort_keys = False

    from api import auth, errors, extensions, health, jobs, metrics, openapi, pages, predictions, requestlog

    extensions.init_app(app)
    requestlog.init_app(app)
    metrics.init_app(app)
    errors.init_app(app)
    auth.init_app(app)
    app.register_blueprint(predictions.bp)
    app.register_blueprint(jobs.bp)
    app.register_blueprint(health.bp)
    app.register_blueprint(pages.bp)
    app.register_blueprint(openapi.bp)
    return app
