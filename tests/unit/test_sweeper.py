"""worker.sweeper: predictions whose broker message was lost are published again -- only when two
sweeps at least ``confirm_s`` apart agree, exactly once, and never while a message for them is in a
queue or in kombu's ``unacked`` hash.

The kombu Redis layout is built by hand in fakeredis: queue lists (LPUSH adds, BRPOP takes from the
right) holding JSON messages in kombu's format, and the ``unacked`` hash (tag -> [message, exchange,
routing_key]). Clocks are replaced per module (store: when records were created; sweeper: now).
"""
from __future__ import annotations

import base64
import json
import time
import uuid
from types import SimpleNamespace

import pytest

from shared import keys
from shared.schema import BULK, INTERACTIVE, QUEUED, RUNNING, new_id
from worker.sweeper import Sweeper, message_pid

GRACE, CONFIRM = 30.0, 4.0
NOW = time.time()


def kombu_message(pid: str, queue: str) -> dict:
    """A Celery protocol-2 task message as kombu's Redis transport stores it."""
    body = json.dumps([[pid], {}, {"callbacks": None, "errbacks": None, "chain": None, "chord": None}])
    return {
        "body": base64.b64encode(body.encode()).decode(),
        "content-encoding": "utf-8",
        "content-type": "application/json",
        "headers": {"lang": "py", "task": keys.TASK_CLASSIFY, "id": str(uuid.uuid4()), "retries": 0,
                    "argsrepr": repr([pid]), "kwargsrepr": "{}", "origin": "gen1@api"},
        "properties": {"correlation_id": str(uuid.uuid4()), "reply_to": str(uuid.uuid4()),
                       "delivery_mode": 2, "delivery_info": {"exchange": queue, "routing_key": queue},
                       "priority": 0, "body_encoding": "base64", "delivery_tag": str(uuid.uuid4())},
    }


class Broker:
    """What the real publisher does to Redis: LPUSH a message onto the lane's queue list."""

    def __init__(self, r) -> None:
        self.r = r
        self.published: list[tuple[str, str]] = []

    def push(self, pid: str, lane: str = INTERACTIVE) -> None:
        queue = keys.QUEUE_BULK if lane == BULK else keys.QUEUE_INTERACTIVE
        self.r.lpush(queue, json.dumps(kombu_message(pid, queue)))

    def __call__(self, pid: str, lane: str) -> None:  # the sweeper's ``publish``
        self.published.append((pid, lane))
        self.push(pid, lane)

    def fetch(self, queue: str = keys.QUEUE_INTERACTIVE) -> str:
        """A worker's BRPOP followed by kombu recording the message as unacked."""
        raw = self.r.rpop(queue)
        msg = json.loads(raw)
        tag = msg["properties"]["delivery_tag"]
        self.r.hset(keys.KOMBU_UNACKED, tag, json.dumps([msg, queue, queue]))
        return tag


@pytest.fixture
def clock(monkeypatch):
    """``clock.created`` is the store's time (when records are made), ``clock.now`` the sweeper's."""
    c = SimpleNamespace(created=NOW - 100, now=NOW)
    monkeypatch.setattr("shared.store.time", SimpleNamespace(time=lambda: c.created))
    monkeypatch.setattr("worker.sweeper.time", SimpleNamespace(time=lambda: c.now))
    return c


@pytest.fixture
def broker(store):
    return Broker(store.r)


@pytest.fixture
def sweeper(store, broker):
    return Sweeper(store, broker, grace_s=GRACE, confirm_s=CONFIRM)


def submit(store, lane: str = INTERACTIVE) -> str:
    pid = new_id()
    assert store.submit(pid, b"bytes", 5, lane).outcome == "ok"
    return pid


def sweep_at(sweeper, clock, t: float) -> list[str]:
    clock.now = t
    return sweeper.sweep()


# --- republishing an orphan ---------------------------------------------------------------------------
def test_orphan_is_republished_once_on_the_second_sweep_at_least_confirm_s_later(store, broker, sweeper, clock):
    pid = submit(store)  # accepted 100 s ago; its message is neither queued nor unacked

    assert sweep_at(sweeper, clock, NOW) == []  # first sighting: only a suspect
    assert sweep_at(sweeper, clock, NOW + CONFIRM / 2) == []  # too soon to confirm
    assert broker.published == []

    assert sweep_at(sweeper, clock, NOW + CONFIRM + 1) == [pid]
    assert broker.published == [(pid, INTERACTIVE)]
    rec = store.get(pid)
    assert rec.status == QUEUED and rec.enqueued_at == pytest.approx(NOW + CONFIRM + 1)

    # the new message sits in the queue: later sweeps leave it alone
    for t in (NOW + 2 * CONFIRM + 2, NOW + 60, NOW + 200):
        assert sweep_at(sweeper, clock, t) == []
    assert broker.published == [(pid, INTERACTIVE)]
    assert store.r.llen(keys.QUEUE_INTERACTIVE) == 1


def test_orphan_is_republished_on_its_own_lane(store, broker, sweeper, clock):
    pid = submit(store, BULK)
    sweep_at(sweeper, clock, NOW)
    assert sweep_at(sweeper, clock, NOW + CONFIRM) == [pid]
    assert broker.published == [(pid, BULK)]
    assert message_pid(store.r.lindex(keys.QUEUE_BULK, -1)) == pid


def test_a_second_sweep_that_no_longer_sees_the_orphan_forgets_the_suspicion(store, broker, sweeper, clock):
    pid = submit(store)
    sweep_at(sweeper, clock, NOW)
    tag_msg = kombu_message(pid, keys.QUEUE_INTERACTIVE)  # a worker turns out to hold it
    store.r.hset(keys.KOMBU_UNACKED, "t1", json.dumps([tag_msg, keys.QUEUE_INTERACTIVE, keys.QUEUE_INTERACTIVE]))
    assert sweep_at(sweeper, clock, NOW + CONFIRM) == []
    store.r.hdel(keys.KOMBU_UNACKED, "t1")  # ... then it is gone again: a fresh suspicion, not a confirmation
    assert sweep_at(sweeper, clock, NOW + 2 * CONFIRM) == []
    assert sweep_at(sweeper, clock, NOW + 3 * CONFIRM) == [pid]
    assert broker.published == [(pid, INTERACTIVE)]


# --- never republished ----------------------------------------------------------------------------------
def test_record_whose_message_is_still_queued_is_never_republished(store, broker, sweeper, clock):
    older = submit(store)
    clock.created += 1
    newer = submit(store)
    broker.push(older)
    broker.push(newer)
    for t in (NOW, NOW + CONFIRM, NOW + 60, NOW + 600):
        assert sweep_at(sweeper, clock, t) == []
    assert broker.published == []
    assert store.r.llen(keys.QUEUE_INTERACTIVE) == 2


def test_record_queued_behind_a_message_created_after_it_is_not_republished(store, broker, sweeper, clock):
    """Records are created before their message is published, and two submits may publish in the
    other order. The publish stamps enqueued_at (Store.mark_enqueued, as the API does), so the
    queue's real order is what the FIFO check sees."""
    a = submit(store)
    clock.created += 0.01
    b = submit(store)
    for pid in (b, a):  # b's request published first, a's a moment later: b is at the queue head
        broker.push(pid)
        clock.created += 0.01
        store.mark_enqueued(pid)  # the store's clock: after the records were created
    for t in (NOW, NOW + CONFIRM, NOW + 2 * CONFIRM):
        sweep_at(sweeper, clock, t)
    assert broker.published == []


def test_record_whose_message_is_unacked_is_never_republished(store, broker, sweeper, clock):
    pid = submit(store)
    broker.push(pid)
    broker.fetch()  # a worker holds it (fetched, not acknowledged)
    assert store.r.llen(keys.QUEUE_INTERACTIVE) == 0
    for t in (NOW, NOW + CONFIRM, NOW + 60):
        assert sweep_at(sweeper, clock, t) == []
    assert broker.published == []


def test_young_record_is_not_republished(store, broker, sweeper, clock):
    clock.created = NOW - GRACE / 2
    pid = submit(store)
    for t in (NOW, NOW + CONFIRM, NOW + GRACE / 2 - 1):
        assert sweep_at(sweeper, clock, t) == []
    assert broker.published == []
    # once past the grace period (and confirmed) it is an orphan like any other
    sweep_at(sweeper, clock, NOW + GRACE)
    assert sweep_at(sweeper, clock, NOW + GRACE + CONFIRM) == [pid]


def test_claimed_or_running_records_are_not_republished(store, broker, sweeper, clock):
    running = submit(store)
    store.transition(running, RUNNING, (QUEUED,), {}, True)
    redelivered = submit(store)  # queued again with attempts 1 (kombu restored a dead worker's message)
    store.r.hset(keys.prediction(redelivered), "attempts", 1)
    for t in (NOW, NOW + CONFIRM, NOW + 60):
        assert sweep_at(sweeper, clock, t) == []
    assert broker.published == []


def test_finished_records_are_not_candidates(store, broker, sweeper, clock):
    pid = submit(store)
    store.transition(pid, "canceled", (QUEUED,), {})
    for t in (NOW, NOW + CONFIRM):
        assert sweep_at(sweeper, clock, t) == []
    assert broker.published == []


def test_only_one_sweeper_at_a_time(store, broker, sweeper, clock):
    submit(store)
    store.r.set(keys.SWEEP_LOCK, "1", ex=60)  # another worker is sweeping
    assert sweep_at(sweeper, clock, NOW) == [] and sweep_at(sweeper, clock, NOW + CONFIRM) == []
    assert store.r.hlen(keys.SWEEP_SUSPECTS) == 0
    store.r.delete(keys.SWEEP_LOCK)
    sweep_at(sweeper, clock, NOW + 2 * CONFIRM)
    assert store.r.get(keys.SWEEP_LOCK) is None  # released after its sweep
    assert store.r.hlen(keys.SWEEP_SUSPECTS) == 1


# --- message_pid ------------------------------------------------------------------------------------------
def test_message_pid_reads_a_queue_message_and_an_unacked_entry():
    msg = kombu_message("abc123", keys.QUEUE_BULK)
    assert message_pid(json.dumps(msg)) == "abc123"
    assert message_pid(json.dumps(msg).encode()) == "abc123"
    assert message_pid(json.dumps([msg, keys.QUEUE_BULK, keys.QUEUE_BULK])) == "abc123"


def test_message_pid_reads_a_plain_json_body():
    msg = kombu_message("p1", keys.QUEUE_BULK)
    msg["body"] = json.dumps([["p1"], {}, {}])
    del msg["properties"]["body_encoding"]
    assert message_pid(json.dumps(msg)) == "p1"


@pytest.mark.parametrize("raw", ["", "not json", "{}", "[]", "[1, 2]", '{"body": "%%%"}',
                                 json.dumps({"body": base64.b64encode(b"[[], {}, {}]").decode(),
                                             "properties": {"body_encoding": "base64"}}),
                                 json.dumps({"body": base64.b64encode(b"nope").decode(),
                                             "properties": {"body_encoding": "base64"}}),
                                 "null", b"\xff\xfe",
                                 '{"body": "x", "properties": null}', '{"body": "x", "properties": []}'])
def test_message_pid_returns_none_on_garbage(raw):
    assert message_pid(raw) is None


def test_a_malformed_unacked_entry_does_not_stop_the_sweeper(store, broker, sweeper, clock):
    """The ``unacked`` hash belongs to kombu (any app on the same database can write it): one odd
    entry must not make every sweep fail."""
    pid = submit(store)
    store.r.hset(keys.KOMBU_UNACKED, "odd", json.dumps([{"body": "x", "properties": None}, "q", "q"]))
    sweep_at(sweeper, clock, NOW)
    assert sweep_at(sweeper, clock, NOW + CONFIRM) == [pid]
