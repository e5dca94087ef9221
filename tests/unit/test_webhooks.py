"""Webhook registration: which URLs the API accepts, and what a client reads back.

Delivery, retries and signatures run against a real receiver in tests/integration/test_webhooks.py.
"""
from __future__ import annotations

import dataclasses
import io

import pytest

from shared import keys
from shared.errors import InvalidWebhook
from shared.webhooks import check_url

SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"


@pytest.mark.parametrize("url", [
    "http://127.0.0.1/hook", "http://localhost:8080/hook", "http://10.0.0.5/", "https://192.168.1.1/",
    "http://172.16.0.1/", "http://169.254.169.254/latest/meta-data/", "http://[::1]/", "http://[fe80::1]/",
    "http://[fc00::1]/", "http://100.64.0.1/", "http://0.0.0.0/", "http://[::ffff:127.0.0.1]/",
])
def test_private_loopback_and_link_local_urls_are_refused_without_the_setting(url):
    with pytest.raises(InvalidWebhook, match="PINFER_WEBHOOK_ALLOW_PRIVATE"):
        check_url(url, allow_private=False)
    assert check_url(url, allow_private=True) == url


@pytest.mark.parametrize("url", ["ftp://example.com/", "http:///path", "file:///etc/passwd", "http://u:p@8.8.8.8/",
                                 "http://8.8.8.8:99999/", "not a url", "http://no-such-host.invalid/"])
def test_malformed_or_unresolvable_urls_are_refused(url):
    with pytest.raises(InvalidWebhook):
        check_url(url, allow_private=True)


def test_a_public_address_is_accepted():
    assert check_url("https://8.8.8.8/hooks/pinfer", allow_private=False) == "https://8.8.8.8/hooks/pinfer"


def test_a_prediction_registers_a_webhook_from_the_form_or_the_query(make_app, settings, images, store):
    client = make_app(dataclasses.replace(settings, webhook_secret=SECRET, webhook_allow_private=True)).test_client()
    form = client.post("/v1/predictions", data={"image": (io.BytesIO(images.jpeg()), "a.jpg"),
                                                "webhook": "http://127.0.0.1:9/hook"})
    raw = client.post("/v1/predictions?webhook=http://127.0.0.1:9/raw", data=images.jpeg(),
                      content_type="image/jpeg")
    for resp, url in ((form, "http://127.0.0.1:9/hook"), (raw, "http://127.0.0.1:9/raw")):
        assert resp.status_code == 202, resp.get_json()
        body = client.get(f"/v1/predictions/{resp.get_json()['id']}").get_json()
        assert body["webhook"] == {"url": url, "status": "waiting", "attempts": []}
    # No event before the prediction is terminal.
    assert store.r.llen(keys.WEBHOOK_OUTBOX) == 0


def test_registration_refuses_private_urls_and_needs_a_secret(make_app, settings, images, recorder):
    strict = make_app(dataclasses.replace(settings, webhook_secret=SECRET)).test_client()
    resp = strict.post("/v1/predictions?webhook=http://127.0.0.1/hook", data=images.jpeg(), content_type="image/jpeg")
    assert resp.status_code == 400 and resp.get_json()["error"]["code"] == "invalid_webhook"
    resp = strict.post("/v1/jobs", json={"webhook": "http://169.254.169.254/"})
    assert resp.status_code == 400 and resp.get_json()["error"]["code"] == "invalid_webhook"
    resp = strict.post("/v1/jobs", json={"webhook": 5})
    assert resp.status_code == 400 and resp.get_json()["error"]["code"] == "invalid_webhook"
    disabled = make_app(settings).test_client()                       # no PINFER_WEBHOOK_SECRET
    resp = disabled.post("/v1/predictions?webhook=https://8.8.8.8/", data=images.jpeg(), content_type="image/jpeg")
    assert resp.status_code == 400 and "PINFER_WEBHOOK_SECRET" in resp.get_json()["error"]["message"]
    assert recorder.calls == []                                       # nothing was accepted


def test_terminal_transitions_queue_exactly_one_event(settings, store, images):
    store.submit("p1", images.jpeg(), 3, webhook="http://127.0.0.1/hook")
    store.submit("p2", images.jpeg(), 3)
    for pid in ("p1", "p2"):
        store.transition(pid, "running", ["queued"], {}, bump_attempts=True)
        store.transition(pid, "succeeded", ["running"], {"result": {"top_k": []}})
        store.transition(pid, "succeeded", ["running"], {"result": {"top_k": []}})   # a duplicate delivery
    assert store.r.lrange(keys.WEBHOOK_OUTBOX, 0, -1) == ["p:p1"]
    assert store.get("p1").public()["webhook"]["status"] == "pending"


def test_a_job_event_is_queued_when_it_finishes_or_is_canceled(store, images):
    store.create_job("j1", None, 3, webhook="http://127.0.0.1/hook")
    store.close_job("j1")                                              # empty job: finished at once
    store.create_job("j2", None, 3, webhook="http://127.0.0.1/hook")
    store.submit("j2-a", images.jpeg(), 3, lane="bulk", job_id="j2", name="a")
    store.cancel_job("j2")
    assert store.r.lrange(keys.WEBHOOK_OUTBOX, 0, -1) == ["j:j1", "j:j2"]
