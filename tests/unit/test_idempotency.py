"""``Idempotency-Key``: a retried POST returns the first answer instead of creating a second thing."""
from __future__ import annotations

import hashlib

import pytest

from shared import keys
from shared.schema import IDEM_CREATED
from shared.store import IdempotencyClaim, IdempotencyKeySeen, Store
from tests.unit.helpers import assert_error


def post(client, data, key=None, top_k=None):
    headers = {"Idempotency-Key": key} if key else {}
    return client.post("/v1/predictions" + (f"?top_k={top_k}" if top_k else ""), data=data,
                       content_type="image/jpeg", headers=headers)


def test_same_key_same_image_gives_the_same_prediction_once(client, recorder, images):
    data = images.jpeg()
    first = post(client, data, "k-1")
    again = post(client, data, "k-1")
    assert first.status_code == again.status_code == 202
    assert again.get_json()["id"] == first.get_json()["id"]
    assert again.headers["Location"] == first.headers["Location"]
    assert again.headers["Idempotent-Replayed"] == "true"
    assert len(recorder.calls) == 1, "the retried POST must not queue the image again"
    # without a key, or with another key, the same image is a new prediction
    assert post(client, data).get_json()["id"] != first.get_json()["id"]
    assert post(client, data, "k-2").get_json()["id"] != first.get_json()["id"]
    assert len(recorder.calls) == 3


def test_same_key_with_another_request_is_422_idempotency_mismatch(client, recorder, images):
    assert post(client, images.jpeg(), "k").status_code == 202
    assert_error(post(client, images.png(), "k"), 422, "idempotency_mismatch")
    assert_error(post(client, images.jpeg(), "k", top_k=2), 422, "idempotency_mismatch")
    assert len(recorder.calls) == 1


def test_same_key_while_the_first_is_in_progress_is_409_with_retry_after(client, store, recorder, images):
    data = images.jpeg()
    # another API process has claimed the key and is still storing the image
    from api.idempotency import fingerprint
    rkey = keys.idempotency("-", "predictions", hashlib.sha256(b"k").hexdigest())
    fp = fingerprint("POST /v1/predictions", "5", "", hashlib.sha256(data).digest())
    assert store.idempotency_begin(rkey, fp) is None
    resp = post(client, data, "k")
    assert_error(resp, 409, "idempotency_in_progress")
    assert resp.headers["Retry-After"] == "1" and recorder.calls == []


def test_an_error_is_not_kept_so_the_retry_runs_again(make_app, make_store, settings, recorder, images):
    s = settings.replace(max_pending_images=1)
    client, store = make_app(s).test_client(), make_store(s)
    assert post(client, images.png()).status_code == 202  # fills the bound
    assert_error(post(client, images.jpeg(), "k"), 429, "overloaded")
    store.r.delete(keys.PENDING)  # capacity again
    ok = post(client, images.jpeg(), "k")
    assert ok.status_code == 202 and post(client, images.jpeg(), "k").get_json()["id"] == ok.get_json()["id"]


def test_bad_key_is_400(client, images):
    assert_error(post(client, images.jpeg(), "x" * 300), 400, "invalid_parameter")


def test_jobs_same_key_same_body_is_the_same_job(client):
    h = {"Idempotency-Key": "job-1"}
    a = client.post("/v1/jobs", json={"name": "n", "top_k": 3}, headers=h)
    b = client.post("/v1/jobs", json={"name": "n", "top_k": 3}, headers=h)
    assert a.status_code == b.status_code == 201
    assert a.get_json()["id"] == b.get_json()["id"] and a.headers["Location"] == b.headers["Location"]
    assert_error(client.post("/v1/jobs", json={"name": "other", "top_k": 3}, headers=h), 422, "idempotency_mismatch")
    assert client.post("/v1/jobs", json={"name": "n", "top_k": 3}).get_json()["id"] != a.get_json()["id"]


# --- the first request's process dies after creating the prediction, before storing its answer ----------
@pytest.fixture
def crash(monkeypatch):
    """While on, the API process "dies" right after the store created the thing: the answer is never
    stored and the claim never released (a dead process does neither). Call it to revive the API."""
    def die(*_a, **_k):
        raise SystemExit("the API process died")
    monkeypatch.setattr(Store, "idempotency_finish", die)  # a job's answer is stored verbatim
    monkeypatch.setattr("api.predictions._accepted", die)  # a prediction's is rebuilt from its record
    monkeypatch.setattr("api.idempotency._release", lambda rkey: None)
    return monkeypatch.undo


def test_the_submit_script_records_the_id_under_the_key_beyond_the_claims_expiry(client, store, recorder, images,
                                                                                  crash):
    with pytest.raises(SystemExit):
        post(client, images.jpeg(), "k")
    [(pid, _)] = recorder.calls
    rkey = keys.idempotency("-", "predictions", hashlib.sha256(b"k").hexdigest())
    rec = store.r.hgetall(rkey)
    assert (rec["state"], rec["id"], rec["status"]) == (IDEM_CREATED, pid, "202")
    # kept as long as the prediction: the 60 s claim expiry used to let a retry create a second one
    assert store.r.ttl(rkey) > keys.IDEMPOTENCY_PENDING_S


def test_a_retry_after_the_first_process_died_gets_the_same_prediction(client, store, recorder, images, crash):
    data = images.jpeg()
    with pytest.raises(SystemExit):
        post(client, data, "k", top_k=3)
    crash()  # a fresh process answers the retry
    [(pid, _)] = recorder.calls
    again = post(client, data, "k", top_k=3)
    assert again.status_code == 202 and again.headers["Idempotent-Replayed"] == "true"
    body = again.get_json()
    assert (body["id"], body["status"], body["top_k"]) == (pid, "queued", 3)
    assert body["created_at"] == store.get(pid).created_at and again.headers["Location"].endswith(pid)
    assert len(recorder.calls) == 1 and len(store.r.keys(keys.prediction("*"))) == 1, "no second prediction"
    assert_error(post(client, images.png(), "k", top_k=3), 422, "idempotency_mismatch")


def test_a_job_created_by_a_process_that_died_is_the_answer_to_the_retry(client, store, crash):
    h = {"Idempotency-Key": "job-k"}
    with pytest.raises(SystemExit):
        client.post("/v1/jobs", json={"name": "n"}, headers=h)
    crash()
    [jid] = store.r.zrange(keys.JOBS, 0, -1)
    again = client.post("/v1/jobs", json={"name": "n"}, headers=h)
    assert again.status_code == 201 and again.get_json()["id"] == jid and again.headers["Location"].endswith(jid)
    assert again.headers["Idempotent-Replayed"] == "true" and store.r.zcard(keys.JOBS) == 1


def test_an_error_after_creating_keeps_the_key_so_the_retry_gets_that_prediction(make_app, make_store, settings,
                                                                                 recorder, images):
    # PINFER_REDIS_WAIT_REPLICAS without replicas: stored, then 503 because no replica acknowledged it
    s = settings.replace(redis_wait_replicas=1, redis_wait_timeout_ms=1)
    client, store = make_app(s).test_client(), make_store(s)
    data = images.jpeg()
    assert_error(post(client, data, "k"), 503, "service_unavailable")
    [pid] = store.r.zrange(keys.PENDING, 0, -1)  # stored (not yet published: the sweeper will)
    again = post(client, data, "k")
    assert again.status_code == 202 and again.get_json()["id"] == pid
    assert store.r.zcard(keys.PENDING) == 1, "the retry must not store the image a second time"


def test_the_submit_script_claims_the_key_and_creates_in_one_step(store):
    """A key another request holds (any state) is neither overwritten nor joined by a second
    prediction: the script answers with what it holds and creates nothing."""
    store.r.hset("pinfer:idem:x", mapping={"fingerprint": "other", "state": "pending"})
    with pytest.raises(IdempotencyKeySeen) as seen:
        store.submit("p1", b"img", 5, claim=IdempotencyClaim("pinfer:idem:x", "mine", 202))
    assert (seen.value.record["fingerprint"], seen.value.record["state"]) == ("other", "pending")
    assert store.r.hgetall("pinfer:idem:x") == {"fingerprint": "other", "state": "pending"}
    assert store.get("p1") is None and not store.r.exists(keys.image("p1"))
    store.submit("p2", b"img", 5, claim=IdempotencyClaim("pinfer:idem:y", "mine", 202))
    assert store.r.hgetall("pinfer:idem:y") == {"fingerprint": "mine", "state": IDEM_CREATED, "id": "p2",
                                                "status": "202"}
    assert store.idempotency_abort("pinfer:idem:y") is False and store.r.exists("pinfer:idem:y")
    assert store.idempotency_abort("pinfer:idem:x") is True and not store.r.exists("pinfer:idem:x")
