"""gunicorn settings for the pinfer API: `gunicorn -c python:pinfer.gunicorn_conf 'api:create_app()'`.

A module of the package (not a file beside it), so that `pinfer api`, the container's `api` role
and a source checkout all find the same settings wherever pinfer is installed.

Every value comes from the PINFER_* settings (shared/settings.py), read once here through
``Settings.from_env()``; anything else can still be overridden per run with GUNICORN_CMD_ARGS.

Why gthread (threads) and not sync or gevent
--------------------------------------------
The API's slow requests are long-polls (GET /v1/predictions/<id>?wait=S, S <= PINFER_MAX_WAIT_S =
30 s) that sleep on a threading.Event until the result lands. They use no CPU, so a blocked thread
costs a few hundred KiB of stack and nothing else.
* sync: one request per process, so 2 processes would be starved by 2 long-polls.
* gevent: would need monkey-patching of redis-py, kombu/Celery and threading before anything else
  is imported; a C-level blocking call (Pillow decode, a hiredis read) then stalls every request
  of that process. Not worth it for a few hundred concurrent waits.
* gthread: PINFER_API_PROCESSES processes x PINFER_API_THREADS threads. The API holds at most
  PINFER_MAX_WAITERS long-polls per process and answers `wait` at once past that, so with
  threads > max_waiters (256 > 192 by default) at least 64 threads per process always remain for
  submissions, however many clients long-poll. Idle keep-alive connections (from nginx) wait in
  the worker's poller, not on a thread.

Timeouts
--------
* timeout (60 s): for gthread this is the liveness of a worker process's main loop (the arbiter
  kills a process that stops heart-beating), not a per-request limit; it stays above the longest
  long-poll anyway. A sync worker would be killed mid long-poll with a smaller value.
* graceful_timeout: on SIGTERM/reload/max_requests a process finishes what it holds: a held
  long-poll needs up to PINFER_MAX_WAIT_S, so this is max_wait_s + 5 (35 s); compose gives the
  container 45 s (stop_grace_period).
* keepalive (75 s): nginx keeps idle upstream connections for 60 s (keepalive_timeout in
  deploy/nginx.conf); gunicorn must hold them longer so that nginx, never gunicorn, closes an idle
  one - otherwise nginx may send a POST on a connection gunicorn is closing and, as POSTs are not
  retried, the client gets a 502. (The usual 2-5 s advice is for gunicorn facing clients directly.)
"""
from __future__ import annotations

import os
import sys

from shared.settings import Settings

_settings = Settings.from_env()

# --- where and how many -------------------------------------------------------------------------
bind = [f"0.0.0.0:{_settings.port}"]
workers = _settings.api_processes
worker_class = "gthread"
threads = _settings.api_threads
# Connections one process accepts at once (gthread): held long-polls + idle keep-alives.
worker_connections = max(1000, 4 * threads)
proc_name = "pinfer-api"
# App factory runs in each process after fork: Redis pools and Celery producers are never shared.
preload_app = False

if threads <= _settings.max_waiters:
    sys.stderr.write(
        f"pinfer: WARNING PINFER_API_THREADS={threads} <= PINFER_MAX_WAITERS={_settings.max_waiters}: "
        "long-polls can occupy every thread and starve submissions; keep threads above max_waiters.\n")

# --- memory -------------------------------------------------------------------------------------
def _cap_malloc_arenas(arenas: int) -> bool:
    """Cap glibc's malloc arenas in this process (inherited by the workers it forks); True if set.

    glibc gives a thread that finds the arenas busy an arena of its own, up to 8 per core, and keeps
    each one's freed memory. A gthread process serving a few dozen concurrent requests therefore
    grew +14 % and +65 % over a 10-minute soak with no Python allocation growing (tracemalloc);
    with 2 arenas the same soak levelled off (README, "Soak"). Set at run time rather than through
    MALLOC_ARENA_MAX so that every way of starting the API (pinfer api, the image, a bare gunicorn
    -c) gets it; an explicit MALLOC_ARENA_MAX still wins.
    """
    if arenas <= 0 or os.environ.get("MALLOC_ARENA_MAX") or not sys.platform.startswith("linux"):
        return False
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt  # glibc only; musl has none
    except (OSError, AttributeError):
        return False
    M_ARENA_MAX = -8  # malloc.h
    return bool(mallopt(M_ARENA_MAX, arenas))


_cap_malloc_arenas(_settings.api_malloc_arenas)

# --- timeouts -----------------------------------------------------------------------------------
timeout = max(60, int(_settings.max_wait_s) + 30)
graceful_timeout = max(30, int(_settings.max_wait_s) + 5)
keepalive = 75

# Recycle processes now and then (slow leaks, fragmentation); jitter keeps them from restarting
# together. In-flight requests finish within graceful_timeout.
max_requests = 10_000
max_requests_jitter = 1_000

# The heartbeat file gunicorn fchmod()s every second: on tmpfs so a slow disk (Docker's overlay)
# cannot stall it and get a healthy worker killed.
if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK):
    worker_tmp_dir = "/dev/shm"

# --- request limits (gunicorn's defaults, spelled out) ------------------------------------------
limit_request_line = 4094
limit_request_fields = 100
limit_request_field_size = 8190

# --- proxy --------------------------------------------------------------------------------------
# Trust X-Forwarded-Proto/-For only from these addresses. compose sets FORWARDED_ALLOW_IPS="*":
# the API is not published there, nginx (whose address changes) is the only client.
forwarded_allow_ips = os.environ.get("FORWARDED_ALLOW_IPS", "127.0.0.1,::1")

# --- logs ---------------------------------------------------------------------------------------
errorlog = "-"
loglevel = os.environ.get("GUNICORN_LOG_LEVEL", "info")
if _settings.log_format == "json":
    # One JSON object per line (shared/logs.py). The app logs each request itself (event "request",
    # with request_id, status and duration_ms), so gunicorn's access log would only repeat it.
    accesslog = None
    logconfig_dict = {
        "version": 1, "disable_existing_loggers": False,
        "formatters": {"json": {"()": "shared.logs.json_formatter"}},
        "filters": {"context": {"()": "shared.logs.ContextFilter"}},
        "handlers": {"stderr": {"class": "logging.StreamHandler", "formatter": "json", "filters": ["context"],
                                "stream": "ext://sys.stderr"}},
        "root": {"level": loglevel.upper(), "handlers": ["stderr"]},
        "loggers": {"gunicorn.error": {"level": loglevel.upper(), "handlers": ["stderr"], "propagate": False}},
    }
else:
    accesslog = "-"
    # X-Request-ID is set by nginx (deploy/nginx.conf): the same id appears in both access logs.
    access_log_format = ('%({x-forwarded-for}i)s %(h)s "%(r)s" %(s)s %(B)s %(M)sms '
                         'rid=%({x-request-id}i)s ua="%(a)s"')

    def post_worker_init(worker) -> None:
        """The app's own loggers (pinfer.*) in plain lines beside gunicorn's."""
        from shared import logs

        logs.setup("text", loglevel.upper())


# --- Prometheus (api/metrics.py) ----------------------------------------------------------------
# Every process of this server writes its counters to files in one folder, and /metrics merges them
# (prometheus_client multiprocess mode). One folder per server, emptied when it starts: counters of
# an earlier run or of another server must not be merged in. PROMETHEUS_MULTIPROC_DIR is set here,
# in the arbiter, before any worker is forked (prometheus_client picks its value store at import).
_metrics_tmp: list[str] = []


def on_starting(server) -> None:
    import shutil
    import tempfile

    path = _settings.metrics_dir
    if path:
        shutil.rmtree(path, ignore_errors=True)
        os.makedirs(path, exist_ok=True)
    else:
        path = tempfile.mkdtemp(prefix="pinfer-metrics-")
        _metrics_tmp.append(path)
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = path


def child_exit(server, worker) -> None:
    """A dead process's live gauges (long-polls held) must leave the sum; its counters stay."""
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(worker.pid)


def on_exit(server) -> None:
    import shutil

    for path in _metrics_tmp:
        shutil.rmtree(path, ignore_errors=True)

# gunicorn >= 25.1 opens a control socket ($HOME/.gunicorn/gunicorn.ctl) by default; several API
# servers of one user (tests, replicas sharing a home) would fight over that path. Off unless
# GUNICORN_CONTROL_SOCKET names one. (Older gunicorn ignores both names.)
if os.environ.get("GUNICORN_CONTROL_SOCKET"):
    control_socket = os.environ["GUNICORN_CONTROL_SOCKET"]
else:
    control_socket_disable = True
