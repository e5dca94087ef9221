"""api.waiters against fakeredis pub/sub: a done notification wakes exactly the requests waiting for
that ID, and the cap keeps long-polls from occupying every server thread."""
from __future__ import annotations

import fakeredis
import pytest

from api.waiters import Waiters
from shared import keys
from shared.settings import Settings
from shared.store import Store


@pytest.fixture
def client(server):
    return fakeredis.FakeRedis(server=server, decode_responses=True)


def test_done_notification_wakes_the_waiter_for_that_id_only(client):
    waiters = Waiters(Store(Settings(), client), max_waiters=10)
    with waiters.waiting("a") as ev_a, waiters.waiting("b") as ev_b, waiters.waiting("a") as ev_a2:
        assert ev_a is not None and ev_b is not None and ev_a2 is not None
        assert not ev_a.is_set() and not ev_b.is_set()
        client.publish(keys.DONE_CHANNEL, "a")
        assert ev_a.wait(5) and ev_a2.wait(5)  # every request waiting for "a"
        assert not ev_b.is_set()  # "a" and "b" were handled in order by one listener: "b" was not woken
        client.publish(keys.DONE_CHANNEL, "b")
        assert ev_b.wait(5)


def test_notification_for_an_id_nobody_waits_for_is_harmless(client):
    waiters = Waiters(Store(Settings(), client), max_waiters=10)
    with waiters.waiting("a") as ev:
        client.publish(keys.DONE_CHANNEL, "zzz")
        client.publish(keys.DONE_CHANNEL, "a")
        assert ev.wait(5)


def test_binary_client_payloads_are_decoded(server):
    raw = fakeredis.FakeRedis(server=server)  # no decode_responses: messages arrive as bytes
    waiters = Waiters(Store(Settings(), raw), max_waiters=10)
    with waiters.waiting("pid1") as ev:
        raw.publish(keys.DONE_CHANNEL, "pid1")
        assert ev.wait(5)


def test_cap_returns_none_past_max_waiters_and_frees_the_slot_on_exit(client):
    waiters = Waiters(Store(Settings(), client), max_waiters=2)
    with waiters.waiting("a") as first:
        with waiters.waiting("b") as second:
            assert first is not None and second is not None
            with waiters.waiting("c") as third:
                assert third is None  # over the cap: the caller answers at once
        assert waiters._count == 1
        with waiters.waiting("c") as again:
            assert again is not None  # the slot was freed
    assert waiters._count == 0 and waiters._events == {}


def test_slot_is_freed_when_the_request_fails(client):
    waiters = Waiters(Store(Settings(), client), max_waiters=1)
    with pytest.raises(RuntimeError):
        with waiters.waiting("a"):
            raise RuntimeError("request failed while waiting")
    with waiters.waiting("a") as ev:
        assert ev is not None


def test_zero_cap_never_waits(client):
    waiters = Waiters(Store(Settings(), client), max_waiters=0)
    with waiters.waiting("a") as ev:
        assert ev is None
    assert waiters._count == 0

