"""How many threads torch may use in one worker process: the one rule, used by the launcher and the runtime."""
from __future__ import annotations

import os
from typing import Mapping

# Set by the launcher (worker/launcher.py) to the core it pinned a child to with taskset; empty when
# the child runs unpinned.
PINNED_CORE_ENV = "PINFER_WORKER_CORE"


def torch_threads(environ: Mapping[str, str] | None = None, affinity: set[int] | None = None) -> int:
    """Threads for torch's intra-op pool.

    Pinned (the launcher set PINFER_WORKER_CORE): one per core the process is pinned to, i.e. the
    core it was given or leased, so pinned workers never share a core.
    Unpinned (no core left to lease, no host key, no taskset, or started by hand): OMP_NUM_THREADS
    when it is a positive integer, else 1. torch's own default, one thread per host core, would let
    each unpinned worker compete with every pinned one for every core.
    ``environ`` and ``affinity`` (default: this process's) are for tests.
    """
    env = os.environ if environ is None else environ
    if env.get(PINNED_CORE_ENV, "").strip():
        return max(1, len(os.sched_getaffinity(0) if affinity is None else affinity))
    raw = env.get("OMP_NUM_THREADS", "").strip()
    return int(raw) if raw.isdigit() and int(raw) > 0 else 1
