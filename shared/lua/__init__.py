"""Server-side scripts: every status change is one atomic step in Redis.

A prediction's status, its job's counters, the backpressure sets, the job's results list and the
"done" notification change together or not at all, so counts always add up, an image is counted as
finished exactly once (however many times it is delivered), and no reader sees half a transition.

Each script is a ``<name>.lua`` file in this package (package data, so a wheel carries them), run by
one ``Store`` method. ``lib.lua`` is prepended to each: it decodes ARGV[1], the data model (every
status, key template and TTL, built once by ``Store`` from ``shared.keys``, ``shared.schema`` and the
settings) and ARGV[2], the call's options as a JSON object of named fields. Keys known before the call
are passed as KEYS; a key whose ID the script only learns from a record (a prediction's job, its
owner, an evicted cache digest) comes from a template in the model (single-node Redis, no cluster).
"""
from __future__ import annotations

from functools import cache
from importlib.resources import files

#: The scripts, by file name without ``.lua``.
NAMES = ("submit", "transition", "mark_in_flight", "close_job", "create_job", "lease_core", "webhook_claim",
         "cache_put", "idempotency_begin", "idempotency_abort")


@cache
def source(name: str) -> str:
    """The full text of script ``name``: ``lib.lua`` followed by ``<name>.lua``."""
    here = files(__name__)
    return here.joinpath("lib.lua").read_text(encoding="utf-8") + "\n" + \
        here.joinpath(f"{name}.lua").read_text(encoding="utf-8")
