"""shared.store + shared.lua on fakeredis: atomic, idempotent transitions, the done notification,
job bookkeeping and finish detection, backpressure bounds, core leases."""
from __future__ import annotations

import time
from types import SimpleNamespace

import pytest

from shared import keys
from shared.errors import Conflict, NotFound, Overloaded
from shared.schema import CANCELED, FAILED, QUEUED, RUNNING, STATUSES, SUCCEEDED, new_id


def submit(store, data=b"img", job=None, name=None, **kw) -> str:
    pid = new_id()
    sub = store.submit(pid, data, 5, "bulk" if job else "interactive", job, name, **kw)
    assert sub.outcome == "ok"
    return pid


def claim(store, pid):
    return store.transition(pid, RUNNING, (QUEUED, RUNNING), {"started_at": time.time()}, True)


def succeed(store, pid):
    return store.transition(pid, SUCCEEDED, (RUNNING,), {"result": {"top_k": []}, "finished_at": time.time()})


def counts(store, jid) -> dict:
    c = store.get_job(jid).counts
    assert c["total"] == sum(c[s] for s in STATUSES), c
    return c


@pytest.fixture
def done_messages(store):
    """A subscription to the done channel; call it to drain the IDs published so far."""
    ps = store.r.pubsub()
    ps.subscribe(keys.DONE_CHANNEL)

    def drain() -> list[str]:
        out = []
        while (msg := ps.get_message(timeout=0.01)) is not None:
            if msg["type"] == "message":
                out.append(msg["data"])
        return out

    yield drain
    ps.close()


# --- predictions -----------------------------------------------------------------------------------------
def test_submit_stores_record_bytes_and_pending_entry(store):
    pid = submit(store, b"\x00\xffbytes")
    rec = store.get(pid)
    assert rec.status == QUEUED and rec.attempts == 0 and rec.top_k == 5 and rec.lane == "interactive"
    assert rec.enqueued_at == rec.created_at
    assert store.images([pid]) == [b"\x00\xffbytes"]
    score = store.r.zscore(keys.PENDING, pid)
    assert score == pytest.approx(rec.created_at + store.settings.image_ttl_s)
    assert 0 < store.r.ttl(keys.image(pid)) <= store.settings.image_ttl_s
    assert 0 < store.r.ttl(keys.prediction(pid)) <= store.settings.result_ttl_s


def test_transition_to_terminal_twice_counts_once(store, done_messages):
    jid = new_id()
    store.create_job(jid, None, 5)
    pid = submit(store, job=jid, name="a")
    assert claim(store, pid).outcome == "ok"

    first = succeed(store, pid)
    second = succeed(store, pid)
    assert (first.outcome, first.previous) == ("ok", RUNNING)
    assert (second.outcome, second.previous) == ("skip", SUCCEEDED)
    assert counts(store, jid) == {**counts(store, jid), "total": 1, "running": 0, "succeeded": 1}
    assert store.r.lrange(keys.job_done(jid), 0, -1) == [pid]
    assert done_messages() == [pid]  # one notification, not two


def test_duplicate_claim_of_a_finished_prediction_is_a_skip(store):
    pid = submit(store)
    claim(store, pid)
    succeed(store, pid)
    t = claim(store, pid)
    assert (t.outcome, t.previous) == ("skip", SUCCEEDED)
    rec = store.get(pid)
    assert rec.status == SUCCEEDED and rec.attempts == 1


def test_each_claim_bumps_attempts(store):
    pid = submit(store)
    assert [claim(store, pid).attempts for _ in range(3)] == [1, 2, 3]
    assert store.get(pid).attempts == 3 and store.get(pid).status == RUNNING
    # a transition without bump reports the current count
    assert store.transition(pid, FAILED, (RUNNING,), {"error_code": "x"}).attempts == 3


def test_transition_of_a_missing_record(store):
    t = store.transition("nope", RUNNING, (QUEUED,))
    assert t.outcome == "missing"


def test_transition_many_applies_each_change_independently(store):
    a, b, c = submit(store), submit(store), submit(store)
    claim(store, a)
    out = store.transition_many([(a, SUCCEEDED, (RUNNING,), {}, False), (b, SUCCEEDED, (RUNNING,), {}, False),
                                 (c, RUNNING, (QUEUED,), {"worker": "w"}, True)])
    assert [t.outcome for t in out] == ["ok", "skip", "ok"]
    assert [store.get(p).status for p in (a, b, c)] == [SUCCEEDED, QUEUED, RUNNING]
    assert store.transition_many([]) == []


def test_terminal_transition_frees_pending_and_bytes_and_publishes(store, done_messages):
    pids = [submit(store) for _ in range(3)]
    assert store.r.zcard(keys.PENDING) == 3
    claim(store, pids[0])
    assert store.r.zcard(keys.PENDING) == 3 and done_messages() == []  # running is not terminal

    succeed(store, pids[0])
    store.transition(pids[1], FAILED, (QUEUED,), {"error_code": "corrupt_image"})
    store.transition(pids[2], CANCELED, (QUEUED,), {"error_code": "canceled"})
    assert store.r.zcard(keys.PENDING) == 0
    assert store.images(pids) == [None, None, None]
    assert done_messages() == pids


def test_submit_of_a_rejected_image_is_failed_at_once_and_published(store, done_messages):
    jid = new_id()
    store.create_job(jid, None, 5)
    pid = submit(store, b"junk", job=jid, name="x.txt", error={"code": "unsupported_format", "message": "no"})
    rec = store.get(pid)
    assert rec.status == FAILED and rec.error == {"code": "unsupported_format", "message": "no"}
    assert store.images([pid]) == [None] and store.r.zcard(keys.PENDING) == 0
    assert store.r.lrange(keys.job_done(jid), 0, -1) == [pid]
    assert counts(store, jid)["failed"] == 1
    assert done_messages() == [pid]


# --- backpressure ---------------------------------------------------------------------------------------
def test_global_bound_refuses_and_leaves_nothing(make_store, settings):
    store = make_store(settings.replace(max_pending_images=2, retry_after_s=9))
    submit(store)
    submit(store)
    pid = new_id()
    with pytest.raises(Overloaded) as exc:
        store.submit(pid, b"x", 5)
    assert exc.value.retry_after_s == 9 and exc.value.details["scope"] == "global"
    assert store.get(pid) is None and store.images([pid]) == [None]


def test_expired_pending_entries_do_not_count_against_the_bound(make_store, settings):
    store = make_store(settings.replace(max_pending_images=1))
    # an image whose bytes expired long ago, never classified (its worker lost it)
    store.r.zadd(keys.PENDING, {"lost": time.time() - 10})
    pid = submit(store)
    assert store.r.zrange(keys.PENDING, 0, -1) == [pid]


def test_per_job_bound(make_store, settings):
    store = make_store(settings.replace(max_pending_per_job=2))
    jid, other = new_id(), new_id()
    store.create_job(jid, None, 5)
    store.create_job(other, None, 5)
    a = submit(store, job=jid, name="a")
    submit(store, job=jid, name="b")
    with pytest.raises(Overloaded) as exc:
        store.submit(new_id(), b"x", 5, "bulk", jid, "c")
    assert exc.value.details["scope"] == "job"
    submit(store, job=other, name="c")  # another job is not affected
    submit(store)  # nor single predictions
    claim(store, a)
    succeed(store, a)
    submit(store, job=jid, name="c")
    assert counts(store, jid)["total"] == 3


def test_submit_to_unknown_closed_or_canceled_job(store):
    with pytest.raises(NotFound):
        store.submit(new_id(), b"x", 5, "bulk", "nojob", "a")
    jid = new_id()
    store.create_job(jid, None, 5)
    store.close_job(jid)
    with pytest.raises(Conflict):
        store.submit(new_id(), b"x", 5, "bulk", jid, "a")
    jid2 = new_id()
    store.create_job(jid2, None, 5)
    store.cancel_job(jid2)
    with pytest.raises(Conflict):
        store.submit(new_id(), b"x", 5, "bulk", jid2, "a")


def test_duplicate_name_returns_the_existing_id(store):
    jid = new_id()
    store.create_job(jid, None, 5)
    pid = submit(store, job=jid, name="a/b.jpg")
    again = store.submit(new_id(), b"other", 5, "bulk", jid, "a/b.jpg")
    assert (again.outcome, again.id) == ("duplicate", pid)
    assert counts(store, jid)["total"] == 1 and store.r.zcard(keys.PENDING) == 1


# --- jobs -----------------------------------------------------------------------------------------------
def test_job_finishes_when_closed_and_the_last_item_finishes(store):
    jid = new_id()
    store.create_job(jid, "j", 5)
    a, b, c = (submit(store, job=jid, name=n) for n in "abc")
    claim(store, a)
    succeed(store, a)
    assert store.get_job(jid).status == "open"  # open jobs never finish by themselves
    assert store.close_job(jid).status == "closed"
    store.transition(b, FAILED, (QUEUED,), {"error_code": "corrupt_image"})
    claim(store, c)
    assert store.get_job(jid).status == "closed"
    succeed(store, c)
    j = store.get_job(jid)
    assert j.status == "finished" and j.finished_at is not None
    assert counts(store, jid) == {"total": 3, "queued": 0, "running": 0, "succeeded": 2, "failed": 1, "canceled": 0}
    assert store.r.lrange(keys.job_done(jid), 0, -1) == [a, b, c]
    assert store.r.zcard(keys.job_pending(jid)) == 0


def test_close_is_idempotent_and_unknown_job_is_not_found(store):
    jid = new_id()
    store.create_job(jid, None, 5)
    submit(store, job=jid, name="a")
    first = store.close_job(jid)
    assert store.close_job(jid).closed_at == first.closed_at
    with pytest.raises(NotFound):
        store.close_job("nope")
    with pytest.raises(NotFound):
        store.get_job("nope")


def test_cancel_job_cancels_only_queued(store):
    jid = new_id()
    store.create_job(jid, None, 5)
    ids = [submit(store, job=jid, name=str(i)) for i in range(5)]
    claim(store, ids[0])
    claim(store, ids[1])
    succeed(store, ids[1])
    job = store.cancel_job(jid, chunk=2)  # several chunks
    assert job.status == "canceled"
    assert [store.get(p).status for p in ids] == [RUNNING, SUCCEEDED, CANCELED, CANCELED, CANCELED]
    assert counts(store, jid) == {"total": 5, "queued": 0, "running": 1, "succeeded": 1, "failed": 0, "canceled": 3}
    succeed(store, ids[0])
    assert counts(store, jid)["succeeded"] == 2 and store.get_job(jid).status == "canceled"


def test_job_results_cursor(store):
    jid = new_id()
    store.create_job(jid, None, 5)
    ids = [submit(store, job=jid, name=str(i)) for i in range(3)]
    for pid in reversed(ids):
        claim(store, pid)
        succeed(store, pid)
    preds, nxt = store.job_results(jid, 0, 2)
    assert [p.id for p in preds] == [ids[2], ids[1]] and nxt == 2
    preds, nxt = store.job_results(jid, nxt, 2)
    assert [p.id for p in preds] == [ids[0]] and nxt == 3
    assert store.job_results(jid, nxt, 2) == ([], 3)


def test_job_rate_counts_recent_finishes(store):
    jid = new_id()
    store.create_job(jid, None, 5)
    assert store.job_rate(store.get_job(jid)) is None
    for i in range(4):
        pid = submit(store, job=jid, name=str(i))
        claim(store, pid)
        succeed(store, pid)
    rate = store.job_rate(store.get_job(jid))
    assert rate is not None and 0 < rate <= 4.0


# --- workers & core leases --------------------------------------------------------------------------------
def test_heartbeat_and_live_workers(store):
    store.heartbeat("w1", {"state": "READY", "pid": 1})
    store.heartbeat("w2", {"state": "BUSY", "pid": 2})
    store.r.zadd(keys.WORKERS, {"w2": time.time() - store.settings.worker_ttl_s - 1})
    live = store.live_workers()
    assert [w["name"] for w in live] == ["w1"] and live[0]["state"] == "READY" and live[0]["pid"] == "1"
    store.forget_worker("w1")
    assert store.live_workers() == []


def test_two_holders_get_distinct_cores(store):
    a = store.lease_core("host", "A", [0, 1, 2], 30)
    b = store.lease_core("host", "B", [0, 1, 2], 30)
    assert a is not None and b is not None and a != b
    assert store.lease_core("host", "C", [a, b], 30) is None  # both taken
    assert store.lease_core("other-host", "C", [a], 30) == a   # leases are per host


def test_a_holder_renews_its_own_core(store):
    core = store.lease_core("host", "A", [3], 30)
    assert core == 3
    assert store.lease_core("host", "A", [3], 30) == 3
    assert store.lease_core("host", "B", [3], 30) is None


def test_an_expired_lease_can_be_taken(store, monkeypatch):
    assert store.lease_core("host", "A", [0], 10) == 0
    assert store.lease_core("host", "B", [0], 10) is None
    later = time.time() + 11
    monkeypatch.setattr("shared.store_workers.time", SimpleNamespace(time=lambda: later))
    assert store.lease_core("host", "B", [0], 10) == 0
    assert store.lease_core("host", "A", [0], 10) is None  # A lost it


def test_release_core(store):
    store.lease_core("host", "A", [0], 30)
    store.release_core("host", 0)
    assert store.lease_core("host", "B", [0], 30) == 0


def test_queue_depths(store):
    store.r.lpush(keys.QUEUE_INTERACTIVE, "m1", "m2")
    store.r.lpush(keys.QUEUE_BULK, "m3")
    submit(store)
    assert store.queue_depths() == {"interactive": 2, "bulk": 1, "pending_images": 1}
