"""worker.sweeper: predictions whose broker message was lost are published again -- only when two
sweeps at least ``confirm_s`` apart agree, exactly once, and never while a message for them is in a
queue or in kombu's ``unacked`` hash.

The store is fakeredis; the kombu layout in it is made of real messages: each one published through
pinfer's Celery app to a real redis-server (tests/fixtures/celery_messages.py) and copied into the
queue lists (LPUSH adds, BRPOP takes from the right) or, as a real consumer's fetch left it, into the
``unacked`` hash. Clocks are replaced per module (store: when records were created; sweeper: now).
"""
from __future__ import annotations

import json
import time
from types import SimpleNamespace

import pytest

from shared import keys
from shared.schema import BULK, INTERACTIVE, QUEUED, RUNNING, new_id
from tests.fixtures.celery_messages import RealBroker, queue_of
from worker.celery_adapter import message_pid
from worker.sweeper import Sweeper

GRACE, CONFIRM = 30.0, 4.0
NOW = time.time()


class Broker:
    """What the real publisher and consumers do to Redis, with real messages (``real``)."""

    def __init__(self, r, real: RealBroker) -> None:
        self.r, self.real = r, real
        self.published: list[tuple[str, str]] = []
        self._pid: dict[str, tuple[str, str]] = {}  # queue item -> (pid, lane)

    def push(self, pid: str, lane: str = INTERACTIVE) -> None:
        raw = self.real.queued(pid, lane)
        self._pid[raw] = (pid, lane)
        self.r.lpush(queue_of(lane), raw)

    def __call__(self, pid: str, lane: str) -> None:  # the sweeper's ``publish``
        self.published.append((pid, lane))
        self.push(pid, lane)

    def fetch(self, queue: str = keys.QUEUE_INTERACTIVE) -> None:
        """A worker's BRPOP followed by kombu recording the message as unacked."""
        pid, lane = self._pid[self.r.rpop(queue)]
        self.hold(pid, lane)

    def hold(self, pid: str, lane: str = INTERACTIVE) -> str:
        """Put kombu's ``unacked`` entry for a fetched message of ``pid``; returns its tag."""
        tag, value = self.real.unacked(pid, lane)
        self.r.hset(keys.KOMBU_UNACKED, tag, value)
        return tag


@pytest.fixture(scope="module")
def real_broker(tmp_path_factory):
    b = RealBroker(tmp_path_factory.mktemp("redis"))
    yield b
    b.close()


@pytest.fixture
def clock(monkeypatch):
    """``clock.created`` is the store's time (when records are made), ``clock.now`` the sweeper's."""
    c = SimpleNamespace(created=NOW - 100, now=NOW)
    monkeypatch.setattr("shared.store.time", SimpleNamespace(time=lambda: c.created))
    monkeypatch.setattr("worker.sweeper.time", SimpleNamespace(time=lambda: c.now))
    return c


@pytest.fixture
def broker(store, real_broker):
    return Broker(store.r, real_broker)


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
    tag = broker.hold(pid)  # a worker turns out to hold it
    assert sweep_at(sweeper, clock, NOW + CONFIRM) == []
    store.r.hdel(keys.KOMBU_UNACKED, tag)  # ... then it is gone again: a fresh suspicion, not a confirmation
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


def test_a_malformed_unacked_entry_does_not_stop_the_sweeper(store, broker, sweeper, clock):
    """The ``unacked`` hash belongs to kombu (any app on the same database can write it): one odd
    entry must not make every sweep fail."""
    pid = submit(store)
    store.r.hset(keys.KOMBU_UNACKED, "odd", json.dumps([{"body": "x", "properties": None}, "q", "q"]))
    sweep_at(sweeper, clock, NOW)
    assert sweep_at(sweeper, clock, NOW + CONFIRM) == [pid]
