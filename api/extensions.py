"""Connections the API holds for its lifetime: the store, the task message builder, the long-poll waiters.

``init_app`` builds them once per process; tests pass fakes in the app config (``REDIS``,
``REDIS_RAW``, ``TASK_MESSAGE``) to run the same routes against fakeredis.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from flask import Flask, current_app

from api.cache import ResultCache
from api.waiters import Waiters
from shared.settings import Settings
from shared.store import Store


@dataclass
class Pinfer:
    settings: Settings
    store: Store
    task_message: Callable[[str, str], tuple[str, str]]
    waiters: Waiters
    cache: ResultCache


def init_app(app: Flask) -> None:
    settings: Settings = app.config["SETTINGS"]
    store = Store(settings, app.config.get("REDIS"), app.config.get("REDIS_RAW"))
    task_message = app.config.get("TASK_MESSAGE")
    if task_message is None:
        from shared.broker import make_celery, task_message as build

        celery = make_celery(settings, name="pinfer-api")

        def task_message(pid: str, lane: str) -> tuple[str, str]:
            return build(celery, pid, lane)

    app.extensions["pinfer"] = Pinfer(settings, store, task_message, Waiters(store, settings.max_waiters),
                                       ResultCache(store))


def pinfer() -> Pinfer:
    return current_app.extensions["pinfer"]
