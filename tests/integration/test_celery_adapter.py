"""worker.celery_adapter against what the installed Celery and kombu really write to a real
redis-server: messages published by pinfer's Celery app (``shared.broker.enqueue``, as the API and
the sweeper publish) and the ``unacked`` entries a real kombu consumer leaves when it prefetches
without acknowledging, as a worker does until its batch is done. Run these before setting
PINFER_ALLOW_UNTESTED_CELERY=1 on a new release."""
from __future__ import annotations

import base64
import json

import pytest

from shared import keys
from shared.broker import task_message
from shared.schema import BULK, INTERACTIVE, new_id
from shared.settings import Settings
from shared.store import Store
from tests.fixtures.celery_messages import RealBroker, queue_of
from worker.celery_adapter import lane_of, message_pid, unacked_pids

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def real(tmp_path_factory):
    b = RealBroker(tmp_path_factory.mktemp("redis"))
    yield b
    b.close()


@pytest.fixture
def broker(real):
    """Empty queues and no unacked messages (not FLUSHDB: kombu's exchange bindings live there too)."""
    real.r.delete(keys.QUEUE_INTERACTIVE, keys.QUEUE_BULK, keys.KOMBU_UNACKED)
    return real


@pytest.mark.parametrize("lane", [INTERACTIVE, BULK])
def test_published_messages_wait_in_the_lane_list_and_decode_to_their_prediction(broker, lane):
    pids = [new_id() for _ in range(3)]
    for pid in pids:
        broker.publish(pid, lane)
    # kombu keeps a (priority 0) queue as a list named after it: what Store.queued_by_lane counts
    interactive, bulk = Store(Settings(redis_url=broker.app.conf.broker_url)).queued_by_lane()
    assert (interactive, bulk) == ((3, 0) if lane == INTERACTIVE else (0, 3))
    items = broker.r.lrange(queue_of(lane), 0, -1)
    assert [message_pid(raw) for raw in reversed(items)] == pids  # LPUSH: the oldest at the right
    assert message_pid(broker.r.lindex(queue_of(lane), -1)) == pids[0]  # the sweeper's queue head


def test_messages_a_consumer_prefetched_are_read_from_the_unacked_hash(broker):
    held = [new_id() for _ in range(3)]
    waiting = new_id()
    for pid in held:
        broker.publish(pid, BULK)
    with broker.hold(BULK, n=3) as messages:
        broker.publish(waiting, BULK)
        assert sorted(str(m.payload[0][0]) for m in messages) == sorted(held)
        assert all(lane_of(m) == BULK for m in messages)
        assert broker.r.hlen(keys.KOMBU_UNACKED) == 3  # kombu's unacked_key is keys.KOMBU_UNACKED
        assert Store(Settings(redis_url=broker.app.conf.broker_url)).unacked_messages() == 3
        assert unacked_pids(broker.r.hvals(keys.KOMBU_UNACKED)) == set(held)
        messages[0].ack()
        assert unacked_pids(broker.r.hvals(keys.KOMBU_UNACKED)) == set(held) - {str(messages[0].payload[0][0])}
    assert [message_pid(m) for m in broker.r.lrange(queue_of(BULK), 0, -1)].count(waiting) == 1


def test_an_interactive_consumer_message_has_the_interactive_lane(broker):
    pid = new_id()
    broker.publish(pid, INTERACTIVE)
    with broker.hold(INTERACTIVE) as [message]:
        assert lane_of(message) == INTERACTIVE
        assert unacked_pids(broker.r.hvals(keys.KOMBU_UNACKED)) == {pid}


def test_a_body_without_base64_encoding_decodes_too(broker):
    """kombu base64-encodes bodies on Redis by default; a transport configured otherwise stores the
    JSON body as it is."""
    raw = broker.queued(new_id(), INTERACTIVE)
    msg = json.loads(raw)
    assert msg["properties"]["body_encoding"] == "base64"
    pid = message_pid(raw)
    msg["body"] = base64.b64decode(msg["body"]).decode()
    del msg["properties"]["body_encoding"]
    assert message_pid(json.dumps(msg)) == pid


@pytest.mark.parametrize("lane", [INTERACTIVE, BULK])
def test_the_message_the_submit_script_pushes_is_the_one_send_task_sends(broker, lane):
    """The API builds the task message itself (shared.broker.task_message) so its submit script can
    push it with the image in one step: it must be what Celery + kombu send, field for field, apart
    from the fresh IDs, and a real kombu consumer must take it as a classify task for that image."""
    pid = new_id()
    sent = json.loads(broker.queued(pid, lane))
    queue, built = task_message(broker.app, pid, lane)
    built = json.loads(built)
    assert queue == queue_of(lane)

    def ids_blanked(m: dict) -> dict:
        m = json.loads(json.dumps(m))
        for k in ("id", "root_id"):
            m["headers"][k] = "-"
        m["properties"]["correlation_id"] = m["properties"]["delivery_tag"] = "-"
        return m

    assert ids_blanked(built) == ids_blanked(sent)
    assert built["headers"]["id"] != sent["headers"]["id"]
    assert built["properties"]["delivery_tag"] != sent["properties"]["delivery_tag"]
    broker.r.lpush(queue, json.dumps(built))
    with broker.hold(lane, n=1) as [message]:
        assert message.headers["task"] == keys.TASK_CLASSIFY and message.payload[0] == [pid]
        assert lane_of(message) == lane
