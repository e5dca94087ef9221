"""The Celery configuration both sides share: the API publishes with it, workers consume with it.

The API never imports the worker: it sends ``keys.TASK_CLASSIFY`` by name through ``enqueue``.
Reliability settings are derived from ``Settings`` in one place (see the README, "Delivery"):
acks_late so a killed worker's messages are delivered again; a visibility timeout of
``PINFER_VISIBILITY_TIMEOUT_S`` swept every ``PINFER_RESTORE_INTERVAL_S`` (kombu >= 5.7) so that
recovery takes well under a minute; prefetch of twice the batch so the count trigger can fire.
"""
from __future__ import annotations

from celery import Celery
from kombu import Exchange, Queue

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
    queue = keys.QUEUE_BULK if lane == BULK else keys.QUEUE_INTERACTIVE
    app.send_task(keys.TASK_CLASSIFY, args=[pid], queue=queue, ignore_result=True)
