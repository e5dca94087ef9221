"""API keys: who is calling, and what they may see.

Off unless PINFER_API_KEYS_FILE is set (the loopback default of ``make up``). With it, every ``/v1``
call needs ``Authorization: Bearer <key>``; ``/healthz``, ``/readyz``, the web page and
``/openapi.json`` stay open. The file holds one ``<name> <sha256 hex of the key>`` per line
(``pinfer api-key NAME`` appends one and prints the key once): a leaked file reveals no key. Keys
are compared as sha256 digests with ``hmac.compare_digest`` against every entry (no early exit),
and never logged. Predictions and jobs belong to the key that created them: any other key gets
404, exactly as for an unknown ID, so IDs cannot be probed.
"""
from __future__ import annotations

import hashlib
import hmac
import os
import threading
from pathlib import Path

from flask import Flask, g, request

from shared.errors import NotFound, Unauthorized

#: Open even with API keys on: probes, the two HTML pages (they send the key typed into them), this
#: description, and /metrics (aggregate figures only, for Prometheus scrapers inside the network).
OPEN_ENDPOINTS = frozenset({"health.healthz", "health.readyz", "pages.index", "pages.dashboard", "static",
                            "openapi.spec_json", "metrics"})


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


class KeyRing:
    """The keys file, re-read when it changes (adding or revoking a key needs no restart)."""

    def __init__(self, path: str) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()
        self._stamp: tuple[float, int] | None = None
        self._keys: list[tuple[str, bytes]] = []

    def _load(self) -> None:
        st = os.stat(self.path)  # a missing file is an error: auth must never silently turn off
        stamp = (st.st_mtime, st.st_size)
        with self._lock:
            if stamp == self._stamp:
                return
            entries = []
            for n, line in enumerate(self.path.read_text(encoding="utf-8").splitlines(), 1):
                line = line.split("#", 1)[0].strip()
                if not line:
                    continue
                parts = line.split()
                if len(parts) != 2 or len(parts[1]) != 64:
                    raise ValueError(f"{self.path}:{n}: expected `<name> <sha256 hex>`")
                entries.append((parts[0], bytes.fromhex(parts[1])))
            self._keys, self._stamp = entries, stamp

    def name_of(self, key: str) -> str | None:
        """The name of ``key``, or None. Compares against every entry, in constant time each."""
        self._load()
        digest = hashlib.sha256(key.encode()).digest()
        found = None
        for name, stored in self._keys:
            if hmac.compare_digest(digest, stored):
                found = name
        return found


def init_app(app: Flask) -> None:
    path = app.config["SETTINGS"].api_keys_file
    ring = KeyRing(path) if path else None
    if ring is not None:
        ring._load()  # fail at start on a missing or malformed file, not on the first request

    @app.before_request
    def _authenticate():
        g.api_key_name = None
        if ring is None or request.endpoint is None or request.endpoint in OPEN_ENDPOINTS:
            return None
        scheme, _, token = request.headers.get("Authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise Unauthorized("send an API key as `Authorization: Bearer <key>`")
        name = ring.name_of(token.strip())
        if name is None:
            raise Unauthorized("the API key is not valid")
        g.api_key_name = name
        return None


def caller() -> str | None:
    """The API key name of this request (None when API keys are off)."""
    return g.get("api_key_name")


def check_owner(owner: str | None, what: str) -> None:
    """404 (not 403) when the record belongs to another key: IDs of others cannot be probed."""
    me = caller()
    if me is not None and owner != me:
        raise NotFound(f"{what} does not exist or has expired")
