"""Every script of shared/lua on a real redis-server (fakeredis runs Lua through lupa, not Redis's own
interpreter and cjson): a job's life with an API key and webhooks, the cache bound, core leases, and
an Idempotency-Key whose first request died after creating its prediction."""
from __future__ import annotations

import base64
import hashlib
import io
import json

import pytest
from PIL import Image

from pinfer.procs import start_redis
from shared import keys
from shared.schema import CANCELED, FAILED, IDEM_CREATED, JOB_FINISHED, QUEUED, RUNNING, SUCCEEDED
from shared.settings import Settings
from shared.store import IdempotencyClaim, Store

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def redis_url(tmp_path_factory):
    proc, url = start_redis(tmp_path_factory.mktemp("redis"))
    yield url
    proc.stop()


@pytest.fixture
def store(redis_url) -> Store:
    s = Store(Settings(redis_url=redis_url, cache_max_entries=2, max_pending_per_key=1))
    s.r.flushdb()
    return s


def test_a_job_through_every_script(store):
    done = store.subscribe_done()
    claim = IdempotencyClaim(keys.idempotency("alice", "jobs", "k"), "fp", 201)
    store.create_job("j", "batch", 3, webhook="https://example.org/h", owner="alice", claim=claim)
    assert store.r.hgetall(claim.key) == {"fingerprint": "fp", "state": IDEM_CREATED, "id": "j", "status": "201"}
    assert store.submit("a", b"\x00img", 3, "bulk", "j", "ä 😀.jpg", owner="alice").outcome == "ok"
    with pytest.raises(Exception, match="for this API key"):  # PINFER_MAX_PENDING_PER_KEY=1
        store.submit("b", b"img", 3, "bulk", "j", "b.jpg", owner="alice")
    store.submit("bad", b"", 3, "bulk", "j", "bad.jpg", error={"code": "unsupported", "message": "no"})
    assert store.submit("again", b"img", 3, "bulk", "j", "ä 😀.jpg").id == "a"  # a resumed upload: same ID
    assert store.get("a").name == "ä 😀.jpg"  # through Redis's cjson intact
    assert store.start_run(["a"]) == [b"\x00img"] and store.get("a").runs == 0  # not running yet: not charged
    assert store.transition("a", RUNNING, (QUEUED,), {"started_at": 1.0}, True).attempts == 1
    assert store.start_run(["a"]) == [b"\x00img"] and (store.get("a").runs, store.get("a").alone_runs) == (1, 1)
    assert store.close_job("j").status == "closed"
    assert store.transition("a", SUCCEEDED, (RUNNING,), {"result": {"top_k": []}}).outcome == "ok"
    job = store.get_job("j")
    assert job.status == JOB_FINISHED and (job.counts[SUCCEEDED], job.counts[FAILED], job.counts["total"]) == (1, 1, 2)
    assert store.r.zcard(keys.key_pending("alice")) == 0 and store.r.zcard(keys.job_pending("j")) == 0
    assert store.r.lrange(keys.job_done("j"), 0, -1) == ["bad", "a"]
    assert 0 < store.r.ttl(keys.job_rate("j")) <= keys.RATE_TTL_S and store.job_rate(job) > 0
    assert store.claim_webhook(30) == keys.job_event("j")
    announced: list[str] = []
    for _ in range(20):  # blocking reads (the subscription confirmation reads as None)
        msg = done.get_message(timeout=1)
        if msg is not None:
            announced.append(msg["data"])
        if len(announced) == 2:
            break
    done.close()
    assert announced == ["bad", "a"]  # the image rejected at submit is announced by the submit script itself


def test_canceled_job_and_cache_bound_and_core_leases(store):
    store.create_job("j", None, 5)
    store.submit("q", b"img", 5, "bulk", "j", "q.jpg")
    assert store.cancel_job("j").counts[CANCELED] == 1
    store.cache_put([("d1", {"n": 1}), ("d2", {"n": 2}), ("d3", {"n": 3})])  # bound: 2 entries
    assert store.cache_get("d1") is None and store.cache_get("d3") == {"n": 3}
    assert 0 < store.r.ttl(keys.cache("d3")) <= store.settings.cache_ttl_s
    assert store.lease_core("h", "A", [0, 1], 10) == 0 and store.lease_core("h", "B", [0, 1], 10) == 1
    assert store.lease_core("h", "C", [0, 1], 10) is None and store.lease_core("h", "A", [0, 1], 10) == 0


def test_a_retry_after_the_api_died_gets_the_prediction_it_created(redis_url, monkeypatch):
    from api import create_app

    app = create_app({"SETTINGS": Settings(redis_url=redis_url), "TESTING": True})
    buf = io.BytesIO()
    Image.new("RGB", (16, 16), (1, 2, 3)).save(buf, "JPEG")

    def post():
        return app.test_client().post("/v1/predictions", data=buf.getvalue(), content_type="image/jpeg",
                                      headers={"Idempotency-Key": "crash"})

    def die(*_a, **_k):
        raise SystemExit("the API process died")
    monkeypatch.setattr("api.predictions._accepted", die)  # dies before answering ...
    monkeypatch.setattr("api.idempotency._release", lambda rkey: None)  # ... and releases nothing
    with pytest.raises(SystemExit):
        post()
    monkeypatch.undo()
    rkey = keys.idempotency("-", "predictions", hashlib.sha256(b"crash").hexdigest())
    store = Store(Settings(redis_url=redis_url))
    sent = [json.loads(base64.b64decode(json.loads(m)["body"]))[0][0]  # the task messages queued
            for m in store.r.lrange(keys.QUEUE_INTERACTIVE, 0, -1)]
    assert store.r.ttl(rkey) > keys.IDEMPOTENCY_PENDING_S  # survives the claim's expiry
    again = post()
    assert again.status_code == 202 and again.get_json()["id"] == sent[0] and len(sent) == 1
    assert again.headers["Idempotent-Replayed"] == "true"
