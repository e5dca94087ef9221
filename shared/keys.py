"""Every Redis key, channel and queue name pinfer uses, in one place.

Nothing else in the code base builds a key from a string: call these functions, so a key's
layout can be read (and changed) here alone.
"""
from __future__ import annotations

PREFIX = "pinfer:"

#: Celery queues: interactive single submissions, and bulk job images. Workers always look at the
#: interactive queue first (kombu ``queue_order_strategy='priority'``).
QUEUE_INTERACTIVE = "pinfer.interactive"
QUEUE_BULK = "pinfer.bulk"
#: The registered name of the batched classify task; the API sends by name and never imports the worker.
TASK_CLASSIFY = "pinfer.classify"

#: Pub/sub channel on which workers publish the ID of every prediction that reached a terminal state.
DONE_CHANNEL = PREFIX + "done"

#: Sorted set of prediction IDs stored but not yet classified, scored by the time their bytes expire
#: (so entries of lost images age out by themselves): the global backpressure bound.
PENDING = PREFIX + "pending"
#: Sorted set: worker name -> last heartbeat (unix time).
WORKERS = PREFIX + "workers"
#: Integer bumped by `pinfer reload`: every worker that sees it grow re-reads the model folder and
#: swaps in the model it names (between batches), whatever PINFER_RELOAD_CHECK_S says.
MODEL_RELOAD = PREFIX + "model-reload"


def prediction(pid: str) -> str:
    """Hash: the prediction record (status, top_k, timings, result JSON, error)."""
    return f"{PREFIX}p:{pid}"


def image(pid: str) -> str:
    """String: the uploaded bytes, deleted once classified."""
    return f"{PREFIX}img:{pid}"


def worker(name: str) -> str:
    """Hash: a worker's heartbeat record (state, pid, core, model sha, precision)."""
    return f"{PREFIX}w:{name}"


def job(jid: str) -> str:
    """Hash: a bulk job (name, top_k, times, and one counter per status)."""
    return f"{PREFIX}job:{jid}"


def job_items(jid: str) -> str:
    """List: the job's prediction IDs in the order they were added."""
    return f"{PREFIX}job:{jid}:items"


def job_done(jid: str) -> str:
    """List: the job's prediction IDs in the order they finished (the results cursor walks it)."""
    return f"{PREFIX}job:{jid}:done"


def job_pending(jid: str) -> str:
    """Sorted set: the job's prediction IDs not yet classified (the per-job backpressure bound)."""
    return f"{PREFIX}job:{jid}:pending"


def job_names(jid: str) -> str:
    """Hash: client name -> prediction ID, so a resumed upload of the same file is not queued twice."""
    return f"{PREFIX}job:{jid}:names"


def core_leases(host: str) -> str:
    """Hash: core number -> "<holder>|<lease expiry>" on ``host`` (compose replicas pick distinct cores)."""
    return f"{PREFIX}cores:{host}"


def job_rate(jid: str) -> str:
    """Hash: 5-second bucket number -> images finished in it (the job's current rate)."""
    return f"{PREFIX}job:{jid}:rate"


#: Width of the rate buckets above, and how long the buckets live (the rate looks back 30 s at most).
RATE_BUCKET_S = 5
RATE_TTL_S = 300

#: kombu's Redis transport keeps messages delivered but not yet acknowledged in this hash
#: (delivery tag -> [message, exchange, routing key]); the sweeper reads it to find orphans.
KOMBU_UNACKED = "unacked"
#: Lock so that only one worker at a time sweeps for orphaned predictions.
SWEEP_LOCK = PREFIX + "sweep-lock"
#: Hash: prediction ID -> when a sweep first saw it orphaned; republished only if a later sweep agrees.
SWEEP_SUSPECTS = PREFIX + "sweep-suspects"
#: Suspects not seen again by a sweep within this long are forgotten (no sweeper running any more).
SWEEP_SUSPECTS_TTL_S = 300
#: String with a TTL, set by every interactive submission: while it exists, workers run bulk work in
#: small chunks that yield to interactive work; otherwise in full batches.
INTERACTIVE_RECENT = PREFIX + "interactive-recent"


#: Webhook events (``"p:<prediction id>"`` or ``"j:<job id>"``) due for delivery, pushed by the same
#: Lua script that makes the prediction terminal or finishes the job (so no event is ever missed).
WEBHOOK_OUTBOX = PREFIX + "webhooks:outbox"
#: Sorted set: event -> when its next attempt is due (exponential backoff after a failed attempt).
WEBHOOK_RETRY = PREFIX + "webhooks:retry"
#: Sorted set: event -> lease expiry while a deliverer holds it; an expired lease (deliverer died)
#: puts the event back in the outbox.
WEBHOOK_INFLIGHT = PREFIX + "webhooks:inflight"


def webhook_attempts(event: str) -> str:
    """List: one JSON object per delivery attempt of ``event`` (readable on the prediction or job)."""
    return f"{PREFIX}webhooks:attempts:{event}"


#: At most this many due retries / expired leases go back to the outbox per claim (bounds one script run).
WEBHOOK_MOVE_BATCH = 100


def prediction_event(pid: str) -> str:
    """The webhook event of prediction ``pid`` reaching a terminal state (an outbox entry)."""
    return f"p:{pid}"


def job_event(jid: str) -> str:
    """The webhook event of job ``jid`` finishing or being canceled (an outbox entry)."""
    return f"j:{jid}"


def event_target(event: str) -> tuple[str, str]:
    """("prediction" | "job", ID) of a webhook event."""
    kind, _, ident = event.partition(":")
    return ("prediction" if kind == "p" else "job"), ident
#: Sorted set: job ID -> created_at, the index of jobs for the dashboard and the jobs-by-status
#: metric (trimmed to PINFER_RESULT_TTL_S, the life of a job record).
JOBS = PREFIX + "jobs"
def cache(digest: str) -> str:
    """String with a TTL: a stored result (JSON) for the content digest of (bytes, model sha256,
    precision, resize mode, top_k); see ``shared.store.cache_digest``."""
    return f"{PREFIX}cache:{digest}"


#: Sorted set: cache digest -> when it was stored; bounds the cache's size (oldest removed first).
CACHE_INDEX = PREFIX + "cache-index"


def idempotency(scope: str, route: str, key: str) -> str:
    """Hash with a TTL: the answer to the request sent with ``Idempotency-Key: key`` to ``route`` by
    the client ``scope`` (its API key's name; keys of different clients never meet)."""
    return f"{PREFIX}idem:{scope}:{route}:{key}"


#: How long an Idempotency-Key claim lives while nothing is recorded under it: the first request's
#: process died before its script ran, so nothing was created and a retry may run it again.
IDEMPOTENCY_PENDING_S = 60


def key_pending(name: str) -> str:
    """Sorted set: the API key ``name``'s prediction IDs not yet classified (its own pending bound).
    The transition script fills it in (from ``Store``'s template) with a record's ``owner``."""
    return f"{PENDING}:{name}"
