"""Metrics, request ids and JSON logs, in process (Flask test client + fakeredis + fake runtime)."""
from __future__ import annotations

import io
import json
import logging

import pytest
from prometheus_client import REGISTRY
from prometheus_client.parser import text_string_to_metric_families

from shared import logs
from shared.schema import BULK
from tests.unit.test_classifier import World, corrupt_jpeg


def scrape(client) -> dict[tuple[str, tuple], float]:
    r = client.get("/metrics")
    assert r.status_code == 200 and r.mimetype == "text/plain"
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(r.get_data(as_text=True)) for s in fam.samples}


def value(samples, name: str, **labels) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def test_api_metrics_count_requests_by_route_and_read_queues_and_jobs_from_redis(make_app, settings, images):
    client = make_app(settings.replace(max_pending_images=2)).test_client()
    before = scrape(client)
    route = "/v1/predictions"
    assert client.post(route, data={"image": (io.BytesIO(images.jpeg()), "a.jpg")}).status_code == 202
    assert client.post(route, data={"image": (io.BytesIO(images.jpeg()), "b.jpg")}).status_code == 202
    assert client.post(route, data={"image": (io.BytesIO(images.jpeg()), "c.jpg")}).status_code == 429
    jid = client.post("/v1/jobs", json={"name": "j"}).get_json()["id"]
    after = scrape(client)

    def moved(name, **labels):
        return value(after, name, **labels) - value(before, name, **labels)

    assert moved("pinfer_http_requests_total", route=route, method="POST", status="202") == 2
    assert moved("pinfer_http_requests_total", route=route, method="POST", status="429") == 1
    assert moved("pinfer_http_overloaded_total", scope="global") == 1
    assert moved("pinfer_http_request_duration_seconds_count", route=route, method="POST") == 3
    # Redis state at scrape time: the two accepted images and their messages (no worker takes them)
    assert value(after, "pinfer_redis_up") == 1
    assert value(after, "pinfer_pending_images") == 2
    assert value(after, "pinfer_queue_messages", lane="interactive") == 2
    assert value(after, "pinfer_jobs", status="open") == 1
    assert jid
    # an unknown path is counted under one label value, never its raw path
    client.get("/no/such/thing/123")
    assert value(scrape(client), "pinfer_http_requests_total", route="unmatched", method="GET", status="404") >= 1


def test_redis_down_scrape_says_so_instead_of_reporting_zeros(make_app, settings):
    import fakeredis

    dead = fakeredis.FakeServer()
    dead.connected = False
    samples = scrape(make_app(settings, redis_server=dead).test_client())
    assert value(samples, "pinfer_redis_up") == 0
    assert not any(name == "pinfer_pending_images" for name, _ in samples)


class WorkerSamples:
    """Differences of the worker's in-process metrics since construction."""

    def __init__(self, *series: tuple[str, dict]) -> None:
        self.before = {self._key(n, lb): REGISTRY.get_sample_value(n, lb) or 0.0 for n, lb in series}

    @staticmethod
    def _key(name: str, labels: dict) -> tuple:
        return name, tuple(sorted(labels.items()))

    def delta(self, name: str, **labels) -> float:
        return (REGISTRY.get_sample_value(name, labels) or 0.0) - self.before[self._key(name, labels)]


OK_BULK = dict(lane=BULK, outcome="succeeded", code="none")
CORRUPT = dict(lane=BULK, outcome="failed", code="corrupt_image")


def test_worker_metrics_move_per_image_and_per_batch(store, settings, images):
    w = World(store, settings, images, recent=lambda: False)
    m = WorkerSamples(("pinfer_worker_images_total", OK_BULK), ("pinfer_worker_images_total", CORRUPT),
                      ("pinfer_worker_batch_size_count", {}), ("pinfer_worker_batch_size_sum", {}),
                      ("pinfer_worker_preprocess_seconds_count", {}), ("pinfer_worker_inference_seconds_count", {}),
                      ("pinfer_worker_queue_wait_seconds_count", dict(lane=BULK)),
                      ("pinfer_worker_end_to_end_seconds_count", dict(lane=BULK)),
                      ("pinfer_worker_redeliveries_total", {}))
    items = [w.add(BULK) for _ in range(3)] + [w.add(BULK, data=corrupt_jpeg(images))]
    w.clf.run(items)
    assert w.runtime.sizes == [3], w.runtime.sizes
    assert m.delta("pinfer_worker_images_total", **OK_BULK) == 3
    assert m.delta("pinfer_worker_images_total", **CORRUPT) == 1
    assert m.delta("pinfer_worker_batch_size_count") == 1  # one forward pass ...
    assert m.delta("pinfer_worker_batch_size_sum") == 3  # ... of the three good images
    assert m.delta("pinfer_worker_preprocess_seconds_count") == 3
    assert m.delta("pinfer_worker_inference_seconds_count") == 3
    assert m.delta("pinfer_worker_queue_wait_seconds_count", lane=BULK) == 4  # every claimed image
    assert m.delta("pinfer_worker_end_to_end_seconds_count", lane=BULK) == 3
    assert m.delta("pinfer_worker_redeliveries_total") == 0
    # an image claimed once already by a worker that died: its next delivery is a redelivery
    again = w.add(BULK)
    store.transition(again.pid, "running", ("queued",), bump_attempts=True)
    w.clf.run([again])
    assert m.delta("pinfer_worker_redeliveries_total") == 1
    assert m.delta("pinfer_worker_images_total", **OK_BULK) == 4


def test_worker_state_is_read_at_scrape_time_and_model_info_is_labelled():
    from prometheus_client import CollectorRegistry, generate_latest

    from worker import metrics

    state = {"s": "STARTING"}
    reg = CollectorRegistry()
    reg.register(metrics._StateCollector(lambda: state["s"]))

    def current() -> dict:
        fams = text_string_to_metric_families(generate_latest(reg).decode())
        return {s.labels["state"]: s.value for f in fams for s in f.samples}

    assert current() == {"STARTING": 1, "READY": 0, "BUSY": 0, "RELOADING": 0, "SETUP_FAILED": 0}
    state["s"] = "BUSY"
    assert current()["BUSY"] == 1 and current()["STARTING"] == 0
    metrics.set_model("resnet18", "ab" * 32, "torchscript", "fp32", False, "w1", "3")
    assert REGISTRY.get_sample_value("pinfer_worker_model_info", {
        "model": "resnet18", "sha256": "ab" * 32, "runtime": "torchscript", "precision": "fp32",
        "pretrained": "false", "worker": "w1", "core": "3"}) == 1


def test_request_id_is_echoed_stored_on_the_record_and_made_when_missing(client, store, images):
    r = client.post("/v1/predictions", data={"image": (io.BytesIO(images.jpeg()), "a.jpg")},
                    headers={"X-Request-ID": "req-abc.123"})
    assert r.status_code == 202 and r.headers["X-Request-ID"] == "req-abc.123"
    assert store.get(r.get_json()["id"]).request_id == "req-abc.123"
    # no id, or one that is not a plain token (it ends up in logs): the API makes its own
    for headers in ({}, {"X-Request-ID": "bad id; with spaces"}):
        r = client.post("/v1/predictions", data={"image": (io.BytesIO(images.jpeg()), "b.jpg")}, headers=headers)
        rid = r.headers["X-Request-ID"]
        assert len(rid) == 32 and store.get(r.get_json()["id"]).request_id == rid


def test_json_log_lines_carry_the_bound_fields():
    buf = io.StringIO()
    handler = logging.StreamHandler(buf)
    logs.attach(handler, "json")
    log = logging.getLogger("pinfer.test.json")
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    try:
        with logs.bind(request_id="r1", prediction_id="p1", job_id="j1"):
            log.info("classified", extra={"duration_ms": 12.5})
        log.info("outside")
    finally:
        log.removeHandler(handler)
    first, second = (json.loads(line) for line in buf.getvalue().splitlines())
    assert first["event"] == "classified" and first["level"] == "INFO" and first["logger"] == "pinfer.test.json"
    assert (first["request_id"], first["prediction_id"], first["job_id"], first["duration_ms"]) == \
        ("r1", "p1", "j1", 12.5)
    assert "time" in first
    assert second["event"] == "outside" and "request_id" not in second


def test_log_format_setting_is_validated():
    from shared.settings import Settings

    assert Settings.from_env({"PINFER_LOG_FORMAT": "json"}).log_format == "json"
    with pytest.raises(ValueError, match="PINFER_LOG_FORMAT"):
        Settings.from_env({"PINFER_LOG_FORMAT": "xml"})
    with pytest.raises(ValueError, match="PINFER_METRICS_PORT"):
        Settings.from_env({"PINFER_METRICS_PORT": "70000"})


def test_gunicorn_gives_each_server_an_empty_metrics_folder_and_removes_its_own(monkeypatch, tmp_path):
    import os
    import runpy
    from pathlib import Path

    conf_path = str(Path(__file__).resolve().parents[2] / "pinfer" / "gunicorn_conf.py")
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", "")  # recorded, so the hooks' value is undone afterwards
    monkeypatch.delenv("PROMETHEUS_MULTIPROC_DIR")
    # a named folder (PINFER_METRICS_DIR) is emptied: counters of an earlier run must not be merged in
    named = tmp_path / "metrics"
    named.mkdir()
    (named / "counter_1234.db").write_bytes(b"stale")
    monkeypatch.setenv("PINFER_METRICS_DIR", str(named))
    conf = runpy.run_path(conf_path)
    conf["on_starting"](None)
    assert os.environ["PROMETHEUS_MULTIPROC_DIR"] == str(named) and list(named.iterdir()) == []
    conf["on_exit"](None)
    assert named.is_dir()  # the operator's folder stays
    # by default: a fresh private folder per server, removed when the server exits
    monkeypatch.delenv("PINFER_METRICS_DIR")
    conf = runpy.run_path(conf_path)
    conf["on_starting"](None)
    fresh = Path(os.environ["PROMETHEUS_MULTIPROC_DIR"])
    assert fresh.is_dir() and fresh != named and list(fresh.iterdir()) == []
    conf["on_exit"](None)
    assert not fresh.exists()


def test_text_log_lines_append_the_bound_fields():
    buf = io.StringIO()
    handler = logging.StreamHandler(buf)
    logs.attach(handler, "text")
    log = logging.getLogger("pinfer.test.text")
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    try:
        with logs.bind(request_id="r9", prediction_id="p9"):
            log.info("classified")
        log.info("plain")
    finally:
        log.removeHandler(handler)
    first, second = buf.getvalue().splitlines()
    assert first.endswith("pinfer.test.text: classified [request_id=r9 prediction_id=p9]")
    assert second.endswith("pinfer.test.text: plain")


def test_each_worker_slot_gets_its_own_metrics_port_and_json_mode_drops_the_banner(monkeypatch):
    """Port rule: slot N of a launcher serves PINFER_METRICS_PORT + N (worker/metrics.py)."""
    import subprocess

    from shared.settings import Settings
    from worker import launcher as launcher_mod

    started = []

    class FakePopen:
        def __init__(self, cmd, env, **_):
            started.append((cmd, env))
            self.pid = 1

    monkeypatch.setattr(subprocess, "Popen", FakePopen)
    la = launcher_mod.Launcher(Settings(log_format="json"))
    for slot, core in enumerate([0, 1, 0]):
        la.spawn(launcher_mod.Child(slot=slot, core=core))
    assert [env["PINFER_WORKER_SLOT"] for _, env in started] == ["0", "1", "2"]
    assert all("--quiet" in cmd for cmd, _ in started)
    assert "--quiet" not in launcher_mod.Launcher(Settings()).command(launcher_mod.Child(slot=0, core=0))


def test_a_taken_metrics_port_is_logged_not_fatal(caplog):
    import socket

    from worker import metrics

    with socket.socket() as s:
        s.bind(("0.0.0.0", 0))
        s.listen()
        port = s.getsockname()[1]
        with caplog.at_level(logging.WARNING):
            assert metrics.serve(port, 0) is None
    assert "not started" in caplog.text
    assert metrics.serve(0, 3) is None  # 0 = off
