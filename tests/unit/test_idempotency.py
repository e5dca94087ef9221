"""``Idempotency-Key``: a retried POST returns the first answer instead of creating a second thing."""
from __future__ import annotations

import hashlib

from shared import keys
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
