"""/openapi.json stays in step with the routes Flask serves and the error codes pinfer answers with."""
from __future__ import annotations

import re

import shared.errors as errors_module
from api.openapi import ERROR_CODES
from shared.errors import PinferError


def documented(spec: dict) -> set[tuple[str, str]]:
    return {(path, method.upper()) for path, ops in spec["paths"].items() for method in ops}


def test_every_route_is_described_and_nothing_else(app, client):
    spec = client.get("/openapi.json").get_json()
    assert spec["openapi"].startswith("3.")
    served = {(re.sub(r"<(?:[^:>]+:)?([^>]+)>", r"{\1}", rule.rule), m)
              for rule in app.url_map.iter_rules() if rule.endpoint != "static"
              for m in rule.methods - {"HEAD", "OPTIONS"}}
    assert served == documented(spec)


def test_every_error_code_is_in_the_error_schema(client):
    spec = client.get("/openapi.json").get_json()
    enum = spec["components"]["schemas"]["Error"]["properties"]["error"]["properties"]["code"]["enum"]
    codes = {cls.code for cls in vars(errors_module).values()
             if isinstance(cls, type) and issubclass(cls, PinferError)}
    codes.add("request_too_large")  # api/errors.py, for werkzeug's RequestEntityTooLarge
    assert codes <= set(enum), codes - set(enum)
    assert set(enum) == set(ERROR_CODES)


def test_openapi_is_open_when_api_keys_are_on(make_app, settings, tmp_path):
    f = tmp_path / "keys"
    f.write_text("")
    client = make_app(settings.replace(api_keys_file=str(f))).test_client()
    assert client.get("/openapi.json").status_code == 200
    assert client.get("/v1/stats").status_code == 401
