"""Connections the API holds for its lifetime: the store, the task publisher, the long-poll waiters.

``init_app`` builds them once per process; tests pass fakes in the app config (``REDIS``,
``REDIS_RAW``, ``ENQUEUE``) to run the same routes against fakeredis.
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
    enqueue: Callable[[str, str], None]
    waiters: Waiters
    cache: ResultCache


def init_app(app: Flask) -> None:
    settings: Settings = app.config["SETTINGS"]
    store = Store(settings, app.config.get("REDIS"), app.config.get("REDIS_RAW"))
    enqueue = app.config.get("ENQUEUE")
    if enqueue is None:
        from shared.broker import enqueue as send, make_celery

        celery = make_celery(settings, name="pinfer-api")

        def enqueue(pid: str, lane: str) -> None:
            send(celery, pid, lane)

    app.extensions["pinfer"] = Pinfer(settings, store, enqueue, Waiters(store, settings.max_waiters),
                                       ResultCache(store))


def pinfer() -> Pinfer:
    return current_app.extensions["pinfer"]
