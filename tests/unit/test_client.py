"""The client SDK against the in-memory fake API: calls, error parsing, and the retry policy."""
from __future__ import annotations

import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from pinfer_client.sdk import (ApiError, ApiUnreachable, Client, Overloaded, Stopped, StopToken, WaitTimeout,
                               parse_retry_after, wire_name)
from tests.fixtures.fake_api import FakeApi, fake_top_k

ROOT = Path(__file__).resolve().parents[2]
PNG = b"\x89PNG\r\n\x1a\n" + b"pixels"
JPEG = b"\xff\xd8\xff\xe0" + b"jpeg data"


@pytest.fixture
def fake():
    with FakeApi() as api:
        yield api


class Sleeps(list):
    """A ``sleep`` that records instead of sleeping: retries run instantly and can be inspected."""

    def __init__(self, then=None):
        super().__init__()
        self.then = then

    def __call__(self, seconds: float) -> None:
        self.append(seconds)
        if self.then is not None:
            self.then(len(self))


def make_client(fake: FakeApi, **kw) -> Client:
    kw.setdefault("retries", 3)
    kw.setdefault("timeout", 5.0)
    return Client(fake.url, **kw)


# --- single predictions ------------------------------------------------------------------------
def test_submit_get_wait_classify(fake, tmp_path):
    c = make_client(fake)
    rec = c.submit(PNG)
    assert rec["status"] == "queued" and len(rec["id"]) == 22 and rec["top_k"] == 5
    done = c.wait(rec["id"], timeout=5)
    assert done["status"] == "succeeded"
    assert done["top_k"] == fake_top_k(PNG, 5)
    assert c.get(rec["id"])["status"] == "succeeded"

    path = tmp_path / "x.jpg"
    path.write_bytes(JPEG)
    out = c.classify(path, top_k=3, timeout=5)
    assert out["status"] == "succeeded" and out["top_k"] == fake_top_k(JPEG, 3)

    broken = c.classify(b"BROKEN" + PNG, timeout=5)
    assert broken["status"] == "failed" and broken["error"]["code"] == "corrupt_image"


def test_wait_long_polls_instead_of_spinning():
    with FakeApi(delay_s=0.3) as fake:
        c = make_client(fake)
        pid = c.submit(PNG)["id"]
        assert c.wait(pid, timeout=5)["status"] == "succeeded"
        # one held GET (maybe two at the boundary), not a busy loop
        assert fake.count("GET", "/v1/predictions/") <= 2


def test_wait_times_out_with_last_record(fake):
    fake.pause()
    c = make_client(fake)
    pid = c.submit(PNG)["id"]
    with pytest.raises(WaitTimeout) as info:
        c.wait(pid, timeout=0.2)
    assert info.value.pid == pid and info.value.last["status"] == "queued"
    assert isinstance(info.value, TimeoutError)
    fake.resume()
    assert c.wait(pid, timeout=5)["status"] == "succeeded"


def test_wait_shrinks_long_poll_when_server_allows_less():
    with FakeApi(max_wait_s=2.0, delay_s=0.1) as fake:
        c = make_client(fake, long_poll=25.0)
        pid = c.submit(PNG)["id"]
        assert c.wait(pid, timeout=5)["status"] == "succeeded"
        assert c.long_poll <= 2.0



def test_classify_gets_a_fast_result_in_the_submit_itself():
    """POST ?wait: one request per image when the result comes within the submit's wait."""
    with FakeApi(delay_s=0.1) as fake:
        c = make_client(fake)
        out = c.classify(PNG, top_k=3, timeout=5)
        assert out["status"] == "succeeded" and out["top_k"] == fake_top_k(PNG, 3)
        assert fake.count("POST", "/v1/predictions") == 1 and fake.count("GET", "/v1/predictions/") == 0


def test_classify_long_polls_when_the_submit_wait_runs_out(fake):
    fake.pause()
    c = make_client(fake, long_poll=0.2)
    resumer = threading.Timer(0.5, fake.resume)
    resumer.start()
    try:
        out = c.classify(PNG, timeout=10)
    finally:
        resumer.cancel()
    assert out["status"] == "succeeded"
    assert fake.count("POST", "/v1/predictions") == 1 and fake.count("GET", "/v1/predictions/") >= 1


def test_classify_asks_for_a_shorter_wait_when_the_server_allows_less():
    with FakeApi(max_wait_s=2.0, delay_s=0.1) as fake:
        c = make_client(fake, long_poll=25.0)
        assert c.classify(PNG, timeout=5)["status"] == "succeeded"
        assert c.long_poll <= 2.0
        assert len(fake.predictions) == 1  # the refused submits stored nothing


def test_submit_sends_the_image_as_the_raw_body_with_top_k_in_the_query(fake):
    c = make_client(fake)
    rec = c.submit(JPEG, top_k=2)
    assert rec["status"] == "queued" and rec["top_k"] == 2
    assert fake.content_types == ["application/octet-stream"]  # no multipart form for the server to parse
    assert c.wait(rec["id"], timeout=5)["top_k"] == fake_top_k(JPEG, 2)

# --- errors ------------------------------------------------------------------------------------
def test_api_errors_are_parsed(fake):
    c = make_client(fake)
    with pytest.raises(ApiError) as info:
        c.submit(b"plain text, not an image")
    assert (info.value.status, info.value.code) == (415, "unsupported_format")
    assert "JPEG" in info.value.message

    with pytest.raises(ApiError) as info:
        c.get("nope")
    assert (info.value.status, info.value.code) == (404, "not_found")

    with pytest.raises(ApiError) as info:
        c.submit(PNG, top_k=0)
    assert (info.value.status, info.value.code) == (400, "invalid_parameter")

    with pytest.raises(ApiError) as info:
        c.submit(b"")
    assert info.value.code == "missing_image"


def test_non_json_error_from_a_proxy(fake):
    fake.fail_next(1, status=502, raw="<html>Bad Gateway</html>")
    c = make_client(fake, retries=0)
    with pytest.raises(ApiError) as info:
        c.get_job("whatever")
    assert info.value.status == 502 and info.value.code == "http_502"
    assert "Bad Gateway" in info.value.message


def test_parse_retry_after():
    assert parse_retry_after("2") == 2.0
    assert parse_retry_after("0.05") == 0.05
    assert parse_retry_after(None) is None and parse_retry_after("soon") is None
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT") == 0.0  # a date in the past


# --- retries -----------------------------------------------------------------------------------
def test_submit_retries_429_honouring_retry_after(fake):
    fake.overload_next_submits(2, retry_after=0.05)
    sleeps = Sleeps()
    c = make_client(fake, sleep=sleeps, backoff=5.0)
    rec = c.submit(PNG)
    assert rec["status"] == "queued"
    assert fake.count("POST", "/v1/predictions") == 3
    # the server's Retry-After (plus <= 10% jitter), not the 5 s backoff
    assert len(sleeps) == 2 and all(0.05 <= s <= 0.056 for s in sleeps)


def test_submit_gives_up_after_bounded_429s(fake):
    fake.overload_next_submits(10, retry_after=0.01)
    sleeps = Sleeps()
    c = make_client(fake, retries=2, sleep=sleeps)
    with pytest.raises(Overloaded) as info:
        c.submit(PNG)
    assert info.value.status == 429 and info.value.code == "overloaded" and info.value.retry_after == 0.01
    assert fake.count("POST", "/v1/predictions") == 3 and len(sleeps) == 2


def test_submit_retried_with_the_same_idempotency_key_when_the_answer_is_lost(fake):
    """The request reached the server and its answer was lost: the retry carries the same
    Idempotency-Key, so the server answers with the first prediction instead of making a second."""
    fake.drop_next(1, method="POST", path_prefix="/v1/predictions")
    c = make_client(fake, sleep=Sleeps())
    first = c.submit(PNG)
    assert fake.count("POST", "/v1/predictions") == 2 and len(fake.predictions) == 1
    sent = [k for m, p, k in fake.idempotency_keys if m == "POST" and p == "/v1/predictions"]
    assert sent[0] and sent[0] == sent[1]
    assert first["id"] in fake.predictions
    c.submit(PNG)  # a new call is a new request: a new key
    sent = [k for m, p, k in fake.idempotency_keys if m == "POST" and p == "/v1/predictions"]
    assert sent[2] != sent[0] and len(fake.predictions) == 2
    c.create_job("j")
    assert all(k for m, p, k in fake.idempotency_keys if m == "POST"), "every POST carries a key"


def test_submit_retried_on_503(fake):
    fake.fail_next(1, status=503, path_prefix="/v1/predictions")
    c = make_client(fake, sleep=Sleeps())
    assert c.submit(PNG)["status"] == "queued"


def test_submit_retried_on_500_with_the_same_key(fake):
    fake.fail_next(1, status=500, path_prefix="/v1/predictions")
    c = make_client(fake, sleep=Sleeps())
    assert c.submit(PNG)["status"] == "queued" and fake.count("POST", "/v1/predictions") == 2


def test_idempotent_calls_retry_5xx_and_dropped_connections(fake):
    c = make_client(fake, sleep=Sleeps())
    pid = c.submit(PNG)["id"]
    fake.fail_next(2, status=500, path_prefix="/v1/predictions/")
    assert c.get(pid)["status"] == "succeeded"
    fake.drop_next(1, method="GET")
    assert c.get(pid)["status"] == "succeeded"
    assert fake.count("GET", "/v1/predictions/") == 5


def test_retries_when_connection_refused_then_server_back(fake):
    """Refused connections are retried, even for submit: the request never left."""
    fake.stop()
    sleeps = Sleeps(then=lambda n: fake.start() if n == 2 else None)
    c = make_client(fake, sleep=sleeps, retries=4)
    rec = c.submit(PNG)
    assert rec["status"] == "queued" and len(sleeps) == 2
    assert fake.count("POST", "/v1/predictions") == 1


def test_bounded_retries_then_unreachable(fake):
    fake.stop()
    sleeps = Sleeps()
    c = make_client(fake, sleep=sleeps, retries=3, backoff=0.1, backoff_max=0.3)
    with pytest.raises(ApiUnreachable):
        c.get_job("x")
    assert len(sleeps) == 3
    # exponential with jitter in [half, full] and capped
    assert 0.05 <= sleeps[0] <= 0.1 and 0.1 <= sleeps[1] <= 0.2 and 0.15 <= sleeps[2] <= 0.3


# --- bulk jobs ---------------------------------------------------------------------------------
def test_job_lifecycle_and_results_cursor(fake):
    c = make_client(fake)
    job = c.create_job(name="holiday", top_k=2)
    assert job["status"] == "open" and job["name"] == "holiday" and job["top_k"] == 2
    items = [(f"d/{i}.png", PNG + bytes([i])) for i in range(5)] + [("notes.txt", b"text"), ("bad.jpg", b"BROKEN")]
    res = c.add_images(job["id"], items)
    assert [d["name"] for d in res.accepted] == [n for n, _ in items if n != "notes.txt"]
    assert [d["name"] for d in res.rejected] == ["notes.txt"]
    assert res.rejected[0]["error"]["code"] == "unsupported_format"
    assert not res.pending and not res.overloaded

    again = c.add_images(job["id"], items[:2])
    assert [d["name"] for d in again.duplicates] == ["d/0.png", "d/1.png"]
    assert again.duplicates[0]["id"] == res.accepted[0]["id"]

    rows, cursor, status = c.results(job["id"], 0, limit=3)
    assert len(rows) == 3 and cursor == 3 and status == "open"
    c.close_job(job["id"])
    rest = list(c.iter_results(job["id"], cursor, poll_interval=0.01))
    names = [r["name"] for r in rows + rest]
    assert sorted(names) == sorted(n for n, _ in items)
    by_name = {r["name"]: r for r in rows + rest}
    assert by_name["bad.jpg"]["error"]["code"] == "corrupt_image"
    assert by_name["notes.txt"]["error"]["code"] == "unsupported_format"
    assert by_name["d/3.png"]["top_k"] == fake_top_k(PNG + bytes([3]), 2)
    assert c.get_job(job["id"])["status"] == "finished"

    with pytest.raises(ApiError) as info:
        c.add_images(job["id"], [("late.png", PNG)])
    assert (info.value.status, info.value.code) == (409, "conflict")


def test_iter_pages_follows_cursor_until_finished(fake):
    c = make_client(fake)
    job = c.create_job()
    c.add_images(job["id"], [(f"{i}.png", PNG + bytes([i])) for i in range(7)])
    c.close_job(job["id"])
    pages = list(c.iter_pages(job["id"], 0, limit=3, poll_interval=0.01))
    assert [len(p.results) for p in pages] == [3, 3, 1]
    assert pages[-1].done and pages[-1].next_cursor == 7 and pages[-1].job_status == "finished"


def test_cancel_job(fake):
    fake.pause()
    c = make_client(fake)
    job = c.create_job()
    c.add_images(job["id"], [("a.png", PNG), ("b.png", PNG + b"1")])
    canceled = c.cancel_job(job["id"])
    assert canceled["status"] == "canceled" and canceled["counts"]["canceled"] == 2
    rows = list(c.iter_results(job["id"], poll_interval=0.01))
    assert {r["status"] for r in rows} == {"canceled"}


def test_add_images_partial_429_reports_what_got_in(fake):
    fake.admit_per_request = 3
    c = make_client(fake, sleep=Sleeps())
    job = c.create_job()
    items = [(f"{i}.png", PNG + bytes([i])) for i in range(10)]
    res = c.add_images(job["id"], items, overload_retries=0)
    assert res.overloaded and res.retry_after == 0.05
    assert [d["name"] for d in res.accepted] == ["0.png", "1.png", "2.png"]
    assert res.pending == [f"{i}.png" for i in range(3, 10)]


def test_add_images_resends_only_the_pending_after_retry_after(fake):
    fake.admit_per_request = 3
    fake.overload_next_uploads(1, retry_after=0.05)
    sleeps = Sleeps()
    c = make_client(fake, sleep=sleeps, retries=10)
    job = c.create_job()
    items = [(f"{i}.png", PNG + bytes([i])) for i in range(10)]
    res = c.add_images(job["id"], items)
    assert not res.overloaded and not res.pending
    assert sorted(d["name"] for d in res.accepted) == sorted(n for n, _ in items)
    sent = [u["sent"] for u in fake.uploads]
    assert sent[0] == sent[1] == [n for n, _ in items]          # nothing got in the first time
    assert sent[2] == [f"{i}.png" for i in range(3, 10)]          # then only what was still out
    assert fake.duplicate_names() == []
    assert all(0.05 <= s <= 0.056 for s in sleeps)


def test_add_images_retries_5xx_as_a_whole(fake):
    c = make_client(fake, sleep=Sleeps())
    job = c.create_job()
    fake.fail_next(1, status=502, path_prefix=f"/v1/jobs/{job['id']}/images")
    res = c.add_images(job["id"], [("a.png", PNG)])
    assert [d["name"] for d in res.accepted] == ["a.png"]


def test_add_images_refuses_names_that_would_change_on_the_wire(fake):
    c = make_client(fake)
    job = c.create_job()
    with pytest.raises(ValueError):
        c.add_images(job["id"], [("back\\slash.png", PNG)])
    weird = [wire_name(n) for n in ("back\\slash.png", "50%22off.png", "line\nbreak.png", 'quote".png', "café/ü.png")]
    res = c.add_images(job["id"], [(n, PNG + n.encode()) for n in weird])
    assert [d["name"] for d in res.accepted] == weird  # every name came back as sent


def test_repeated_name_in_one_upload_is_a_bad_request(fake):
    c = make_client(fake)
    job = c.create_job()
    with pytest.raises(ApiError) as info:
        c.add_images(job["id"], [("a.png", PNG), ("a.png", PNG)])
    assert (info.value.status, info.value.code) == (400, "bad_request")


def test_unknown_job_is_not_found(fake):
    c = make_client(fake)
    for call in (lambda: c.get_job("nope"), lambda: c.close_job("nope"), lambda: c.results("nope"),
                 lambda: c.add_images("nope", [("a.png", PNG)])):
        with pytest.raises(ApiError) as info:
            call()
        assert info.value.status == 404 and info.value.code == "not_found"


def test_health(fake):
    c = make_client(fake)
    assert c.healthz() == {"status": "ok"}
    ready, body = c.readyz()
    assert ready and body["status"] == "ready"


def test_base_url_without_scheme(fake):
    c = Client(f"127.0.0.1:{fake.port}/", retries=0)
    assert c.base_url == fake.url and c.healthz()["status"] == "ok"


# --- stopping ----------------------------------------------------------------------------------
def test_stopped_client_sends_nothing(fake):
    stop = StopToken()
    c = make_client(fake, stop=stop)
    assert c.healthz()["status"] == "ok"
    stop.stop()
    with pytest.raises(Stopped):
        c.submit(PNG)
    assert fake.count("POST") == 0


def test_stop_ends_a_retry_after_wait_at_once(fake):
    """The server says come back in 100 s; the token is set meanwhile: the call ends with Stopped
    instead of sleeping it out and trying again."""
    fake.overload_next_submits(1, retry_after=100)
    stop = StopToken()

    def stop_after_first_try():
        deadline = time.monotonic() + 30
        while fake.count("POST", "/v1/predictions") < 1 and time.monotonic() < deadline:
            time.sleep(0.005)
        stop.stop()

    setter = threading.Thread(target=stop_after_first_try)
    setter.start()
    try:
        with pytest.raises(Stopped):
            make_client(fake, stop=stop).submit(PNG)
    finally:
        setter.join()
    assert fake.count("POST", "/v1/predictions") == 1 and not fake.predictions


def test_client_imports_no_server_or_heavy_packages():
    code = ("import sys, pinfer_client, pinfer_client.sdk, pinfer_client.ingest\n"
            "heavy = [m for m in ('torch', 'numpy', 'celery', 'redis', 'api', 'worker', 'shared', 'flask') "
            "if m in sys.modules]\n"
            "assert not heavy, heavy\n")
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, timeout=60)


def test_api_key_from_the_environment_is_sent_on_every_call(fake, monkeypatch):
    monkeypatch.setenv("PINFER_API_KEY", "pk_from_env")
    c = make_client(fake, sleep=Sleeps())
    c.classify(PNG)
    assert fake.authorization and set(fake.authorization) == {"Bearer pk_from_env"}
    assert "pk_from_env" not in repr(c)
    monkeypatch.delenv("PINFER_API_KEY")
    fake.authorization.clear()
    make_client(fake, sleep=Sleeps()).submit(PNG)
    assert fake.authorization == [None]
