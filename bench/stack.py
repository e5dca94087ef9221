"""Start and stop a pinfer stack (or the seed-design baseline) for a benchmark.

A :class:`Stack` is the same processes a user runs (``pinfer.procs``): a private redis-server,
``pinfer worker`` launchers (pinned Celery workers, ``PINFER_WORKERS=k``), one or more gunicorn
API servers and optionally nginx in front of them (``pinfer.topology`` renders the production
``deploy/nginx.conf`` for loopback). ``baseline=True`` starts instead only gunicorn serving
``bench/baselines/flask_sync.py``. Everything listens on 127.0.0.1 only.

``cores`` pins every process the stack starts to those cores (the affinity is inherited at
fork), so servers and the load generator do not share a core. ``with Stack(...)`` always stops
what it started, in reverse order, and SIGKILLs leftovers (only descendants of the processes it
started, matched by pid *and* start time so a recycled pid is never hit).

Logs of each stack go to ``bench/out/logs/<stack name>/`` (redis.log, api-<port>.log,
workers-<n>.log, nginx/): after a run, grep them for errors.

(Over 300 lines because it is the benchmarks' whole process harness; issue 8's single stack
module, shared with ``pinfer up`` and the integration tests, is meant to replace it.)
"""
from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator

from bench.http import stats
from pinfer import procs
from pinfer.procs import Proc, free_port, start_redis, wait_until
from shared.schema import SERVING
from shared.settings import PROJECT_ROOT

OUT_DIR = PROJECT_ROOT / "bench" / "out"
BASELINE_APP = "bench.baselines.flask_sync:create_app()"


class BenchError(RuntimeError):
    pass


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


# --------------------------------------------------------------------------------------- processes
# pinfer.procs' commands, API and workers each in a session of their own (Redis always is): a
# Ctrl-C (SIGINT to the terminal's process group) then reaches only the benchmark, which stops the
# stack in order (API, workers, then Redis) instead of every process at once.
def start_api(env: dict, port: int, log: Path) -> Proc:
    return procs.start_api(env, port, log, new_session=True)


def start_workers(env: dict, log: Path) -> Proc:
    return procs.start_workers(env, log, new_session=True)


def start_baseline(env: dict, port: int, log: Path) -> Proc:
    """The seed documents' design: one synchronous gunicorn worker process (the default ``sync``
    class), the model loaded once in it. Not preloaded: torch state must not cross a fork."""
    cmd = [sys.executable, "-m", "gunicorn", "--workers", "1", "--bind", f"127.0.0.1:{port}",
           "--timeout", "120", "--access-logfile", "-", BASELINE_APP]
    with open(log, "ab") as out:
        p = subprocess.Popen(cmd, env=env, cwd=PROJECT_ROOT, stdout=out, stderr=subprocess.STDOUT,
                             start_new_session=True)
    return Proc(f"baseline:{port}", p)


def _healthy(base: str) -> bool:
    from pinfer_client.sdk import Client

    with Client(base, timeout=2.0, retries=0) as c:
        return c.healthz().get("status") == "ok"


def _proc_identity(pid: int) -> tuple[int, float] | None:
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


@dataclass
class Stack:
    """A private pinfer deployment on loopback. Use as a context manager.

    ``workers``: k for one ``pinfer worker`` launcher with PINFER_WORKERS=k (0: start none yet);
    ``apis``: gunicorn servers (each PINFER_API_PROCESSES processes); ``nginx``: put nginx in front.
    ``env``: extra PINFER_* settings (defaults are the production ones).
    """

    name: str
    model_dir: Path
    workers: int = 1
    apis: int = 1
    nginx: bool = False
    env: dict[str, str] = field(default_factory=dict)
    log_root: Path = OUT_DIR / "logs"
    ready_timeout: float = 180.0
    cores: list[int] | None = None
    baseline: bool = False

    def __post_init__(self) -> None:
        self.workdir = Path(self.log_root) / self.name
        self.redis: Proc | None = None
        self.redis_url = ""
        self.api_procs: list[Proc] = []
        self.api_bases: list[str] = []
        self.worker_procs: list[Proc] = []
        self.worker_logs: list[Path] = []
        self.nginx_proc: subprocess.Popen | None = None
        self.nginx_base: str | None = None
        self.full_env: dict[str, str] = {}
        self._idents: list[tuple[int, float]] = []

    # -- lifecycle --
    def __enter__(self) -> "Stack":
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def base(self) -> str:
        """The first API server, straight (no nginx)."""
        return self.api_bases[0]

    def start(self) -> None:
        if self.workdir.exists():
            shutil.rmtree(self.workdir, ignore_errors=True)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.full_env = {**os.environ, "PINFER_MODEL_DIR": str(self.model_dir),
                         "PINFER_PRECISION": "fp32", "PINFER_RESIZE": "exact", "PYTHONUNBUFFERED": "1",
                         "PINFER_CACHE_TTL_S": "0",  # benchmarks measure inference, not cache hits
                         **{k: str(v) for k, v in self.env.items()}}
        self.full_env.pop("PINFER_WORKERS", None)
        if self.cores:
            self.full_env["PINFER_CORES"] = ",".join(str(c) for c in self.cores)
        with pinned(self.cores):
            if not self.baseline:
                self.redis, self.redis_url = start_redis(self.workdir / "redis")
                self._remember(self.redis.popen.pid)
                self.full_env["PINFER_REDIS_URL"] = self.redis_url
            for _ in range(self.apis):
                port = free_port()
                log = self.workdir / f"api-{port}.log"
                proc = start_baseline(self.full_env, port, log) if self.baseline else start_api(self.full_env, port, log)
                self.api_procs.append(proc)
                self._remember(proc.popen.pid)
                base = f"http://127.0.0.1:{port}"
                wait_until(lambda b=base: _healthy(b), 120, f"API {base}", proc.popen)
                self.api_bases.append(base)
            if self.nginx:
                self._start_nginx()
            if self.workers and not self.baseline:
                self.start_workers(self.workers)

    def _start_nginx(self) -> None:
        from pinfer.topology import nginx_binary, render_nginx_conf, start_nginx

        if nginx_binary() is None:
            raise BenchError("nginx is not installed (looked on PATH and in /usr/sbin)")
        listen = f"127.0.0.1:{free_port()}"
        conf = render_nginx_conf([b.removeprefix("http://") for b in self.api_bases], listen,
                                 self.workdir / "nginx", worker_processes=1)
        self.nginx_proc = start_nginx(conf, wait_for=listen, timeout=15)
        self._remember(self.nginx_proc.pid)
        self.nginx_base = f"http://{listen}"
        wait_until(lambda: _healthy(self.nginx_base), 30, "nginx -> API")

    def start_workers(self, k: int, wait: bool = True) -> Proc:
        """One more ``pinfer worker`` launcher with PINFER_WORKERS=k; waits until its k workers are
        ready (Celery's ``ready.`` log line, or a READY heartbeat, whichever comes first)."""
        before = {int(w["pid"]) for w in self.ready_workers()}
        env = {**self.full_env, "PINFER_WORKERS": str(k)}
        log = self.workdir / f"workers-{len(self.worker_procs)}.log"
        self.worker_logs.append(log)
        with pinned(self.cores):
            proc = start_workers(env, log)
        self.worker_procs.append(proc)
        self._remember(proc.popen.pid)
        if wait:
            wait_until(lambda: _ready_lines(log) >= k or len(self.ready_workers()) >= len(before) + k,
                       self.ready_timeout, f"{k} ready workers", proc.popen)
        return proc

    def wait_workers(self, n: int, proc: Proc | None = None, exclude: set[int] = frozenset(),
                     timeout: float | None = None) -> list[dict]:
        """Wait until ``n`` workers (not in ``exclude``) have sent a READY/BUSY heartbeat."""
        wait_until(lambda: len([w for w in self.ready_workers() if int(w["pid"]) not in exclude]) >= n,
                   timeout or self.ready_timeout, f"{n} ready workers", proc.popen if proc else None)
        for w in self.ready_workers():  # remember the Celery processes for the final clean-up
            self._remember(int(w["pid"]))
        return self.ready_workers()

    def ready_workers(self) -> list[dict]:
        return [w for w in stats(self.base)["workers"] if w.get("state") in SERVING]

    def stop_workers(self, timeout: float = 30.0) -> None:
        for p in self.worker_procs:
            self._remember(p.popen.pid)
            p.stop(signal.SIGTERM, timeout)
        self.worker_procs.clear()

    def stop(self) -> None:
        """Stop everything (nginx, APIs, workers, redis) and SIGKILL whatever is left."""
        for pid, _ in list(self._idents):
            self._idents.extend(descendants(pid))
        errors = []
        if self.nginx_proc is not None and self.nginx_proc.poll() is None:
            self.nginx_proc.terminate()
            try:
                self.nginx_proc.wait(10)
            except subprocess.TimeoutExpired:
                self.nginx_proc.kill()
        for p in self.api_procs:  # signal all first, then wait: they stop in parallel
            if p.popen.poll() is None:  # SIGINT: gunicorn's quick shutdown (nothing is in flight now)
                p.popen.send_signal(signal.SIGINT)
        for p in self.worker_procs:
            if p.popen.poll() is None:
                p.popen.send_signal(signal.SIGTERM)
        for p in self.api_procs + self.worker_procs:
            try:
                p.stop(signal.SIGTERM, 30)
            except Exception as exc:
                errors.append(exc)
        if self.redis is not None:
            self.redis.stop(signal.SIGTERM, 10)
        kill_leftovers(self._idents, grace=3.0)
        self.api_procs.clear()
        self.worker_procs.clear()

    def _remember(self, pid: int) -> None:
        ident = _proc_identity(pid)
        if ident:
            self._idents.append(ident)

    # -- helpers --
    def redis_client(self):
        import redis

        return redis.Redis.from_url(self.redis_url, decode_responses=True)

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


_READY_AT = re.compile(r"^\[(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d),(\d{3}): \w+/MainProcess\] \S+@\S+ ready\.\s*$", re.M)


def ready_times(log: Path) -> list[float]:
    """Unix times of the ``<name>@<host> ready.`` lines of a workers log (Celery's local-time stamps)."""
    try:
        text = log.read_text(errors="replace")
    except OSError:
        return []
    return [time.mktime(time.strptime(m[0], "%Y-%m-%d %H:%M:%S")) + int(m[1]) / 1000
            for m in _READY_AT.findall(text)]


def _ready_lines(log: Path) -> int:
    """Celery workers that logged ``<name>@<host> ready.`` (consumer started, model loaded)."""
    try:
        text = log.read_text(errors="replace")
    except OSError:
        return 0
    return len(re.findall(r"@\S+ ready\.\s*$", text, flags=re.M))
