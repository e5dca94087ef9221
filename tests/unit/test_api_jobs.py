"""``/v1/jobs``: create, add images (names, duplicates, rejects, backpressure), close, counts, results
paging and cancel, through the Flask test client on fakeredis; workers are simulated by driving the
store's transitions directly."""
from __future__ import annotations

import io
import json
import time

import pytest

from shared import keys
from shared.schema import QUEUED, RUNNING, STATUSES, SUCCEEDED

from tests.unit.helpers import ID_RE, assert_error


def create_job(client, **body) -> dict:
    resp = client.post("/v1/jobs", json=body) if body else client.post("/v1/jobs")
    assert resp.status_code == 201, resp.get_data(as_text=True)
    return resp.get_json()


def send(client, jid: str, files: list[tuple[str, bytes]]):
    return client.post(f"/v1/jobs/{jid}/images",
                       data={"images": [(io.BytesIO(data), name) for name, data in files]},
                       content_type="multipart/form-data")


def job(client, jid: str) -> dict:
    resp = client.get(f"/v1/jobs/{jid}")
    assert resp.status_code == 200
    body = resp.get_json()
    counts = body["counts"]
    assert counts["total"] == sum(counts[s] for s in STATUSES), counts  # counts always add up
    return body


def run(store, pid: str) -> None:
    assert store.transition(pid, RUNNING, (QUEUED, RUNNING), {"started_at": time.time()}, True).outcome == "ok"


def finish(store, pid: str) -> None:
    result = {"top_k": [{"label": "tench", "class_index": 0, "score": 1.0}], "model": {"name": "m"},
              "timings": {"batch_size": 1}}
    run(store, pid)
    assert store.transition(pid, SUCCEEDED, (RUNNING,), {"result": result, "finished_at": time.time()}).outcome == "ok"


def results(client, jid: str, **params):
    query = "&".join(f"{k}={v}" for k, v in params.items())
    resp = client.get(f"/v1/jobs/{jid}/results" + (f"?{query}" if query else ""))
    assert resp.status_code == 200, resp.get_data(as_text=True)
    assert resp.mimetype == "application/x-ndjson"
    lines = [json.loads(line) for line in resp.get_data(as_text=True).splitlines()]
    return resp, lines


# --- create -------------------------------------------------------------------------------------------
def test_create_job_with_defaults(client):
    resp = client.post("/v1/jobs")
    assert resp.status_code == 201
    body = resp.get_json()
    assert ID_RE.match(body["id"])
    assert resp.headers["Location"] == f"/v1/jobs/{body['id']}"
    assert body["status"] == "open" and body["top_k"] == 5 and body["name"] is None
    assert body["counts"] == {"total": 0, "queued": 0, "running": 0, "succeeded": 0, "failed": 0, "canceled": 0}
    assert body["closed_at"] is None and body["finished_at"] is None


def test_create_job_with_name_and_top_k(client):
    body = create_job(client, name="holiday-photos", top_k=3)
    assert body["name"] == "holiday-photos" and body["top_k"] == 3
    assert job(client, body["id"])["name"] == "holiday-photos"


@pytest.mark.parametrize("top_k", [0, 21, "abc", None])
def test_create_job_with_bad_top_k_is_invalid_parameter(client, store, top_k):
    assert_error(client.post("/v1/jobs", json={"top_k": top_k}), 400, "invalid_parameter")
    assert list(store.r.scan_iter(match=keys.job("*"))) == []


def test_create_job_with_bad_name_is_invalid_parameter(client):
    assert_error(client.post("/v1/jobs", json={"name": 5}), 400, "invalid_parameter")
    assert_error(client.post("/v1/jobs", json={"name": "x" * 1025}), 400, "invalid_parameter")


# --- add images ----------------------------------------------------------------------------------------
def test_add_images_stores_each_under_its_name_and_enqueues_ids_on_the_bulk_lane(client, store, recorder, images):
    jid = create_job(client, top_k=2)["id"]
    files = [("a/1.jpg", images.jpeg()), ("a/2.png", images.png()), ("b/c/3.jpg", images.jpeg(color=(1, 2, 3)))]
    resp = send(client, jid, files)

    assert resp.status_code == 202, resp.get_data(as_text=True)
    body = resp.get_json()
    assert [a["name"] for a in body["accepted"]] == ["a/1.jpg", "a/2.png", "b/c/3.jpg"]
    assert body["duplicates"] == [] and body["rejected"] == []
    ids = [a["id"] for a in body["accepted"]]
    assert len(set(ids)) == 3 and all(ID_RE.match(i) for i in ids)
    assert recorder.calls == [(i, "bulk") for i in ids]
    for (name, data), pid in zip(files, ids):
        rec = store.get(pid)
        assert (rec.status, rec.lane, rec.job_id, rec.name, rec.top_k) == (QUEUED, "bulk", jid, name, 2)
        assert store.images([pid]) == [data]
    assert job(client, jid)["counts"]["queued"] == 3


def test_resent_names_are_duplicates_with_their_ids_and_not_queued_again(client, recorder, images):
    jid = create_job(client)["id"]
    first = send(client, jid, [("a/1.jpg", images.jpeg()), ("a/2.jpg", images.jpeg())]).get_json()
    recorder.clear()

    resp = send(client, jid, [("a/1.jpg", images.jpeg()), ("a/3.jpg", images.jpeg()), ("a/2.jpg", images.jpeg())])
    assert resp.status_code == 202
    body = resp.get_json()
    assert body["duplicates"] == first["accepted"]
    assert [a["name"] for a in body["accepted"]] == ["a/3.jpg"]
    assert recorder.calls == [(body["accepted"][0]["id"], "bulk")]
    assert job(client, jid)["counts"]["total"] == 3


def test_duplicate_names_within_one_request_are_refused(client, store, recorder, images):
    jid = create_job(client)["id"]
    resp = send(client, jid, [("x.jpg", images.jpeg()), ("y.jpg", images.jpeg()), ("x.jpg", images.jpeg())])
    assert resp.status_code == 400
    assert resp.get_json()["error"]["code"] in ("bad_request", "invalid_parameter")
    assert recorder.calls == []
    assert job(client, jid)["counts"]["total"] == 0
    assert store.r.hlen(keys.job_names(jid)) == 0


def test_add_without_files_is_missing_image(client, images):
    jid = create_job(client)["id"]
    assert_error(client.post(f"/v1/jobs/{jid}/images", data={"image": (io.BytesIO(images.jpeg()), "a.jpg")},
                             content_type="multipart/form-data"), 400, "missing_image")


def test_rejected_images_are_listed_and_become_failed_result_lines(client, store, recorder, images):
    jid = create_job(client)["id"]
    resp = send(client, jid, [("ok.jpg", images.jpeg()), ("notes.txt", b"shopping list\n"),
                              ("strip.png", images.png((4000, 10)))])
    assert resp.status_code == 202
    body = resp.get_json()
    assert [a["name"] for a in body["accepted"]] == ["ok.jpg"]
    rejected = {r["name"]: r for r in body["rejected"]}
    assert rejected["notes.txt"]["error"]["code"] == "unsupported_format"
    assert rejected["strip.png"]["error"]["code"] == "bad_aspect_ratio"
    assert all(ID_RE.match(r["id"]) for r in rejected.values())
    assert recorder.pids == [body["accepted"][0]["id"]]  # rejected ones are not queued

    counts = job(client, jid)["counts"]
    assert counts == {**counts, "total": 3, "queued": 1, "failed": 2}
    _, lines = results(client, jid)
    by_name = {line["name"]: line for line in lines}
    assert set(by_name) == {"notes.txt", "strip.png"}
    assert by_name["notes.txt"]["status"] == "failed"
    assert by_name["notes.txt"]["error"]["code"] == "unsupported_format"
    assert by_name["notes.txt"]["id"] == rejected["notes.txt"]["id"]
    # a resent rejected name is a duplicate too: it already has its (failed) line
    again = send(client, jid, [("notes.txt", b"shopping list\n")]).get_json()
    assert again["duplicates"] == [{"name": "notes.txt", "id": rejected["notes.txt"]["id"]}]


def test_per_job_backpressure_accepts_up_to_the_bound_then_429(make_app, settings, make_store, recorder, images):
    s = settings.replace(max_pending_per_job=3, retry_after_s=3)
    client, store = make_app(s).test_client(), make_store(s)
    jid = create_job(client)["id"]
    files = [(f"img/{i}.jpg", images.jpeg(color=(i, i, i))) for i in range(5)]

    resp = send(client, jid, files)
    body = assert_error(resp, 429, "overloaded")
    assert resp.headers["Retry-After"] == "3"
    assert [a["name"] for a in body["accepted"]] == ["img/0.jpg", "img/1.jpg", "img/2.jpg"]
    assert body["duplicates"] == [] and body["rejected"] == []
    assert recorder.pids == [a["id"] for a in body["accepted"]]
    assert job(client, jid)["counts"]["total"] == 3
    assert sorted(store.r.hkeys(keys.job_names(jid))) == ["img/0.jpg", "img/1.jpg", "img/2.jpg"]

    # two finish: the client resends everything and only the missing two are queued
    for a in body["accepted"][:2]:
        finish(store, a["id"])
    recorder.clear()
    again = send(client, jid, files)
    assert again.status_code == 202, again.get_data(as_text=True)
    b2 = again.get_json()
    assert b2["duplicates"] == body["accepted"]
    assert [a["name"] for a in b2["accepted"]] == ["img/3.jpg", "img/4.jpg"]
    assert recorder.pids == [a["id"] for a in b2["accepted"]]
    counts = job(client, jid)["counts"]
    assert (counts["total"], counts["queued"], counts["succeeded"]) == (5, 3, 2)


def test_oversized_image_in_a_job_is_rejected_image_too_large(make_app, settings, images):
    client = make_app(settings.replace(max_upload_bytes=2000)).test_client()
    jid = create_job(client)["id"]
    body = send(client, jid, [("big.jpg", images.jpeg() + b"\0" * 3000), ("ok.jpg", images.jpeg())]).get_json()
    assert [r["name"] for r in body["rejected"]] == ["big.jpg"]
    assert body["rejected"][0]["error"]["code"] == "image_too_large"
    assert [a["name"] for a in body["accepted"]] == ["ok.jpg"]


def test_broker_failure_during_a_bulk_upload_loses_nothing(client, store, recorder, images):
    """A publish that fails leaves the image accepted and queued (the sweeper publishes it); a
    resend of the same name is a duplicate of that queued record, not a failed one."""
    jid = create_job(client)["id"]
    recorder.error = ConnectionError("broker down")
    first = send(client, jid, [("a.jpg", images.jpeg())])
    assert first.status_code == 202
    [entry] = first.get_json()["accepted"]
    recorder.error = None

    again = send(client, jid, [("a.jpg", images.jpeg())]).get_json()
    assert again["duplicates"] == [entry]
    assert store.get(entry["id"]).status == QUEUED
    assert client.get(f"/v1/jobs/{jid}").get_json()["counts"]["queued"] == 1


# --- close / counts / results ---------------------------------------------------------------------------
def test_close_then_job_finishes_when_the_last_image_finishes(client, store, images):
    jid = create_job(client)["id"]
    ids = [a["id"] for a in send(client, jid, [("a.jpg", images.jpeg()), ("b.jpg", images.jpeg())])
           .get_json()["accepted"]]
    resp = client.post(f"/v1/jobs/{jid}/close")
    assert resp.status_code == 200
    body = resp.get_json()
    assert body["status"] == "closed" and body["closed_at"] is not None and body["finished_at"] is None

    assert_error(send(client, jid, [("c.jpg", images.jpeg())]), 409, "conflict")

    finish(store, ids[0])
    run(store, ids[1])
    assert job(client, jid)["status"] == "closed"
    finish(store, ids[1])
    done = job(client, jid)
    assert done["status"] == "finished" and done["finished_at"] is not None
    assert done["counts"]["succeeded"] == 2 and done["eta_s"] == 0.0


def test_closing_a_job_with_nothing_left_finishes_it_at_once(client, store, images):
    jid = create_job(client)["id"]
    assert client.post(f"/v1/jobs/{jid}/close").get_json()["status"] == "finished"

    jid2 = create_job(client)["id"]
    [a] = send(client, jid2, [("a.jpg", images.jpeg())]).get_json()["accepted"]
    finish(store, a["id"])
    assert client.post(f"/v1/jobs/{jid2}/close").get_json()["status"] == "finished"
    _, lines = results(client, jid2)
    assert [line["id"] for line in lines] == [a["id"]]


def test_job_counts_add_up_and_rate_and_eta_appear_after_finishes(client, store, images):
    jid = create_job(client)["id"]
    before = job(client, jid)
    assert before["rate_per_s"] is None
    ids = [a["id"] for a in send(client, jid, [(f"{i}.jpg", images.jpeg()) for i in range(6)])
           .get_json()["accepted"]]
    finish(store, ids[0])
    finish(store, ids[1])
    run(store, ids[2])

    body = job(client, jid)
    assert body["counts"] == {"total": 6, "queued": 3, "running": 1, "succeeded": 2, "failed": 0, "canceled": 0}
    assert body["rate_per_s"] is not None and body["rate_per_s"] > 0
    assert body["eta_s"] is not None and body["eta_s"] > 0


def test_results_page_in_finish_order_with_next_cursor_and_job_status(client, store, images):
    jid = create_job(client, top_k=1)["id"]
    accepted = send(client, jid, [(f"p/{i}.jpg", images.jpeg()) for i in range(4)]).get_json()["accepted"]
    ids = [a["id"] for a in accepted]
    order = [ids[2], ids[0], ids[3]]
    for pid in order:
        finish(store, pid)

    resp, page1 = results(client, jid, limit=2)
    assert resp.headers["X-Next-Cursor"] == "2" and resp.headers["X-Job-Status"] == "open"
    assert [line["id"] for line in page1] == order[:2]
    assert page1[0] == {"id": ids[2], "name": "p/2.jpg", "status": "succeeded",
                        "top_k": [{"label": "tench", "class_index": 0, "score": 1.0}]}

    resp, page2 = results(client, jid, cursor=2, limit=2)
    assert [line["id"] for line in page2] == order[2:]
    assert resp.headers["X-Next-Cursor"] == "3"

    resp, page3 = results(client, jid, cursor=3, limit=2)
    assert page3 == [] and resp.headers["X-Next-Cursor"] == "3"

    client.post(f"/v1/jobs/{jid}/close")
    finish(store, ids[1])
    resp, page4 = results(client, jid, cursor=3, limit=2)
    assert [line["id"] for line in page4] == [ids[1]]
    assert resp.headers["X-Next-Cursor"] == "4" and resp.headers["X-Job-Status"] == "finished"


@pytest.mark.parametrize("params", ["limit=0", "limit=10001", "cursor=-1", "limit=x"])
def test_results_with_bad_paging_is_invalid_parameter(client, params):
    jid = create_job(client)["id"]
    assert_error(client.get(f"/v1/jobs/{jid}/results?{params}"), 400, "invalid_parameter")


# --- cancel ----------------------------------------------------------------------------------------------
def test_cancel_cancels_queued_keeps_running_and_finished(client, store, recorder, images):
    jid = create_job(client)["id"]
    ids = [a["id"] for a in send(client, jid, [(f"{i}.jpg", images.jpeg()) for i in range(4)])
           .get_json()["accepted"]]
    finish(store, ids[0])
    run(store, ids[1])

    resp = client.delete(f"/v1/jobs/{jid}")
    assert resp.status_code == 200
    body = resp.get_json()
    assert body["status"] == "canceled"
    assert body["counts"] == {"total": 4, "queued": 0, "running": 1, "succeeded": 1, "failed": 0, "canceled": 2}
    for pid in ids[2:]:
        rec = store.get(pid)
        assert rec.status == "canceled" and rec.error["code"] == "canceled"
        assert store.images([pid]) == [None]
    assert store.r.zcard(keys.job_pending(jid)) == 1  # only the running one
    assert store.get(ids[1]).status == RUNNING

    # the running image can still finish, and the counts still add up
    assert store.transition(ids[1], SUCCEEDED, (RUNNING,), {"finished_at": time.time()}).outcome == "ok"
    after = job(client, jid)
    assert after["status"] == "canceled"
    assert after["counts"] == {"total": 4, "queued": 0, "running": 0, "succeeded": 2, "failed": 0, "canceled": 2}

    # nothing more is accepted
    recorder.clear()
    assert_error(send(client, jid, [("new.jpg", images.jpeg())]), 409, "conflict")
    assert recorder.calls == [] and after["counts"]["total"] == job(client, jid)["counts"]["total"]

    resp, lines = results(client, jid)
    assert resp.headers["X-Job-Status"] == "canceled"
    assert sorted(line["id"] for line in lines) == sorted(ids)
    assert {line["status"] for line in lines} == {"succeeded", "canceled"}

    # canceling again changes nothing
    again = client.delete(f"/v1/jobs/{jid}")
    assert again.status_code == 200 and again.get_json()["counts"] == after["counts"]


# --- unknown job ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("method,path", [("get", ""), ("post", "/images"), ("post", "/close"),
                                         ("delete", ""), ("get", "/results")])
def test_unknown_job_is_404_on_every_route(client, images, method, path):
    kwargs = {}
    if path == "/images":
        kwargs = {"data": {"images": [(io.BytesIO(images.jpeg()), "a.jpg")]}, "content_type": "multipart/form-data"}
    resp = getattr(client, method)(f"/v1/jobs/AAAAAAAAAAAAAAAAAAAAAA{path}", **kwargs)
    assert_error(resp, 404, "not_found")
