"""Fixtures for the API / store / worker unit tests: everything on one in-process fakeredis server.

* ``server``   -- a fresh ``fakeredis.FakeServer`` per test (Lua scripts run through lupa);
* ``settings`` -- default ``Settings()`` (no environment read);
* ``store``    -- a ``Store`` over ``server`` (text client + binary client);
* ``recorder`` -- the API's task message builder (the real one), and what reached the broker queues as
  ``(pid, lane)``; raises instead when told to;
* ``app`` / ``client`` -- ``create_app`` wired to the fakes; ``make_app(settings, ...)`` for other settings;
* ``images``   -- JPEG / PNG bytes made with Pillow, and hand-made PNG headers.
"""
from __future__ import annotations

import io
import struct
import zlib
from dataclasses import dataclass, field
from typing import Callable

import fakeredis
import pytest
from flask import Flask
from PIL import Image

from api import create_app
from shared.settings import Settings
from shared.store import Store


# --- the broker queues ----------------------------------------------------------------------------
_CELERY = None


def _celery():
    """One Celery app for building messages (no connection is ever made)."""
    global _CELERY
    if _CELERY is None:
        from shared.broker import make_celery

        _CELERY = make_celery(Settings(), name="pinfer-test")
    return _CELERY


@dataclass
class Recorder:
    """The app's ``TASK_MESSAGE``: builds the real task message (``shared.broker.task_message``), or
    raises ``error`` instead when it is set; ``calls`` lists the messages that reached the queues on
    ``server`` (pushed by the submit script), oldest first, as ``(pid, lane)``."""

    server: fakeredis.FakeServer
    error: Exception | None = None

    def __call__(self, pid: str, lane: str) -> tuple[str, str]:
        if self.error is not None:
            raise self.error
        from shared.broker import task_message

        return task_message(_celery(), pid, lane)

    @property
    def calls(self) -> list[tuple[str, str]]:
        import base64
        import json

        from shared import keys
        from shared.schema import BULK, INTERACTIVE

        r = fakeredis.FakeRedis(server=self.server)
        out = []
        for queue, lane in ((keys.QUEUE_INTERACTIVE, INTERACTIVE), (keys.QUEUE_BULK, BULK)):
            for raw in reversed(r.lrange(queue, 0, -1)):  # LPUSHed: the oldest is last
                args = json.loads(base64.b64decode(json.loads(raw)["body"]))[0]
                out.append((args[0], lane))
        return out

    @property
    def pids(self) -> list[str]:
        return [p for p, _ in self.calls]

    def clear(self) -> None:
        """As if a worker had taken every queued message."""
        from shared import keys

        fakeredis.FakeRedis(server=self.server).delete(keys.QUEUE_INTERACTIVE, keys.QUEUE_BULK)


# --- image makers --------------------------------------------------------------------------------
class Images:
    @staticmethod
    def jpeg(size: tuple[int, int] = (32, 24), color=(200, 30, 30)) -> bytes:
        buf = io.BytesIO()
        Image.new("RGB", size, color).save(buf, "JPEG", quality=90)
        return buf.getvalue()

    @staticmethod
    def png(size: tuple[int, int] = (32, 24), color=(30, 200, 30)) -> bytes:
        buf = io.BytesIO()
        Image.new("RGB", size, color).save(buf, "PNG")
        return buf.getvalue()

    @staticmethod
    def png_header(width: int, height: int) -> bytes:
        """A small PNG whose IHDR (valid CRC) declares width x height; no real pixel data."""
        def chunk(kind: bytes, body: bytes) -> bytes:
            return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

        ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit RGB
        return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 16))
                + chunk(b"IEND", b""))


@pytest.fixture
def images() -> type[Images]:
    return Images


# --- redis, store, app ---------------------------------------------------------------------------
@pytest.fixture
def server() -> fakeredis.FakeServer:
    return fakeredis.FakeServer()


@pytest.fixture
def settings() -> Settings:
    return Settings()


@pytest.fixture
def recorder(server) -> Recorder:
    return Recorder(server)


@pytest.fixture
def make_store(server) -> Callable[[Settings], Store]:
    def make(settings: Settings) -> Store:
        return Store(settings, fakeredis.FakeRedis(server=server, decode_responses=True),
                     fakeredis.FakeRedis(server=server))
    return make


@pytest.fixture
def store(make_store, settings) -> Store:
    return make_store(settings)


@pytest.fixture
def make_app(server, recorder) -> Callable[..., Flask]:
    def make(settings: Settings, redis_server: fakeredis.FakeServer | None = None,
             task_message: Callable[[str, str], tuple[str, str]] | None = None) -> Flask:
        srv = redis_server or server
        app = create_app({"SETTINGS": settings,
                          "REDIS": fakeredis.FakeRedis(server=srv, decode_responses=True),
                          "REDIS_RAW": fakeredis.FakeRedis(server=srv),
                          "TASK_MESSAGE": task_message or recorder,
                          "TESTING": True})
        return app
    return make


@pytest.fixture
def app(make_app, settings) -> Flask:
    return make_app(settings)


@pytest.fixture
def client(app):
    return app.test_client()

