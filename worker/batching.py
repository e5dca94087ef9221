"""When a worker stops collecting messages and classifies them: adaptive micro-batching, without Celery.

The rule (README, "Micro-batching"): a worker classifies what it has buffered as soon as

1. it holds ``PINFER_MAX_BATCH`` images (celery-batches' count trigger), or
2. the broker has nothing more for it: no message waits in the queues it would take next
   (while an interactive image is buffered, only the interactive queue counts, so bulk work queued
   behind it never delays it), or
3. ``PINFER_MAX_WAIT_MS`` passed (celery-batches' timer; the bound on any added wait).

So an image that arrives at an idle worker runs at once, as a batch of one; under load a batch is
what queued up while the previous forward pass ran, up to PINFER_MAX_BATCH. Nothing waits on a guess
about future arrivals, only on messages that are already in Redis.

Asking Redis after every message would cost a round trip per image. ``FlushRule`` remembers how
many messages it saw waiting per lane and asks again only when those have arrived: one round trip
per batch while a backlog drains. Another worker may take messages this one counted; then no
message arrives, and ``look_again`` (called when nothing arrived for a short while) asks afresh.
"""
from __future__ import annotations

import logging
from typing import Callable

from shared.schema import BULK, INTERACTIVE

log = logging.getLogger(__name__)

#: How long a worker that counted waiting messages goes without receiving one before it asks Redis
#: again. It only matters when another worker took the messages it counted; it is not a wait added to
#: any image, since a message that is queued arrives well within it.
LOOK_AGAIN_S = 0.002


class FlushRule:
    """Counts what waits in the broker per lane and says when a worker's buffer should be classified.

    ``queued`` returns the messages waiting in (interactive, bulk) queues, not yet fetched by any
    worker. If it fails (Redis away), the rule answers "flush": an image is never held on a guess.
    """

    def __init__(self, queued: Callable[[], tuple[int, int]]) -> None:
        self.queued = queued
        self._ahead = {INTERACTIVE: 0, BULK: 0}  # messages seen waiting, not yet received, per lane
        self._interactive_buffered = False

    def arrived(self, lane: str) -> bool:
        """A message of ``lane`` was buffered (and the buffer is not full): whether to flush now."""
        if lane == INTERACTIVE:
            self._interactive_buffered = True
        if self._ahead[lane] > 0:
            self._ahead[lane] -= 1  # one of those counted as waiting
        return self._nothing_to_wait_for()

    def look_again(self) -> bool:
        """Nothing arrived for LOOK_AGAIN_S although messages were counted: ask the broker afresh."""
        self._ahead = {INTERACTIVE: 0, BULK: 0}
        return self._nothing_to_wait_for()

    def flushed(self) -> None:
        """The buffer was classified: what was counted may be stale by the time the batch is done."""
        self._ahead = {INTERACTIVE: 0, BULK: 0}
        self._interactive_buffered = False

    def _worth_waiting_for(self) -> int:
        bulk = 0 if self._interactive_buffered else self._ahead[BULK]
        return self._ahead[INTERACTIVE] + bulk

    def _nothing_to_wait_for(self) -> bool:
        if self._worth_waiting_for() > 0:
            return False
        try:
            interactive, bulk = self.queued()
        except Exception as exc:  # Redis away: classify what is here; the batch reports the outage
            log.warning("could not read the queue lengths (%s): classifying the buffered images now", exc)
            return True
        self._ahead = {INTERACTIVE: interactive, BULK: bulk}
        return self._worth_waiting_for() == 0
