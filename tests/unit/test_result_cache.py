"""The result cache: an identical upload (same bytes, model, precision, resize, top_k) is answered from
the stored result under its own new ID without inference; the real worker code fills it."""
from __future__ import annotations

import io

import pytest

import api.cache
from shared import keys
from shared.schema import INTERACTIVE, QUEUED, SUCCEEDED
from shared.store import cache_digest
from tests.unit.test_classifier import FakeRuntime
from worker.classify import Classifier, Item

pytestmark = pytest.mark.filterwarnings("ignore:.*deprecated:DeprecationWarning")
SHA = "f" * 64  # FakeRuntime's model sha256


@pytest.fixture
def settings(settings):
    """Workers here run exact resize, as ``beat`` reports by default (fast is another cache entry)."""
    return settings.replace(resize="exact")


@pytest.fixture(autouse=True)
def no_serving_memo(monkeypatch):
    """Re-read the workers' heartbeats on every request (a roll-out is visible at once)."""
    monkeypatch.setattr(api.cache, "SERVING_TTL_S", 0.0)


def beat(store, name="w1", sha=SHA, precision="fp32", resize="exact", state="READY"):
    store.heartbeat(name, {"state": state, "model": "fake-net", "sha256": sha, "pretrained": 0,
                           "precision": precision, "resize": resize})


def classify(store, settings, pids):
    Classifier(settings, store, FakeRuntime(), "w1").run([Item(p, INTERACTIVE) for p in pids])


def post(client, data, top_k=None):
    return client.post("/v1/predictions" + (f"?top_k={top_k}" if top_k else ""), data=data,
                       content_type="image/jpeg")


def test_identical_upload_is_answered_from_the_cache_under_a_new_id(client, store, settings, recorder, images):
    beat(store)
    data = images.jpeg()
    first = post(client, data, top_k=3)
    assert first.status_code == 202 and first.get_json()["status"] == QUEUED
    classify(store, settings, recorder.pids)
    done = client.get(f"/v1/predictions/{first.get_json()['id']}").get_json()
    assert done["status"] == SUCCEEDED and done["cached"] is False

    again = post(client, data, top_k=3)
    assert again.status_code == 200, again.get_data(as_text=True)
    body = again.get_json()
    assert body["status"] == SUCCEEDED and body["cached"] is True
    assert body["id"] != done["id"] and again.headers["Location"] == f"/v1/predictions/{body['id']}"
    assert body["top_k"] == done["top_k"] and body["model"] == done["model"]
    assert len(recorder.calls) == 1, "a cache hit must not be queued"
    assert store.images([body["id"]]) == [None] and store.r.zcard(keys.PENDING) == 0
    stored = client.get(f"/v1/predictions/{body['id']}").get_json()
    assert stored["status"] == SUCCEEDED and stored["cached"] is True and stored["top_k"] == done["top_k"]

    # another top_k, or other bytes, is another result
    assert post(client, data, top_k=4).status_code == 202
    assert post(client, images.jpeg(color=(1, 2, 3)), top_k=3).status_code == 202
    assert len(recorder.calls) == 3


def test_no_hit_for_another_model_precision_or_during_a_roll_out(client, store, settings, recorder, images):
    beat(store)
    data = images.jpeg()
    post(client, data)
    classify(store, settings, recorder.pids)
    assert post(client, data).status_code == 200

    beat(store, "w2", sha="e" * 64)  # roll-out: two models served at once
    assert post(client, data).status_code == 202
    store.forget_worker("w1")  # only the new model now: the old one's results do not apply
    assert post(client, data).status_code == 202
    store.forget_worker("w2")
    beat(store, "w3", precision="bf16")
    assert post(client, data).status_code == 202
    store.forget_worker("w3")
    beat(store, "w4", resize="fast")
    assert post(client, data).status_code == 202
    store.forget_worker("w4")  # no worker at all: nothing to compare with, no hit
    assert post(client, data).status_code == 202
    beat(store, "w5")
    assert post(client, data).status_code == 200


def test_a_cached_image_in_a_job_counts_as_succeeded(client, store, settings, recorder, images):
    beat(store)
    data = images.jpeg()
    post(client, data, top_k=2)
    classify(store, settings, recorder.pids)
    jid = client.post("/v1/jobs", json={"top_k": 2}).get_json()["id"]
    resp = client.post(f"/v1/jobs/{jid}/images", data={"images": [(io.BytesIO(data), "a.jpg"),
                                                                  (io.BytesIO(images.png()), "b.png")]},
                       content_type="multipart/form-data")
    assert resp.status_code == 202, resp.get_data(as_text=True)
    acc = {a["name"]: a for a in resp.get_json()["accepted"]}
    assert acc["a.jpg"].get("cached") is True and "cached" not in acc["b.png"]
    assert recorder.pids[-1] == acc["b.png"]["id"] and len(recorder.calls) == 2
    counts = client.get(f"/v1/jobs/{jid}").get_json()["counts"]
    assert counts["total"] == 2 and counts["succeeded"] == 1 and counts["queued"] == 1
    lines = client.get(f"/v1/jobs/{jid}/results").get_data(as_text=True).splitlines()
    assert len(lines) == 1 and '"a.jpg"' in lines[0] and '"succeeded"' in lines[0]
    client.post(f"/v1/jobs/{jid}/close")
    classify(store, settings, [acc["b.png"]["id"]])
    assert client.get(f"/v1/jobs/{jid}").get_json()["status"] == "finished"


def test_cache_off_stores_nothing_and_never_hits(make_app, make_store, settings, recorder, images):
    s = settings.replace(cache_ttl_s=0)
    client, store = make_app(s).test_client(), make_store(s)
    beat(store)
    data = images.jpeg()
    pid = post(client, data).get_json()["id"]
    assert store.get(pid).content_sha is None
    classify(store, s, [pid])
    assert post(client, data).status_code == 202
    assert store.r.zcard(keys.CACHE_INDEX) == 0


def test_cache_keeps_at_most_its_bound_newest_first_and_expires(make_store, settings):
    store = make_store(settings.replace(cache_max_entries=3, cache_ttl_s=60))
    digests = [cache_digest(str(i), SHA, "fp32", "exact", 5) for i in range(5)]
    for d in digests:
        store.cache_put([(d, {"top_k": [], "n": d})])
    assert [store.cache_get(d) is not None for d in digests] == [False, False, True, True, True]
    assert store.r.zcard(keys.CACHE_INDEX) == 3
    assert 0 < store.r.ttl(keys.cache(digests[-1])) <= 60
