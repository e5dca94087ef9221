"""Logging for every pinfer process: plain text or one JSON object per line (PINFER_LOG_FORMAT).

The JSON lines come from python-json-logger (a stdlib ``logging.Formatter``), so the loggers of
gunicorn, Celery, kombu and our own modules all come out in the same shape. The fields that let an
operator follow one image (``request_id``, ``prediction_id``, ``job_id``, ``worker``) live in
context variables: ``bind(...)`` sets them for a request or an image, and a filter copies them onto
every record logged meanwhile, so a module logging "stored" needs no extra arguments. ``event``
is the record's message, ``duration_ms`` is passed with ``extra=`` where a duration is known.
"""
from __future__ import annotations

import contextvars
import logging
import sys
from contextlib import contextmanager
from typing import Iterator

FIELDS = ("request_id", "prediction_id", "job_id", "worker")
_ctx: dict[str, contextvars.ContextVar] = {f: contextvars.ContextVar(f, default=None) for f in FIELDS}
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


@contextmanager
def bind(**fields: str | None) -> Iterator[None]:
    """Attach ``fields`` (names from FIELDS) to every record logged inside the block."""
    tokens = [(_ctx[k], _ctx[k].set(v)) for k, v in fields.items() if k in _ctx]
    try:
        yield
    finally:
        for var, tok in reversed(tokens):
            var.reset(tok)


def set_context(**fields: str | None) -> None:
    """Like ``bind`` for the rest of this thread/process (e.g. the worker name, set once)."""
    for k, v in fields.items():
        if k in _ctx:
            _ctx[k].set(v)


class ContextFilter(logging.Filter):
    """Copies the bound context onto each record (an explicit ``extra=`` value wins)."""

    def filter(self, record: logging.LogRecord) -> bool:
        for name, var in _ctx.items():
            if getattr(record, name, None) is None:
                value = var.get()
                if value is not None:
                    setattr(record, name, value)
        return True


def json_formatter() -> logging.Formatter:
    from pythonjsonlogger.json import JsonFormatter

    return JsonFormatter("%(asctime)s %(levelname)s %(name)s %(message)s",
                         rename_fields={"asctime": "time", "levelname": "level", "name": "logger",
                                        "message": "event"},
                         timestamp=False)


class TextFormatter(logging.Formatter):
    """Plain lines, with the bound fields appended (``request_id=… prediction_id=…``) when set."""

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        extra = " ".join(f"{k}={getattr(record, k)}" for k in FIELDS if getattr(record, k, None))
        return f"{line} [{extra}]" if extra else line


def formatter(fmt: str) -> logging.Formatter:
    return json_formatter() if fmt == "json" else TextFormatter(TEXT_FORMAT)


def attach(handler: logging.Handler, fmt: str) -> None:
    """Give ``handler`` pinfer's format and context fields (used on handlers Celery/gunicorn made)."""
    handler.setFormatter(formatter(fmt))
    if not any(isinstance(f, ContextFilter) for f in handler.filters):
        handler.addFilter(ContextFilter())


def setup(fmt: str, level: str | int = "INFO") -> None:
    """Configure the root logger of this process: one stderr handler in ``fmt`` ("text" | "json")."""
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    handler = logging.StreamHandler(sys.stderr)
    attach(handler, fmt)
    root.addHandler(handler)
    root.setLevel(level)
