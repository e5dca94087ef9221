"""A stop token: one object that asks a run, and every SDK call it makes, to end early.

A signal handler (Ctrl-C, SIGTERM), a watchdog timer or another thread calls :meth:`StopToken.stop`;
code that waits (backoff, ``Retry-After``, result polling) waits *on the token*, so it wakes at
once, and a :class:`~pinfer_client.sdk.Client` built with ``stop=token`` raises :class:`Stopped`
instead of sending another request or sleeping out a retry delay.
"""
from __future__ import annotations

import threading

__all__ = ["StopToken", "Stopped"]


class Stopped(Exception):
    """Raised by an SDK call that was abandoned because its :class:`StopToken` was set.

    Not a ``ClientError``: nothing went wrong with the API, the caller asked to stop, so code that
    handles API failures (``except ClientError``) does not mistake it for one."""


class StopToken:
    """Thread-safe and signal-safe; also accepted wherever a ``threading.Event`` was (``is_set``,
    ``set``, ``wait``), so ``ingest(stop=event)`` keeps working. Pass an existing ``event`` to share
    it: setting either then stops the run."""

    def __init__(self, event: threading.Event | None = None) -> None:
        self._event = event if event is not None else threading.Event()

    @classmethod
    def of(cls, stop: "StopToken | threading.Event | None") -> "StopToken":
        """``stop`` as a token: itself, a token sharing that Event, or a fresh one."""
        return stop if isinstance(stop, StopToken) else cls(stop)

    def stop(self) -> None:
        """Ask everything that holds this token to end; idempotent."""
        self._event.set()

    set = stop  # threading.Event's name for it

    @property
    def stopped(self) -> bool:
        return self._event.is_set()

    def is_set(self) -> bool:
        return self._event.is_set()

    def wait(self, timeout: float | None = None) -> bool:
        """Wait up to ``timeout`` seconds; True as soon as the token is set (like Event.wait)."""
        return self._event.wait(timeout)

    def check(self) -> None:
        """Raise :class:`Stopped` if the token is set."""
        if self._event.is_set():
            raise Stopped()

    def sleep(self, seconds: float) -> None:
        """Sleep ``seconds`` unless stopped first; raises :class:`Stopped` when stopped."""
        if self._event.wait(max(0.0, seconds)):
            raise Stopped()

    def __repr__(self) -> str:
        return f"StopToken(stopped={self.stopped})"
