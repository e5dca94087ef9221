"""Assertions shared by the API tests."""
from __future__ import annotations

import re

ID_RE = re.compile(r"^[A-Za-z0-9_-]{22}$")


def assert_error(resp, status: int, code: str) -> dict:
    """The response is a JSON error with this status and machine-readable code, and a message."""
    assert resp.status_code == status, resp.get_data(as_text=True)
    body = resp.get_json()
    assert body["error"]["code"] == code, body
    assert body["error"]["message"]
    return body
