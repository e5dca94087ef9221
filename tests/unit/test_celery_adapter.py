"""worker.celery_adapter without a broker: the start-up version check, pyproject's pins agreeing with
it, and decoding that never raises on what else may sit in kombu's ``unacked`` hash. Decoding real
messages is tested against real Celery and Redis in tests/integration/test_celery_adapter.py."""
from __future__ import annotations

import base64
import json
import logging
import tomllib

import pytest
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet

from shared import keys
from shared.schema import BULK
from shared.settings import PROJECT_ROOT, Settings
from worker import celery_adapter
from worker.celery_adapter import TESTED, UntestedVersions, check_versions, message_pid, unacked_pids

GOOD = {"celery": "5.6.3", "kombu": "5.7.0", "celery-batches": "0.11"}


def test_the_installed_versions_are_the_tested_ones():
    check_versions(versions=celery_adapter.installed_versions())  # what `make install` gives passes


@pytest.mark.parametrize("name, version", [("celery", "5.7.0"), ("celery", "5.5.3"), ("kombu", "5.8.0"),
                                           ("kombu", "5.6.2"), ("celery-batches", "0.12"),
                                           ("celery-batches", "0.11.1"), ("kombu", "missing"),
                                           ("celery", "5.7.0rc1")])
def test_an_untested_version_is_refused_with_a_message_naming_the_tested_ones(name, version):
    with pytest.raises(UntestedVersions) as exc:
        check_versions(versions={**GOOD, name: version})
    msg = str(exc.value)
    assert f"{name} {version}" in msg
    assert "celery>=5.6,<5.7, kombu>=5.7,<5.8, celery-batches==0.11" in msg
    assert "PINFER_ALLOW_UNTESTED_CELERY=1" in msg


@pytest.mark.parametrize("versions", [GOOD, {**GOOD, "celery": "5.6.0", "kombu": "5.7.9"},
                                      {**GOOD, "celery-batches": "0.11.0"}])
def test_versions_inside_the_tested_ranges_pass(versions):
    check_versions(versions=versions)


def test_the_escape_hatch_starts_anyway_with_a_warning(caplog):
    with caplog.at_level(logging.WARNING, "pinfer.worker"):
        check_versions(allow_untested=True, versions={**GOOD, "kombu": "6.0.0"})
    assert "kombu 6.0.0" in caplog.text and "PINFER_ALLOW_UNTESTED_CELERY=1" in caplog.text
    assert Settings.from_env({"PINFER_ALLOW_UNTESTED_CELERY": "1"}).allow_untested_celery
    assert not Settings().allow_untested_celery


def test_pyproject_pins_exactly_the_tested_versions():
    """A pin wider than TESTED would install versions the worker then refuses; a narrower one would
    keep out versions that were verified. Every place a package is required must agree."""
    project = tomllib.loads((PROJECT_ROOT / "pyproject.toml").read_text())["project"]
    lists = [project["dependencies"], *project["optional-dependencies"].values()]
    seen = {name: 0 for name in TESTED}
    for req in (Requirement(line) for deps in lists for line in deps):
        if req.name in TESTED:
            seen[req.name] += 1
            assert req.specifier == SpecifierSet(TESTED[req.name]), req
    assert all(seen.values()), seen


def test_the_launcher_refuses_to_start_on_untested_versions(monkeypatch, caplog):
    from worker import launcher

    monkeypatch.setattr(celery_adapter, "installed_versions", lambda: {**GOOD, "celery": "5.7.1"})
    monkeypatch.setattr(launcher, "Launcher", lambda *a: pytest.fail("started workers"))
    monkeypatch.setattr("shared.logs.setup", lambda *a: None)
    with caplog.at_level(logging.CRITICAL, "pinfer.launcher"):
        assert launcher.main([]) == 2
    assert "untested celery 5.7.1" in caplog.text


@pytest.mark.parametrize("raw", ["", "not json", "{}", "[]", "[1, 2]", '{"body": "%%%"}',
                                 json.dumps({"body": base64.b64encode(b"[[], {}, {}]").decode(),
                                             "properties": {"body_encoding": "base64"}}),
                                 json.dumps({"body": base64.b64encode(b"nope").decode(),
                                             "properties": {"body_encoding": "base64"}}),
                                 "null", b"\xff\xfe",
                                 '{"body": "x", "properties": null}', '{"body": "x", "properties": []}'])
def test_message_pid_returns_none_on_garbage(raw):
    """The ``unacked`` hash belongs to kombu and any app on the same database: never raise."""
    assert message_pid(raw) is None
    assert unacked_pids([raw]) == set()


def test_the_batch_function_is_called_with_requests_and_may_defer():
    """AdaptiveBatches.flush hands (requests, may_defer) to celery-batches' apply_batches_task, which
    must call the task with exactly those arguments."""
    from celery import Celery
    from celery_batches import SimpleRequest
    from celery_batches.trace import apply_batches_task

    app = Celery("adapter-test", set_as_current=False)
    calls = []

    @app.task(base=celery_adapter.AdaptiveBatches, bind=True, name="t")
    def t(self, requests, may_defer=True):
        calls.append(([r.args for r in requests], may_defer))
        return {"deferred": []}

    req = SimpleRequest("id1", "t", ["pid1"], {}, {"routing_key": keys.QUEUE_BULK}, "h", True, None, None, {})
    assert apply_batches_task(t, ([req], False), 0, None) == {"deferred": []}
    assert calls == [([["pid1"]], False)]
    assert celery_adapter.lane_of(req) == BULK
