"""Webhooks against a real receiver on loopback (hence PINFER_WEBHOOK_ALLOW_PRIVATE=1 where it must
connect), a real redis-server, and the Standard Webhooks library verifying every signature.

The delivery attempts are driven with ``Deliverer.deliver_one`` (the loop body of the launcher's
delivery threads), so the tests need no sleeps; the last test runs the whole path through the API
and a real ``pinfer worker``.
"""
from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import requests
from standardwebhooks import Webhook

from pinfer.procs import free_port, start_redis, wait_until
from shared.schema import QUEUED, RUNNING, SUCCEEDED
from shared.settings import Settings
from shared.store import Store
from shared.webhooks import guarded_session
from tests.integration.conftest import jpeg
from worker.webhooks import Deliverer

pytestmark = pytest.mark.integration
SECRET = "whsec_" + "MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"


class Receiver:
    """An HTTP server on loopback answering scripted statuses (then 200) and keeping every request."""

    def __init__(self, statuses=()):
        self.statuses = list(statuses)
        self.requests: list[tuple[dict, bytes]] = []
        self.answered_ok = threading.Event()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers["content-length"]))
                outer.requests.append((dict(self.headers), body))
                status = outer.statuses.pop(0) if outer.statuses else 200
                self.send_response(status)
                self.send_header("content-length", "0")
                self.end_headers()
                if status == 200:
                    outer.answered_ok.set()

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture(scope="module")
def redis_url(tmp_path_factory):
    proc, url = start_redis(tmp_path_factory.mktemp("redis"))
    yield url
    proc.stop()


def settings_for(url: str, **over) -> Settings:
    env = {"PINFER_REDIS_URL": url, "PINFER_WEBHOOK_SECRET": SECRET, "PINFER_WEBHOOK_ALLOW_PRIVATE": "1",
           "PINFER_WEBHOOK_BACKOFF_S": "0.05", "PINFER_WEBHOOK_MAX_ATTEMPTS": "4", "PINFER_WEBHOOK_TIMEOUT_S": "5"}
    env.update(over)
    return Settings.from_env(env)


def finished_prediction(store: Store, hook: str) -> str:
    """A prediction that a worker has just classified (the same store calls a worker makes)."""
    pid = f"wh{time.monotonic_ns()}"
    store.submit(pid, jpeg(), 3, webhook=hook)
    store.transition(pid, RUNNING, [QUEUED], {"started_at": time.time()}, bump_attempts=True)
    store.transition(pid, SUCCEEDED, [RUNNING], {"finished_at": time.time(), "result": {"top_k": []}})
    return pid


def deliver_until_settled(deliverer: Deliverer, get, timeout: float = 30) -> dict:
    """Run delivery attempts (waiting out the backoff) until the webhook is delivered or failed."""
    session = guarded_session(deliverer.settings.webhook_allow_private)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        hook = get()["webhook"]
        if hook["status"] in ("delivered", "failed"):
            return hook
        if not deliverer.deliver_one(session):
            deliverer.stopped.wait(0.02)   # the next attempt is not due yet (backoff)
    raise AssertionError(f"webhook still {get()['webhook']} after {timeout}s")


def test_a_receiver_answering_500_twice_gets_the_event_a_third_time_signed(redis_url):
    s = settings_for(redis_url)
    store = Store(s)
    rx = Receiver([500, 500])
    try:
        pid = finished_prediction(store, rx.url)
        hook = deliver_until_settled(Deliverer(s, store), lambda: store.get(pid).public())
    finally:
        rx.close()
    assert hook["status"] == "delivered"
    assert [(a["n"], a["status_code"]) for a in hook["attempts"]] == [(1, 500), (2, 500), (3, 200)]
    assert len(rx.requests) == 3
    assert len({h["webhook-id"] for h, _ in rx.requests}) == 1      # one event: receivers can dedupe
    for headers, body in rx.requests:
        event = Webhook(SECRET).verify(body, headers)                # raises unless signed with the secret
        assert event["type"] == "prediction.completed"
        assert event["data"]["id"] == pid and event["data"]["status"] == SUCCEEDED
    with pytest.raises(Exception):
        Webhook("whsec_" + "b3RoZXIgc2VjcmV0IG9mIDI0IGJ5dGVz").verify(rx.requests[0][1], rx.requests[0][0])


def test_a_receiver_that_is_down_gets_max_attempts_then_the_webhook_fails(redis_url):
    s = settings_for(redis_url, PINFER_WEBHOOK_MAX_ATTEMPTS="3")
    store = Store(s)
    closed = f"http://127.0.0.1:{free_port()}/hook"                    # nothing listens there
    pid = finished_prediction(store, closed)
    hook = deliver_until_settled(Deliverer(s, store), lambda: store.get(pid).public())
    assert hook["status"] == "failed"
    assert [a["n"] for a in hook["attempts"]] == [1, 2, 3]
    assert all("refused" in a["error"].lower() and "status_code" not in a for a in hook["attempts"])
    # Exponential backoff: each wait doubles (the scheduled waits, not measured durations).
    assert [a.get("retry_in_s") for a in hook["attempts"]] == [0.05, 0.1, None]


def test_a_private_address_is_refused_at_connect_time(redis_url):
    """Registered while private addresses were allowed (or DNS changed since): the deliverer still
    refuses to connect to loopback without the setting; nothing reaches the receiver."""
    store = Store(settings_for(redis_url))
    rx = Receiver()
    try:
        pid = finished_prediction(store, rx.url.replace("127.0.0.1", "localhost"))
        strict = settings_for(redis_url, PINFER_WEBHOOK_ALLOW_PRIVATE="0", PINFER_WEBHOOK_MAX_ATTEMPTS="1")
        hook = deliver_until_settled(Deliverer(strict, Store(strict)), lambda: store.get(pid).public())
    finally:
        rx.close()
    assert hook["status"] == "failed" and rx.requests == []
    assert "RefusedAddress" in hook["attempts"][0]["error"]


def test_a_job_reports_when_it_finishes(redis_url):
    s = settings_for(redis_url)
    store = Store(s)
    rx = Receiver()
    try:
        jid = f"job{time.monotonic_ns()}"
        store.create_job(jid, "photos", 3, webhook=rx.url)
        pid = f"{jid}-0"
        store.submit(pid, jpeg(), 3, lane="bulk", job_id=jid, name="a.jpg")
        store.close_job(jid)
        assert store.get_job(jid).webhook["status"] == "waiting"          # not finished yet: no event
        store.transition(pid, RUNNING, [QUEUED], {}, bump_attempts=True)
        store.transition(pid, SUCCEEDED, [RUNNING], {"finished_at": time.time(), "result": {"top_k": []}})
        hook = deliver_until_settled(Deliverer(s, store), lambda: store.get_job(jid).public())
    finally:
        rx.close()
    assert hook["status"] == "delivered" and len(rx.requests) == 1
    event = Webhook(SECRET).verify(rx.requests[0][1], rx.requests[0][0])
    assert event["type"] == "job.finished"
    assert event["data"]["id"] == jid and event["data"]["counts"]["succeeded"] == 1


def test_end_to_end_the_worker_delivers_a_prediction_webhook(make_stack):
    rx = Receiver([503])
    try:
        stack = make_stack(workers=1, PINFER_WEBHOOK_SECRET=SECRET, PINFER_WEBHOOK_ALLOW_PRIVATE="1",
                           PINFER_WEBHOOK_BACKOFF_S="0.2")
        r = requests.post(f"{stack.base}/v1/predictions", files={"image": ("a.jpg", jpeg())},
                          data={"webhook": rx.url}, timeout=30)
        assert r.status_code == 202, r.text
        pid = r.json()["id"]
        assert stack.result(pid)["status"] == SUCCEEDED
        assert rx.answered_ok.wait(30), rx.requests       # the launcher's delivery threads got it there

        def record() -> dict:
            return stack.http.get(f"{stack.base}/v1/predictions/{pid}", timeout=10).json()
        # The attempt is recorded just after the receiver answered.
        wait_until(lambda: record()["webhook"]["status"] != "pending", 10, "attempt recorded")
        body = record()
    finally:
        rx.close()
    assert body["webhook"]["status"] == "delivered", body["webhook"]
    assert [a["status_code"] for a in body["webhook"]["attempts"]] == [503, 200]
    event = Webhook(SECRET).verify(rx.requests[-1][1], rx.requests[-1][0])
    assert event["data"]["id"] == pid and event["data"]["top_k"] == body["top_k"]
