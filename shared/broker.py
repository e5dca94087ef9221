"""The Celery configuration both sides share: the API builds task messages with it, workers consume
with it, and the sweeper publishes with it.

The API never imports the worker: its messages name ``keys.TASK_CLASSIFY`` (``task_message``, pushed
by the submit script; ``enqueue`` sends the same message through Celery).
Reliability settings are derived from ``Settings`` in one place (see the README, "Delivery"):
acks_late so a killed worker's messages are delivered again; a visibility timeout of
``PINFER_VISIBILITY_TIMEOUT_S`` swept every ``PINFER_RESTORE_INTERVAL_S`` (kombu >= 5.7) so that
recovery takes well under a minute; prefetch of twice the batch so the count trigger can fire.
"""
from __future__ import annotations

import base64
import json

from celery import Celery
from celery.utils import uuid
from kombu import Exchange, Queue
from kombu.serialization import dumps

from shared import connections, keys
from shared.schema import BULK
from shared.settings import Settings


def make_celery(settings: Settings, name: str = "pinfer") -> Celery:
    broker, sentinel_options = connections.celery_broker(settings.redis_url)
    app = Celery(name, broker=broker, set_as_current=False)
    app.conf.update(
        task_serializer="json",
        accept_content=["json"],          # never pickle: whoever writes Redis would run code
        result_serializer="json",
        result_backend=None,              # results live in our own records
        task_ignore_result=True,
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        task_default_queue=keys.QUEUE_INTERACTIVE,
        task_queues=[Queue(q, Exchange(q, type="direct"), routing_key=q)
                     for q in (keys.QUEUE_INTERACTIVE, keys.QUEUE_BULK)],
        task_create_missing_queues=False,
        worker_prefetch_multiplier=2 * settings.max_batch,
        worker_hijack_root_logger=False,
        worker_send_task_events=False,
        worker_enable_remote_control=True,
        worker_proc_alive_timeout=120,
        worker_cancel_long_running_tasks_on_connection_loss=False,
        broker_connection_retry_on_startup=True,
        broker_pool_limit=64,
        broker_transport_options={
            "visibility_timeout": settings.visibility_timeout_s,
            "unacked_restore_interval": settings.restore_interval_s,
            "unacked_restore_throttle": 1,
            "queue_order_strategy": "priority",   # interactive queue is always read first
            "socket_keepalive": True,
            "health_check_interval": 25,
            **sentinel_options,               # master_name etc. when PINFER_REDIS_URL is sentinel://
        },
    )
    return app


def enqueue(app: Celery, pid: str, lane: str) -> None:
    """Publish the ID (never the bytes) on the lane's queue.

    By queue name only, so Celery sends it through the anonymous exchange (routing key = queue
    name): kombu's Redis transport then pushes it straight onto the queue's list. Naming the direct
    exchange would make kombu read the exchange's binding table from Redis (SMEMBERS) on every
    publish, an extra round trip per image for the same list. Redelivery is unchanged: an unacked
    message restores to ``routing_key`` when its exchange is anonymous.
    """
    app.send_task(keys.TASK_CLASSIFY, args=[pid], queue=queue_of(lane), ignore_result=True)


def queue_of(lane: str) -> str:
    return keys.QUEUE_BULK if lane == BULK else keys.QUEUE_INTERACTIVE


def task_message(app: Celery, pid: str, lane: str) -> tuple[str, str]:
    """The message ``enqueue`` would send for ``pid``, as (the Redis list it goes to, its JSON), so the
    API's submit script can push it in the same atomic step that stores the image: one round trip
    per submission instead of three (store, publish, stamp), and no accepted image without a message.

    Celery builds the task (``create_task_message``: headers, properties, body) and kombu serializes
    the body, exactly as in ``send_task``; what is written here is only the Redis transport's
    envelope (kombu ``Channel.prepare_message`` + ``basic_publish`` for the anonymous exchange:
    base64 body, persistent, priority 0, a fresh delivery tag), and the list is the queue's own name
    (kombu's key for priority 0). The versions this matches are the ones ``worker.celery_adapter``
    accepts; ``tests/integration/test_celery_adapter.py`` compares it with what ``send_task`` pushes.
    """
    queue = queue_of(lane)
    task_id = uuid()
    msg = app.amqp.create_task_message(task_id, keys.TASK_CLASSIFY, [pid], {}, reply_to=app.thread_oid,
                                       ignore_result=True)
    content_type, content_encoding, body = dumps(msg.body, serializer=app.conf.task_serializer)
    if isinstance(body, str):
        body = body.encode(content_encoding or "utf-8")
    envelope = {
        "body": base64.b64encode(body).decode("ascii"),
        "content-encoding": content_encoding,
        "content-type": content_type,
        "headers": msg.headers,
        "properties": {**msg.properties, "delivery_mode": 2,
                       "delivery_info": {"exchange": "", "routing_key": queue}, "priority": 0,
                       "body_encoding": "base64", "delivery_tag": uuid()},
    }
    return queue, json.dumps(envelope)
