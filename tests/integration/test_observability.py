"""What an operator sees, from real processes: /metrics of gunicorn (2 processes) and of a worker,
one image followed through the JSON logs by its request id, and /dashboard in headless Chromium."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from pinfer.procs import free_port, wait_until
from tests.integration._images import truncated_jpeg
from tests.integration.conftest import jpeg
from tests.integration.test_web_page import browser  # noqa: F401  (the shared Chromium fixture)

pytestmark = pytest.mark.integration


def scrape(url: str) -> dict[tuple[str, tuple], float]:
    r = requests.get(url, timeout=10)
    assert r.status_code == 200, r.text
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(r.text) for s in fam.samples}


def value(samples, name: str, **labels) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def json_lines(path: Path) -> list[dict]:
    out = []
    for line in path.read_text(errors="replace").splitlines():
        if line.startswith("{"):
            try:
                out.append(json.loads(line))
            except ValueError:
                pass
    return out


@pytest.fixture(scope="module")
def observed(make_stack):
    port = free_port()
    stack = make_stack(workers=1, PINFER_METRICS_PORT=port, PINFER_LOG_FORMAT="json")
    return stack, f"http://127.0.0.1:{port}/metrics"


def test_metrics_move_as_images_are_classified_and_fail(observed):
    stack, worker_url = observed
    api_url = stack.base + "/metrics"
    w0, a0 = scrape(worker_url), scrape(api_url)
    assert value(w0, "pinfer_worker_state", state="READY") == 1
    info = [k for k in w0 if k[0] == "pinfer_worker_model_info"]
    assert info and dict(info[0][1])["pretrained"] == "false" and dict(info[0][1])["runtime"]

    good = [stack.submit(jpeg((30 * i, 90, 200)))["id"] for i in range(5)]
    bad = stack.submit(truncated_jpeg())["id"]  # the header passes the API, decoding fails in the worker
    assert [stack.result(p)["status"] for p in good] == ["succeeded"] * 5
    assert stack.result(bad)["error"]["code"] == "corrupt_image"

    w1 = scrape(worker_url)
    ok = dict(lane="interactive", outcome="succeeded", code="none")
    failed = dict(lane="interactive", outcome="failed", code="corrupt_image")
    assert value(w1, "pinfer_worker_images_total", **ok) - value(w0, "pinfer_worker_images_total", **ok) == 5
    assert value(w1, "pinfer_worker_images_total", **failed) - value(w0, "pinfer_worker_images_total", **failed) == 1
    assert value(w1, "pinfer_worker_batch_size_sum") - value(w0, "pinfer_worker_batch_size_sum") == 5
    for stage in ("preprocess", "inference"):
        name = f"pinfer_worker_{stage}_seconds_count"
        assert value(w1, name) - value(w0, name) == 5
    e2e = "pinfer_worker_end_to_end_seconds_count"
    assert value(w1, e2e, lane="interactive") - value(w0, e2e, lane="interactive") == 5

    # gunicorn runs 2 processes: every scrape (whichever process answers it) sees all 6 submissions
    route = dict(route="/v1/predictions", method="POST", status="202")
    for _ in range(4):
        a1 = scrape(api_url)
        assert value(a1, "pinfer_http_requests_total", **route) - value(a0, "pinfer_http_requests_total", **route) == 6
        assert value(a1, "pinfer_redis_up") == 1
        assert value(a1, "pinfer_workers", state="READY") + value(a1, "pinfer_workers", state="BUSY") == 1
        assert value(a1, "pinfer_pending_images") == 0
    lat = "pinfer_http_request_duration_seconds_count"
    assert value(a1, lat, route="/v1/predictions", method="POST") - \
        value(a0, lat, route="/v1/predictions", method="POST") == 6


def test_one_image_is_followed_through_the_api_and_worker_json_logs_by_its_request_id(observed):
    stack, _ = observed
    rid = "trace-me-0123456789"
    r = stack.http.post(f"{stack.base}/v1/predictions", files={"image": ("i.jpg", jpeg((1, 2, 3)))},
                        headers={"X-Request-ID": rid}, timeout=30)
    assert r.status_code == 202 and r.headers["X-Request-ID"] == rid
    pid = r.json()["id"]
    assert stack.result(pid)["status"] == "succeeded"

    def lines(name: str, event: str) -> list[dict]:
        return [x for x in json_lines(stack.workdir / name) if x.get("request_id") == rid and x.get("event") == event]

    # the worker writes its line right after storing the result; wait for the file to catch up
    wait_until(lambda: lines("workers.log", "classified"), 30, "the worker's log line")
    accepted, request = lines("api.log", "accepted"), lines("api.log", "request")
    classified = lines("workers.log", "classified")
    assert accepted[0]["prediction_id"] == pid and request[0]["status"] == 202
    assert request[0]["duration_ms"] > 0
    assert classified[0]["prediction_id"] == pid and classified[0]["worker"].startswith("pinfer-c")
    assert classified[0]["duration_ms"] > 0 and classified[0]["level"] == "INFO"
    # the launcher's own lines are JSON too
    assert any(x.get("logger") == "pinfer.launcher" for x in json_lines(stack.workdir / "workers.log"))


def test_dashboard_shows_a_bulk_job_move_until_the_queue_is_empty(make_stack, browser, tmp_path):  # noqa: F811
    stack = make_stack(workers=0)  # the worker starts once the page shows the job waiting
    page = browser.new_page(viewport={"width": 1200, "height": 1000})
    page.goto(stack.base + "/dashboard")
    page.wait_for_selector("#banner:not([hidden])")
    assert "No worker is ready" in page.inner_text("#banner")

    jid = stack.client.create_job(name="dashboard-test")["id"]
    added = stack.client.add_images(jid, [(f"img{i:03d}.jpg", jpeg((i % 250, 255 - i % 250, 60))) for i in range(60)])
    assert len(added.accepted) == 60 and not added.pending
    stack.client.close_job(jid)
    row = f'#jobs tr[data-job="{jid}"]'
    page.wait_for_selector(row)
    wait_until(lambda: page.inner_text("#queue-depth") == "60", 30, "the page showing 60 images waiting")
    # record every value the job's bar takes from now on
    page.evaluate("""() => { window.seenProgress = [];
        new MutationObserver(() => { const bar = document.querySelector('#jobs [role=progressbar]');
          if (bar) window.seenProgress.push(Number(bar.getAttribute('aria-valuenow'))); })
        .observe(document.querySelector('#jobs tbody'), {childList: true, subtree: true}); }""")

    stack.start_workers(wait=False)
    page.wait_for_function(f"""() => {{
        const bar = document.querySelector('{row} [role=progressbar]');
        return bar && bar.getAttribute('aria-valuenow') === '100.0'
            && document.querySelector('#queue-depth').textContent === '0'; }}""", timeout=180_000)
    seen = page.evaluate("window.seenProgress")
    assert seen[0] == 0 and seen[-1] == 100
    assert any(0 < v < 100 for v in seen), seen  # it moved through the middle, not straight to the end
    assert seen == sorted(seen)
    assert page.inner_text(f"{row} .count").strip() == "60 / 60"
    assert "NOT built from the official" in page.inner_text("#banner")  # ready now, but random weights
    workers = page.inner_text("#workers tbody")
    assert "READY" in workers or "BUSY" in workers
    shot = tmp_path / "dashboard.png"
    page.screenshot(path=str(shot), full_page=True)
    assert shot.stat().st_size > 10_000
    print(f"dashboard screenshot: {shot}")
