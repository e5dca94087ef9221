"""One pinfer deployment on this machine: compose it, wait until it serves, stop it in order.

The only code that puts a stack together (``pinfer up``, the integration tests' ``make_stack``
and the benchmarks all use :class:`Stack`), so the tests and the benchmarks run exactly what a
user runs. The commands themselves are :mod:`pinfer.procs` (redis-server, gunicorn, the worker
launcher) and :mod:`pinfer.topology` (nginx rendered from ``deploy/nginx.conf``).

Start order: Redis (private, unless ``redis_url`` names one), the worker launchers (they load the
model while the API starts), the API servers, nginx; then wait until the APIs answer and the
workers have sent a READY heartbeat. :meth:`Stack.stop` goes the other way: nginx, the APIs (no
new work), the workers (each finishes its batch while Redis is still up to take the results),
Redis; the processes of one kind are signalled together and waited for together. Whatever is
still alive after that (a descendant that outlived its parent) is SIGKILLed, matched by pid *and*
start time so a recycled pid is never hit.

``cores`` pins every process the stack starts to those cores (the affinity is inherited at fork).
Waits here are start-up waits (:func:`pinfer.procs.wait_until`), never a test's oracle.

About 440 lines, on purpose: this is the one place that knows the start and stop order of a whole
deployment; the per-process commands are already in :mod:`pinfer.procs` and :mod:`pinfer.topology`.
"""
from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator, Mapping

from pinfer import procs as _procs
from pinfer.procs import Proc, free_port, wait_until

# Settings every test and benchmark stack runs with unless told otherwise: exact fp32 inference
# (results comparable with in-process runs) and no result cache (a resubmitted image must be
# inferred again; tests/integration/test_cache.py and bench/cache_hit.py turn it on).
TEST_ENV = {"PINFER_PRECISION": "fp32", "PINFER_RESIZE": "exact", "PINFER_CACHE_TTL_S": "0",
            "PYTHONUNBUFFERED": "1"}

# Order of :meth:`Stack.stop`, by the kind of process (the part of ``Proc.name`` before ':').
_STOP_RANK = {"nginx": 0, "api": 1, "baseline": 1, "workers": 3, "redis": 4, "sentinel": 4}


def stack_env(model_dir: Path | str | None = None, base_env: Mapping[str, str] | None = None,
              cores: Iterable[int] | None = None) -> dict[str, str]:
    """``TEST_ENV`` on top of ``base_env`` (default ``os.environ``), ``PINFER_MODEL_DIR`` = ``model_dir``,
    ``PINFER_CORES`` = ``cores``; ``PINFER_WORKERS`` dropped (each :meth:`Stack.start_workers` says
    how many)."""
    env = {**(os.environ if base_env is None else base_env), **TEST_ENV}
    if model_dir is not None:
        env["PINFER_MODEL_DIR"] = str(model_dir)
    env.pop("PINFER_WORKERS", None)
    if cores:
        env["PINFER_CORES"] = ",".join(str(c) for c in cores)
    return env


@contextlib.contextmanager
def pinned(cores: Iterable[int] | None) -> Iterator[None]:
    """Run the block with this thread's affinity set to ``cores`` (children forked in it inherit
    it), then restore. ``None``: unchanged."""
    if not cores or not hasattr(os, "sched_setaffinity"):
        yield
        return
    before = os.sched_getaffinity(0)
    os.sched_setaffinity(0, set(cores))
    try:
        yield
    finally:
        os.sched_setaffinity(0, before)


def identity(pid: int) -> tuple[int, float] | None:
    """(pid, start time) of a live process, or None (gone, or no psutil)."""
    try:
        import psutil

        return pid, psutil.Process(pid).create_time()
    except Exception:
        return None


def descendants(pid: int) -> list[tuple[int, float]]:
    """(pid, create_time) of every live descendant of ``pid``."""
    try:
        import psutil

        return [(c.pid, c.create_time()) for c in psutil.Process(pid).children(recursive=True)]
    except Exception:
        return []


def kill_leftovers(idents: Iterable[tuple[int, float]], grace: float = 5.0) -> int:
    """SIGKILL processes from ``idents`` still alive after ``grace`` s (same pid AND start time)."""
    try:
        import psutil
    except ImportError:
        return 0
    alive = []
    for pid, ctime in idents:
        try:
            p = psutil.Process(pid)
            if abs(p.create_time() - ctime) < 0.01:
                alive.append(p)
        except Exception:
            pass
    if not alive:
        return 0
    _, alive = psutil.wait_procs(alive, timeout=grace)
    for p in alive:
        try:
            p.kill()
        except Exception:
            pass
    return len(alive)


def stop_in_order(procs: Iterable[Proc], timeout: float = 60.0) -> None:
    """nginx, APIs, workers, Redis (anything else between APIs and workers): one kind at a time,
    each kind signalled at once (SIGTERM: gunicorn and the launcher shut down gracefully) and
    waited for together; what outlives ``timeout`` is killed."""
    by_rank: dict[int, list[Proc]] = {}
    for p in reversed(list(procs)):
        by_rank.setdefault(_STOP_RANK.get(p.name.split(":")[0], 2), []).append(p)
    for rank in sorted(by_rank):
        group = [p for p in by_rank[rank] if p.popen.poll() is None]
        for p in group:
            try:
                p.popen.send_signal(signal.SIGTERM)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + timeout
        for p in group:
            try:
                p.popen.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.popen.kill()
                p.popen.wait(5)


@dataclass
class Stack:
    """A pinfer deployment on loopback; ``with Stack(...).up(...)`` or call :meth:`stop`.

    ``env``: the processes' environment (``os.environ`` + ``TEST_ENV`` + these when built with
    :meth:`create`); ``procs``: every process started, in start order (:meth:`stop` reorders).
    """

    workdir: Path
    env: dict[str, str]
    redis_url: str = ""
    procs: list[Proc] = field(default_factory=list)
    cores: list[int] | None = None
    new_session: bool = False  # API/workers in their own session: a terminal's Ctrl-C reaches only us
    ready_timeout: float = 180.0
    api_bases: list[str] = field(default_factory=list)
    nginx_base: str | None = None

    def __post_init__(self) -> None:
        self.workdir = Path(self.workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        if self.redis_url:
            self.env["PINFER_REDIS_URL"] = self.redis_url
        self.worker_logs: list[Path] = []
        self._idents: list[tuple[int, float]] = []
        self._client = None
        self._http = None

    @classmethod
    def create(cls, workdir: Path, model_dir: Path | str | None = None, *, base_env: Mapping[str, str] | None = None,
               **kw) -> "Stack":
        """A stack (nothing started yet) running with :func:`stack_env`."""
        return cls(Path(workdir), stack_env(model_dir, base_env, kw.get("cores")), **kw)

    # -- composing --------------------------------------------------------------------------------
    def up(self, workers: int = 1, apis: int = 1, nginx: bool = False, **env: object) -> "Stack":
        """Redis (unless one is set), ``workers`` pinned workers, ``apis`` API servers, nginx in
        front when asked; returns once every API answers and every worker is READY. ``env``: more
        settings (``PINFER_*=value``). On failure everything started is stopped."""
        self.env.update({k: str(v) for k, v in env.items()})
        try:
            if not self.redis_url:
                self.start_redis()
            launcher = self.start_workers(workers, wait=False) if workers else None
            for _ in range(apis):
                self.start_api()
            if nginx:
                self.start_nginx()
            if launcher is not None:
                self.wait_ready(workers, proc=launcher)
        except BaseException:
            self.stop()
            raise
        return self

    def start_redis(self, *, durable: bool = False, port: int | None = None, maxmemory: int = 0,
                    workdir: Path | None = None) -> Proc:
        """A private redis-server (:func:`pinfer.procs.start_redis`); the stack's first process."""
        with pinned(self.cores):
            proc, url = _procs.start_redis(workdir or self.workdir / "redis", port, durable, maxmemory)
        self._add(proc, first=True)
        self.redis_url = self.env["PINFER_REDIS_URL"] = url
        self._reset_clients()
        return proc

    def start_workers(self, k: int | None = None, *, log: Path | None = None, wait: bool = True,
                      env: Mapping[str, object] | None = None) -> Proc:
        """One more ``pinfer worker`` launcher (``k``: its PINFER_WORKERS; None: the env's); with
        ``wait``, returns once ``k`` more workers are READY."""
        before = {int(w["pid"]) for w in self.workers()} if wait and k else set()
        penv = {**self.env, **{key: str(v) for key, v in (env or {}).items()}}
        if k is not None:
            penv["PINFER_WORKERS"] = str(k)
        if log is None:
            log = self.workdir / ("workers.log" if not self.worker_logs else f"workers-{len(self.worker_logs)}.log")
        self.worker_logs.append(log)
        with pinned(self.cores):
            proc = _procs.start_workers(penv, log, new_session=self.new_session)
        self._add(proc)
        if wait and k:
            self.wait_ready(k, proc=proc, exclude_pids=before)
        return proc

    def start_api(self, port: int | None = None, *, log: Path | None = None, wait: bool = True) -> Proc:
        """One more gunicorn API server (each PINFER_API_PROCESSES processes) on ``port`` (default:
        a free one); with ``wait``, returns once it answers /healthz."""
        port = port or free_port()
        with pinned(self.cores):
            if log is None:  # api.log, then api-<port>.log (as workers.log, workers-1.log)
                log = self.workdir / ("api-%d.log" % port if self.api_bases else "api.log")
            proc = _procs.start_api(self.env, port, log, new_session=self.new_session)
        self._add(proc)
        base = f"http://127.0.0.1:{port}"
        self.api_bases.append(base)
        self._reset_clients()
        if wait:
            wait_until(lambda: healthy(base), 120, f"API {base}", proc.popen)
        return proc

    def start_nginx(self) -> Proc:
        """nginx (the production config rendered for loopback) in front of every API so far."""
        from pinfer.topology import nginx_binary, render_nginx_conf, start_nginx

        if nginx_binary() is None:
            raise RuntimeError("nginx is not installed (looked on PATH and in /usr/sbin)")
        listen = f"127.0.0.1:{free_port()}"
        conf = render_nginx_conf([b.removeprefix("http://") for b in self.api_bases], listen,
                                 self.workdir / "nginx", worker_processes=1)
        with pinned(self.cores):
            popen = start_nginx(conf, wait_for=listen, timeout=15)
        proc = Proc("nginx", popen)
        self._add(proc)
        self.nginx_base = f"http://{listen}"
        wait_until(lambda: healthy(self.nginx_base), 30, "nginx -> API")
        return proc

    def _add(self, proc: Proc, first: bool = False) -> None:
        if first:
            self.procs.insert(0, proc)
        else:
            self.procs.append(proc)
        ident = identity(proc.popen.pid)
        if ident:
            self._idents.append(ident)

    # -- state ------------------------------------------------------------------------------------
    @property
    def base(self) -> str:
        """The first API server, straight (no nginx)."""
        return self.api_bases[0] if self.api_bases else ""

    @property
    def full_env(self) -> dict[str, str]:
        return self.env

    @property
    def redis(self) -> Proc | None:
        return next((p for p in self.procs if p.name == "redis"), None)

    @property
    def api_procs(self) -> list[Proc]:
        return [p for p in self.procs if p.name.split(":")[0] in ("api", "baseline")]

    @property
    def worker_procs(self) -> list[Proc]:
        return [p for p in self.procs if p.name == "workers"]

    @property
    def settings(self):
        from shared.settings import Settings

        return Settings.from_env(self.env)

    @property
    def store(self):
        from shared.store import Store

        return Store(self.settings)

    def redis_client(self):
        import redis

        return redis.Redis.from_url(self.redis_url, decode_responses=True)

    def workers(self) -> list[dict]:
        """Workers with a live READY/BUSY heartbeat (from Redis: works without an API)."""
        from shared.schema import SERVING

        return [w for w in self.store.live_workers() if w.get("state") in SERVING]

    ready_workers = workers

    def wait_ready(self, n_workers: int, timeout: float | None = None, exclude_pids: Iterable[int] = (),
                   proc: Proc | None = None) -> list[dict]:
        """Wait until ``n_workers`` workers (not in ``exclude_pids``) are READY/BUSY; fail early if
        ``proc`` (their launcher) exits."""
        exclude = {int(p) for p in exclude_pids}
        wait_until(lambda: len([w for w in self.workers() if int(w["pid"]) not in exclude]) >= n_workers,
                   timeout or self.ready_timeout, f"{n_workers} ready workers", proc.popen if proc else None)
        ready = self.workers()
        for w in ready:  # the Celery processes, for the final clean-up
            ident = identity(int(w["pid"]))
            if ident:
                self._idents.append(ident)
        return ready

    def wait_workers(self, n: int, proc: Proc | None = None, exclude: Iterable[int] = (),
                     timeout: float | None = None) -> list[dict]:
        return self.wait_ready(n, timeout, exclude, proc)

    # -- HTTP, through the SDK ----------------------------------------------------------------------
    @property
    def client(self):
        """An SDK client (pinfer_client.sdk) on :attr:`base`, with the SDK's retry policy."""
        if self._client is None:
            from pinfer_client.sdk import Client

            self._client = Client(self.base, timeout=30.0, pool_size=64, long_poll=10.0)
        return self._client

    @property
    def http(self):
        """A plain ``requests`` session, for tests about raw HTTP itself."""
        if self._http is None:
            import requests

            self._http = requests.Session()
        return self._http

    def _reset_clients(self) -> None:
        if self._client is not None:
            self._client.close()
        self._client = None

    def submit(self, data: bytes, top_k: int | None = None, expect: int = 202) -> dict:
        """POST one image through the SDK; asserts the answer's status is ``expect`` and returns its body."""
        from pinfer_client.sdk import ApiError

        try:
            body = self.client.submit(data, top_k=top_k)
            status = 202
        except ApiError as exc:
            body, status = exc.body if isinstance(exc.body, dict) else {"error": str(exc)}, exc.status
        assert status == expect, (status, body)
        return body

    def result(self, pid: str, timeout: float = 120) -> dict:
        """Long-poll until terminal; after ``timeout`` the last (unfinished) record."""
        from pinfer_client.sdk import WaitTimeout

        try:
            return self.client.wait(pid, timeout=timeout)
        except WaitTimeout as exc:
            return exc.last

    # -- stopping ---------------------------------------------------------------------------------
    def stop_workers(self, timeout: float = 30.0) -> None:
        """Stop every worker launcher (warm shutdown) and forget them."""
        workers = self.worker_procs
        for p in workers:
            self._idents.extend(descendants(p.popen.pid))
        stop_in_order(workers, timeout)
        self.procs[:] = [p for p in self.procs if p not in workers]

    def stop(self, timeout: float = 60.0) -> None:
        """nginx, APIs, workers, Redis (see the module docstring); then SIGKILL what is left."""
        for p in self.procs:
            self._idents.extend(descendants(p.popen.pid))
        stop_in_order(self.procs, timeout)
        kill_leftovers(self._idents, grace=3.0)
        self._idents.clear()
        for c in (self._client, self._http):
            if c is not None:
                c.close()
        self._client = self._http = None

    def __enter__(self) -> "Stack":
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- logs -------------------------------------------------------------------------------------
    def log_problems(self) -> dict[str, int]:
        """Count error-looking lines per log file (Traceback, ERROR, CRITICAL, 5xx in access logs;
        not /readyz's 503 "not ready yet", which the start-up wait asks for)."""
        out: dict[str, int] = {}
        for path in sorted(self.workdir.rglob("*.log")):
            try:
                text = path.read_text(errors="replace")
            except OSError:
                continue
            n = sum(1 for line in text.splitlines() if "/readyz" not in line and (
                    "Traceback" in line or " ERROR" in line or "CRITICAL" in line or "[error]" in line
                    or '" 500 ' in line or '" 502 ' in line or '" 503 ' in line or '"status":50' in line))
            if n:
                out[str(path.relative_to(self.workdir))] = n
        return out


def healthy(base: str) -> bool:
    """The API at ``base`` answers /healthz (through the SDK, no retries)."""
    from pinfer_client.sdk import Client

    with Client(base, timeout=2.0, retries=0) as c:
        return c.healthz().get("status") == "ok"


_READY_AT = re.compile(r"^\[(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d),(\d{3}): \w+/MainProcess\] \S+@\S+ ready\.\s*$", re.M)


def ready_times(log: Path) -> list[float]:
    """Unix times of the ``<name>@<host> ready.`` lines of a workers log (Celery's local-time stamps)."""
    try:
        text = log.read_text(errors="replace")
    except OSError:
        return []
    return [time.mktime(time.strptime(m[0], "%Y-%m-%d %H:%M:%S")) + int(m[1]) / 1000
            for m in _READY_AT.findall(text)]
