"""worker.batching.FlushRule over the real store on fakeredis: when a worker classifies what it holds.

``Worker`` below plays the worker's event loop the way kombu and celery-batches do: it pops one
message per step (interactive queue first), flushes at PINFER_MAX_BATCH (celery-batches' count
trigger) and otherwise asks the rule.
"""
from __future__ import annotations

import pytest

from shared import keys
from shared.schema import BULK, INTERACTIVE
from worker.batching import FlushRule

QUEUE = {INTERACTIVE: keys.QUEUE_INTERACTIVE, BULK: keys.QUEUE_BULK}


class Worker:
    def __init__(self, store, max_batch: int = 16) -> None:
        self.store, self.max_batch = store, max_batch
        self.reads = 0  # round trips the rule made to read queue lengths
        self.rule = FlushRule(self._queued)
        self.buffer: list[str] = []
        self.batches: list[list[str]] = []

    def _queued(self) -> tuple[int, int]:
        self.reads += 1
        return self.store.queued_by_lane()

    def publish(self, lane: str, n: int = 1) -> None:
        for _ in range(n):
            self.store.r.lpush(QUEUE[lane], lane)

    def receive(self) -> bool:
        """One message, as BRPOP hands it (interactive first); False when both queues are empty."""
        for lane in (INTERACTIVE, BULK):
            if self.store.r.rpop(QUEUE[lane]) is not None:
                self.buffer.append(lane)
                if len(self.buffer) >= self.max_batch or self.rule.arrived(lane):
                    self.flush()
                return True
        return False

    def drain(self) -> list[int]:
        """Receive until nothing is left; the sizes of the batches flushed on the way."""
        start = len(self.batches)
        while self.receive():
            pass
        return [len(b) for b in self.batches[start:]]

    def flush(self) -> None:
        self.batches.append(self.buffer)
        self.buffer = []
        self.rule.flushed()


def test_a_lone_image_is_classified_at_once_as_a_batch_of_one(store):
    w = Worker(store)
    w.publish(INTERACTIVE)
    assert w.drain() == [1] and w.buffer == []


def test_a_batch_is_what_queued_while_the_previous_one_ran(store):
    w = Worker(store, max_batch=16)
    w.publish(INTERACTIVE)
    w.receive()  # flushed at once: the "forward pass" of that batch runs now ...
    w.publish(INTERACTIVE, 5)  # ... while five more images are submitted
    assert w.drain() == [5]
    assert [len(b) for b in w.batches] == [1, 5]


def test_a_backlog_drains_in_full_batches_with_one_queue_read_per_batch(store):
    w = Worker(store, max_batch=4)
    w.publish(BULK, 10)
    assert w.drain() == [4, 4, 2]
    assert w.reads == 4  # one per batch, and one more that finds the queue empty


def test_an_interactive_image_does_not_wait_for_the_bulk_backlog_behind_it(store):
    w = Worker(store, max_batch=16)
    w.publish(BULK, 40)
    for _ in range(3):
        w.receive()  # three bulk images buffered; 37 more are counted as waiting
    assert w.buffer == [BULK] * 3
    w.publish(INTERACTIVE)
    w.receive()  # served before the bulk queue, and flushed at once with what is buffered
    assert w.batches == [[BULK] * 3 + [INTERACTIVE]] and w.buffer == []


def test_interactive_images_queued_together_share_a_batch(store):
    w = Worker(store, max_batch=16)
    w.publish(BULK, 40)
    w.publish(INTERACTIVE, 3)
    w.receive(), w.receive(), w.receive()
    assert w.batches == [[INTERACTIVE] * 3]


def test_messages_another_worker_took_are_not_waited_for(store):
    w = Worker(store, max_batch=16)
    w.publish(BULK, 3)
    w.receive()
    assert w.buffer == [BULK]  # two more counted as waiting
    store.r.delete(keys.QUEUE_BULK)  # another worker fetched them
    assert w.rule.look_again() is True


def test_looking_again_keeps_waiting_while_messages_are_still_queued(store):
    w = Worker(store, max_batch=16)
    w.publish(BULK, 3)
    w.receive()
    assert w.rule.look_again() is False
    assert w.drain() == [3]


def test_new_arrivals_are_found_once_the_counted_ones_are_in(store):
    w = Worker(store, max_batch=16)
    w.publish(BULK, 3)
    w.receive()  # counts 2 more
    w.publish(BULK, 4)  # submitted meanwhile: found when the counted two have arrived
    assert w.drain() == [7]
    assert w.reads == 3  # at the first, the third and the last message


def test_the_rule_classifies_at_once_when_the_queue_lengths_cannot_be_read(store):
    def broken() -> tuple[int, int]:
        raise ConnectionError("redis away")

    assert FlushRule(broken).arrived(INTERACTIVE) is True


@pytest.mark.parametrize("max_batch", [1, 3, 16])
def test_no_image_is_left_buffered_when_the_queues_are_empty(store, max_batch):
    w = Worker(store, max_batch=max_batch)
    w.publish(BULK, 7)
    w.publish(INTERACTIVE, 2)
    sizes = w.drain()
    assert sum(sizes) == 9 and max(sizes) <= max_batch and w.buffer == []
