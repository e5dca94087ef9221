"""``/v1/predictions``, health and the page, through the Flask test client on fakeredis.

Every documented answer of docs/http-api.md is checked with its status *and* its machine code, and
refused requests are checked to leave nothing behind (no record, no bytes, no task).
"""
from __future__ import annotations

import io
import threading
import time

import fakeredis
import pytest

from shared import keys
from shared.schema import FAILED, QUEUED, RUNNING, SUCCEEDED
from shared.store import Store

from tests.unit.helpers import ID_RE, assert_error


def prediction_keys(store) -> list[str]:
    return sorted(store.r.scan_iter(match=keys.prediction("*")))


def multipart(data: bytes, **fields) -> dict:
    return {"image": (io.BytesIO(data), "photo.jpg"), **fields}


def succeed(store, pid: str, top_k: int = 2) -> dict:
    """Drive a prediction to succeeded the way a worker does (claim, then store the result)."""
    assert store.transition(pid, RUNNING, (QUEUED, RUNNING), {"started_at": time.time()}, True).outcome == "ok"
    result = {"top_k": [{"label": "tench", "class_index": 0, "score": 0.75},
                        {"label": "goldfish", "class_index": 1, "score": 0.25}][:top_k],
              "model": {"name": "resnet18", "sha256": "abc", "pretrained": True, "precision": "fp32"},
              "timings": {"queued_ms": 1.0, "inference_ms": 2.0, "batch_size": 1, "total_ms": 3.5}}
    assert store.transition(pid, SUCCEEDED, (RUNNING,), {"result": result, "finished_at": time.time()}).outcome == "ok"
    return result


# --- submit ------------------------------------------------------------------------------------
def test_submit_multipart_is_accepted_stored_and_its_id_enqueued_on_the_interactive_lane(
        client, store, recorder, images):
    jpg = images.jpeg()
    resp = client.post("/v1/predictions", data=multipart(jpg), content_type="multipart/form-data")

    assert resp.status_code == 202, resp.get_data(as_text=True)
    body = resp.get_json()
    pid = body["id"]
    assert ID_RE.match(pid), pid
    assert resp.headers["Location"] == f"/v1/predictions/{pid}"
    assert body["status"] == "queued" and body["top_k"] == 5
    assert body["links"] == {"self": f"/v1/predictions/{pid}"}
    assert abs(body["created_at"] - time.time()) < 60

    rec = store.get(pid)
    assert rec is not None and rec.status == QUEUED and rec.lane == "interactive" and rec.top_k == 5
    assert store.images([pid]) == [jpg]
    assert store.r.zscore(keys.PENDING, pid) is not None
    # the ID is published, never the bytes
    assert recorder.calls == [(pid, "interactive")]


def test_submitted_ids_are_distinct(client, recorder, images):
    ids = {client.post("/v1/predictions", data=images.jpeg(), content_type="image/jpeg").get_json()["id"]
           for _ in range(5)}
    assert len(ids) == 5 and all(ID_RE.match(i) for i in ids)
    assert sorted(recorder.pids) == sorted(ids)


@pytest.mark.parametrize("content_type", ["image/jpeg", "application/octet-stream",
                                          "application/x-www-form-urlencoded"])
def test_raw_body_submit_stores_the_exact_bytes_whatever_the_content_type(client, store, recorder, images,
                                                                          content_type):
    jpg = images.jpeg()
    resp = client.post("/v1/predictions?top_k=3", data=jpg, content_type=content_type)

    assert resp.status_code == 202, resp.get_data(as_text=True)
    pid = resp.get_json()["id"]
    assert resp.get_json()["top_k"] == 3
    # a form content type must not make the image body be parsed (and consumed) as a form
    assert store.images([pid]) == [jpg]
    assert store.get(pid).top_k == 3
    assert recorder.calls == [(pid, "interactive")]


def test_raw_body_with_form_content_type_ignores_form_looking_bytes(client, store, images):
    """A body that happens to look like ``top_k=7`` is not a form field: it is an (unsupported) image."""
    resp = client.post("/v1/predictions", data=b"top_k=7&image=x",
                       content_type="application/x-www-form-urlencoded")
    assert_error(resp, 415, "unsupported_format")
    assert prediction_keys(store) == []


def test_top_k_from_query_and_from_form_field(client, store, images):
    r1 = client.post("/v1/predictions?top_k=1", data=multipart(images.jpeg()), content_type="multipart/form-data")
    r2 = client.post("/v1/predictions", data=multipart(images.jpeg(), top_k="20"),
                     content_type="multipart/form-data")
    assert r1.status_code == r2.status_code == 202
    assert r1.get_json()["top_k"] == 1 and store.get(r1.get_json()["id"]).top_k == 1
    assert r2.get_json()["top_k"] == 20 and store.get(r2.get_json()["id"]).top_k == 20


@pytest.mark.parametrize("value", ["0", "21", "abc", "-1", "2.5"])
@pytest.mark.parametrize("where", ["query", "form"])
def test_bad_top_k_is_invalid_parameter_and_nothing_is_kept(client, store, recorder, images, value, where):
    if where == "query":
        resp = client.post(f"/v1/predictions?top_k={value}", data=multipart(images.jpeg()),
                           content_type="multipart/form-data")
    else:
        resp = client.post("/v1/predictions", data=multipart(images.jpeg(), top_k=value),
                           content_type="multipart/form-data")
    assert_error(resp, 400, "invalid_parameter")
    assert prediction_keys(store) == [] and recorder.calls == []


def test_empty_raw_body_is_missing_image(client, store, recorder):
    assert_error(client.post("/v1/predictions", data=b"", content_type="image/jpeg"), 400, "missing_image")
    assert_error(client.post("/v1/predictions"), 400, "missing_image")
    assert prediction_keys(store) == [] and recorder.calls == []


def test_multipart_without_image_field_is_missing_image(client, store, recorder, images):
    resp = client.post("/v1/predictions", data={"file": (io.BytesIO(images.jpeg()), "x.jpg"), "top_k": "3"},
                       content_type="multipart/form-data")
    assert_error(resp, 400, "missing_image")
    assert prediction_keys(store) == [] and recorder.calls == []


@pytest.mark.parametrize("how", ["raw_just_over", "raw_far_over", "multipart", "multipart_far_over"])
def test_upload_over_the_byte_limit_is_image_too_large(make_app, settings, make_store, recorder, images, how):
    s = settings.replace(max_upload_bytes=1000)
    client, store = make_app(s).test_client(), make_store(s)
    jpg = images.jpeg()
    if how == "raw_just_over":
        resp = client.post("/v1/predictions", data=jpg + b"\0" * (1001 - len(jpg)), content_type="image/jpeg")
    elif how == "raw_far_over":
        resp = client.post("/v1/predictions", data=jpg + b"\0" * 200_000, content_type="image/jpeg")
    elif how == "multipart":
        resp = client.post("/v1/predictions", data=multipart(jpg + b"\0" * 5000), content_type="multipart/form-data")
    else:
        resp = client.post("/v1/predictions", data=multipart(jpg + b"\0" * 200_000),
                           content_type="multipart/form-data")
    assert_error(resp, 413, "image_too_large")
    assert prediction_keys(store) == [] and recorder.calls == []


def test_upload_at_exactly_the_byte_limit_is_accepted(make_app, settings, images):
    jpg = images.jpeg()
    client = make_app(settings.replace(max_upload_bytes=len(jpg))).test_client()
    assert client.post("/v1/predictions", data=jpg, content_type="image/jpeg").status_code == 202


def test_header_declaring_80m_pixels_is_too_many_pixels(client, store, recorder, images):
    resp = client.post("/v1/predictions", data=images.png_header(1, 80_000_000), content_type="image/png")
    assert_error(resp, 413, "too_many_pixels")
    assert prediction_keys(store) == [] and recorder.calls == []


@pytest.mark.parametrize("data", [b"just some text, not an image\n",
                                  b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nshowpage\n"],
                         ids=["text", "eps"])
def test_non_image_is_unsupported_format(client, store, recorder, data):
    resp = client.post("/v1/predictions", data=multipart(data), content_type="multipart/form-data")
    assert_error(resp, 415, "unsupported_format")
    assert prediction_keys(store) == [] and recorder.calls == []


def test_strip_image_is_bad_aspect_ratio(client, store, recorder, images):
    resp = client.post("/v1/predictions", data=images.png((4000, 10)), content_type="image/png")
    assert_error(resp, 422, "bad_aspect_ratio")
    assert prediction_keys(store) == [] and recorder.calls == []


def test_global_pending_bound_answers_429_with_retry_after_and_keeps_nothing(make_app, settings, make_store,
                                                                              recorder, images):
    s = settings.replace(max_pending_images=1, retry_after_s=7)
    client, store = make_app(s).test_client(), make_store(s)
    first = client.post("/v1/predictions", data=images.jpeg(), content_type="image/jpeg")
    assert first.status_code == 202

    refused = client.post("/v1/predictions", data=images.jpeg(), content_type="image/jpeg")
    assert_error(refused, 429, "overloaded")
    assert refused.headers["Retry-After"] == "7"
    assert prediction_keys(store) == [keys.prediction(first.get_json()["id"])]
    assert recorder.pids == [first.get_json()["id"]]
    assert store.r.zcard(keys.PENDING) == 1

    # once the first one is classified there is room again
    succeed(store, first.get_json()["id"])
    assert client.post("/v1/predictions", data=images.jpeg(), content_type="image/jpeg").status_code == 202


def test_broker_failure_still_accepts_and_leaves_the_record_for_the_sweeper(client, store, recorder, images):
    """The bytes are stored before the publish: a failed publish must not lose the image. It stays
    queued with no message, counted in the pending set, which is what the sweeper republishes."""
    recorder.error = ConnectionError("broker down")
    resp = client.post("/v1/predictions", data=images.jpeg(), content_type="image/jpeg")

    assert resp.status_code == 202
    pid = resp.get_json()["id"]
    rec = store.get(pid)
    assert rec.status == QUEUED and rec.attempts == 0
    assert store.r.zscore(keys.PENDING, pid) is not None
    assert store.images([pid])[0] is not None
    assert recorder.calls == []


def test_redis_down_is_503_service_unavailable_with_retry_after(make_app, settings, recorder, images):
    down = fakeredis.FakeServer()
    down.connected = False
    client = make_app(settings.replace(retry_after_s=4), redis_server=down).test_client()

    refused = client.post("/v1/predictions", data=images.jpeg(), content_type="image/jpeg")
    assert_error(refused, 503, "service_unavailable")
    assert refused.headers["Retry-After"] == "4"
    assert_error(client.get("/v1/predictions/AAAAAAAAAAAAAAAAAAAAAA"), 503, "service_unavailable")
    assert recorder.calls == []
    ready = client.get("/readyz")
    assert ready.status_code == 503 and ready.get_json()["redis"] is False
    assert client.get("/healthz").status_code == 200


# --- get / long-poll -------------------------------------------------------------------------------
def _submit(client, images) -> str:
    resp = client.post("/v1/predictions", data=images.jpeg(), content_type="image/jpeg")
    assert resp.status_code == 202
    return resp.get_json()["id"]


def test_unknown_prediction_is_404_not_found(client):
    assert_error(client.get("/v1/predictions/nope"), 404, "not_found")
    assert_error(client.get("/v1/predictions/AAAAAAAAAAAAAAAAAAAAAA?wait=1"), 404, "not_found")


def test_get_reports_queued_then_the_stored_result(client, store, images):
    pid = _submit(client, images)
    queued = client.get(f"/v1/predictions/{pid}")
    assert queued.status_code == 200
    body = queued.get_json()
    assert body["id"] == pid and body["status"] == "queued" and body["attempts"] == 0
    assert body["job_id"] is None and body["name"] is None and body["finished_at"] is None

    result = succeed(store, pid)
    done = client.get(f"/v1/predictions/{pid}").get_json()
    assert done["status"] == "succeeded"
    assert done["top_k"] == result["top_k"]
    assert done["model"] == result["model"]
    assert done["timings"] == result["timings"]
    assert done["attempts"] == 1
    assert done["created_at"] <= done["started_at"] <= done["finished_at"]
    assert "error" not in done


def test_get_of_a_failed_prediction_carries_the_error(client, store, images):
    pid = _submit(client, images)
    store.transition(pid, FAILED, (QUEUED,), {"error_code": "corrupt_image", "error_message": "truncated",
                                             "finished_at": time.time()})
    body = client.get(f"/v1/predictions/{pid}").get_json()
    assert body["status"] == "failed"
    assert body["error"] == {"code": "corrupt_image", "message": "truncated"}


@pytest.mark.parametrize("wait", ["-1", "31", "x", "nan"])
def test_bad_wait_is_invalid_parameter(client, images, wait):
    pid = _submit(client, images)
    assert_error(client.get(f"/v1/predictions/{pid}?wait={wait}"), 400, "invalid_parameter")


def test_long_poll_returns_as_soon_as_the_prediction_finishes(app, client, store, images):
    """The GET re-reads the record after registering its waiter; the result is stored only after that
    re-read, so only the done-channel notification can end the wait early."""
    pid = _submit(client, images)
    ext = app.extensions["pinfer"]
    reread = threading.Event()
    real_get, calls = ext.store.get, []

    def spy_get(p):
        rec = real_get(p)
        calls.append(rec.status if rec else None)
        if len(calls) == 2:  # the re-read after the waiter is registered
            reread.set()
        return rec

    ext.store.get = spy_get

    def finish():
        assert reread.wait(10)
        succeed(store, pid)

    t = threading.Thread(target=finish)
    t.start()
    t0 = time.monotonic()
    resp = client.get(f"/v1/predictions/{pid}?wait=10")
    elapsed = time.monotonic() - t0
    t.join(10)

    assert resp.status_code == 200
    assert resp.get_json()["status"] == "succeeded"
    assert calls[:2] == ["queued", "queued"]  # it really was waiting when the result arrived
    assert elapsed < 4, elapsed  # well before S=10 and before the 5 s safety re-read


def test_long_poll_on_a_finished_prediction_answers_at_once(client, store, images):
    pid = _submit(client, images)
    succeed(store, pid)
    t0 = time.monotonic()
    assert client.get(f"/v1/predictions/{pid}?wait=10").get_json()["status"] == "succeeded"
    assert time.monotonic() - t0 < 4


def test_waiter_cap_makes_wait_answer_at_once_with_the_current_status(make_app, settings, images):
    client = make_app(settings.replace(max_waiters=0)).test_client()
    pid = _submit(client, images)
    t0 = time.monotonic()
    resp = client.get(f"/v1/predictions/{pid}?wait=10")
    assert resp.status_code == 200 and resp.get_json()["status"] == "queued"
    assert time.monotonic() - t0 < 4


def test_long_poll_times_out_with_the_current_status(client, images):
    pid = _submit(client, images)
    t0 = time.monotonic()
    resp = client.get(f"/v1/predictions/{pid}?wait=0.2")
    assert resp.get_json()["status"] == "queued"
    assert 0.2 <= time.monotonic() - t0 < 4



# --- submit and wait in one request: POST ?wait=S ----------------------------------------------------
def test_submit_with_wait_answers_200_with_the_result_when_it_finishes_in_time(client, store, images,
                                                                               monkeypatch):
    """A worker that finishes the image the moment the submit script has queued it (before the POST
    even starts to wait): only a waiter registered before the script can end the wait before the 5 s
    safety re-read."""
    published = []
    submit = Store.submit

    def and_a_worker_finishes_it(self, pid, *a, **kw):
        sub = submit(self, pid, *a, **kw)
        published.append(pid)
        succeed(store, pid)
        return sub

    monkeypatch.setattr(Store, "submit", and_a_worker_finishes_it)
    t0 = time.monotonic()
    resp = client.post("/v1/predictions?wait=10", data=images.jpeg(), content_type="image/jpeg")
    elapsed = time.monotonic() - t0

    assert resp.status_code == 200, resp.get_data(as_text=True)
    body = resp.get_json()
    assert body["status"] == "succeeded" and body["id"] == published[0]
    assert body["top_k"][0]["label"] == "tench" and body["timings"]["batch_size"] == 1
    assert resp.headers["Location"] == f"/v1/predictions/{body['id']}" == body["links"]["self"]
    assert elapsed < 4, elapsed


def test_submit_with_wait_answers_202_as_before_when_the_result_is_late(client, store, recorder, images):
    t0 = time.monotonic()
    resp = client.post("/v1/predictions?wait=0.2", data=multipart(images.jpeg()), content_type="multipart/form-data")
    assert resp.status_code == 202
    body = resp.get_json()
    assert body["status"] == "queued" and resp.headers["Location"] == f"/v1/predictions/{body['id']}"
    assert recorder.pids == [body["id"]] and store.get(body["id"]).status == QUEUED
    assert 0.2 <= time.monotonic() - t0 < 4


@pytest.mark.parametrize("wait", ["-1", "31", "x"])
def test_submit_with_a_bad_wait_is_invalid_parameter_and_keeps_nothing(client, store, recorder, images, wait):
    assert_error(client.post(f"/v1/predictions?wait={wait}", data=images.jpeg()), 400, "invalid_parameter")
    assert prediction_keys(store) == [] and recorder.calls == []


def test_submit_with_wait_at_the_waiter_cap_answers_202_at_once(make_app, settings, images):
    client = make_app(settings.replace(max_waiters=0)).test_client()
    t0 = time.monotonic()
    resp = client.post("/v1/predictions?wait=10", data=images.jpeg())
    assert resp.status_code == 202 and resp.get_json()["status"] == "queued"
    assert resp.headers["Retry-After"] == "1"
    assert time.monotonic() - t0 < 4


def test_retried_submit_with_wait_replays_the_first_answer(client, store, recorder, images):
    """The idempotency record keeps what the submission created (the 202 with its ID), never a
    second prediction, whatever the retry waits for."""
    headers = {"Idempotency-Key": "retry-1"}
    first = client.post("/v1/predictions?wait=0.1", data=images.jpeg(), headers=headers)
    assert first.status_code == 202
    pid = first.get_json()["id"]
    succeed(store, pid)
    again = client.post("/v1/predictions?wait=0.1", data=images.jpeg(), headers=headers)
    assert again.status_code == 202 and again.get_json()["id"] == pid
    assert again.headers["Idempotent-Replayed"] == "true"
    assert recorder.pids == [pid]


def test_retried_submit_with_a_long_wait_answers_the_replay_at_once(client, store, recorder, images):
    """The retry's own ID is never created, so nothing could end a wait for it: the replay (202 with
    the first ID) is answered at once, not after the whole ``wait``."""
    headers = {"Idempotency-Key": "retry-2"}
    first = client.post("/v1/predictions?wait=0.1", data=images.jpeg(), headers=headers)
    t0 = time.monotonic()
    again = client.post("/v1/predictions?wait=10", data=images.jpeg(), headers=headers)
    assert again.status_code == 202 and again.get_json()["id"] == first.get_json()["id"]
    assert again.headers["Idempotent-Replayed"] == "true"
    assert time.monotonic() - t0 < 4

# --- health & page -----------------------------------------------------------------------------------
def worker_info(**over) -> dict:
    info = {"state": "READY", "model": "resnet18", "sha256": "x", "pretrained": 0, "precision": "fp32",
            "runtime": "onnx", "selection": "PINFER_PRECISION=auto fell back to fp32/onnx",
            "pid": 123, "host": "h", "core": "0"}
    info.update(over)
    return info


def test_healthz_is_ok(client):
    resp = client.get("/healthz")
    assert resp.status_code == 200 and resp.get_json() == {"status": "ok"}


def test_readyz_is_503_without_workers(client):
    resp = client.get("/readyz")
    assert resp.status_code == 503
    body = resp.get_json()
    assert body["status"] == "not_ready" and body["redis"] is True and body["ready_workers"] == 0


def test_readyz_ignores_workers_without_a_loaded_model(client, store):
    store.heartbeat("w-starting", worker_info(state="STARTING"))
    store.heartbeat("w-broken", worker_info(state="SETUP_FAILED"))
    assert client.get("/readyz").status_code == 503


def test_readyz_is_200_with_a_ready_worker_and_warns_about_random_weights(client, store):
    store.heartbeat("w1", worker_info(pretrained=0))
    resp = client.get("/readyz")
    assert resp.status_code == 200
    body = resp.get_json()
    assert body["status"] == "ready" and body["ready_workers"] == 1
    assert body["pretrained"] is False and "warning" in body
    assert body["models"] == [{"name": "resnet18", "sha256": "x", "pretrained": False, "precision": "fp32",
                               "runtime": "onnx", "selection": "PINFER_PRECISION=auto fell back to fp32/onnx"}]
    assert [w["name"] for w in body["workers"]] == ["w1"]


def test_readyz_with_official_weights_has_no_warning(client, store):
    store.heartbeat("w1", worker_info(pretrained=1, state="BUSY"))
    body = client.get("/readyz").get_json()
    assert body["status"] == "ready" and body["pretrained"] is True and "warning" not in body


def test_readyz_forgets_a_worker_whose_heartbeat_is_stale(client, store):
    store.heartbeat("w1", worker_info())
    store.r.zadd(keys.WORKERS, {"w1": time.time() - 10 * store.settings.worker_ttl_s + 1})
    assert client.get("/readyz").status_code == 503


def test_index_page_is_html(client):
    resp = client.get("/")
    assert resp.status_code == 200
    assert resp.mimetype == "text/html"
    assert b"<html" in resp.data.lower() and b"pinfer" in resp.data


def test_the_api_process_never_imports_torch_or_the_worker():
    """The API sends tasks by name: building the app and serving a submission loads no torch."""
    import subprocess
    import sys

    code = (
        "import sys, io, fakeredis\n"
        "from PIL import Image\n"
        "from api import create_app\n"
        "from shared.settings import Settings\n"
        "srv = fakeredis.FakeServer()\n"
        "app = create_app({'SETTINGS': Settings(), 'REDIS': fakeredis.FakeRedis(server=srv, decode_responses=True),"
        " 'REDIS_RAW': fakeredis.FakeRedis(server=srv)})\n"
        "buf = io.BytesIO(); Image.new('RGB', (64, 48)).save(buf, 'JPEG')\n"
        "r = app.test_client().post('/v1/predictions', data=buf.getvalue(), content_type='image/jpeg')\n"
        "assert r.status_code == 202, r.data\n"
        "print(sorted(m for m in ('torch', 'torchvision', 'worker', 'celery_batches') if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
