"""Run the deployment topology (nginx in front of API processes) on loopback, for the tests and `make bench`.

``render_nginx_conf`` turns ``deploy/nginx.conf`` (written for docker compose: upstream ``api:8000``,
``listen 80``, logs to /dev/stdout, the image's pid and temp paths) into a config that an
unprivileged user can run with ``nginx -p WORKDIR -c CONF -g 'daemon off;'``: the upstream
``server`` line becomes one line per given address (same parameters), ``listen 80`` becomes the
given address, and pid / logs / temp paths move into WORKDIR. Run-time re-resolution (`resolver`
and the `resolve` flag) is dropped: the loopback upstreams are IP addresses, Docker's DNS is not
there, and nginx before 1.27.3 (the tests' packages) does not know `resolve`. Everything else
(timeouts, retry policy, body limits, error pages) is the production file, so tests exercise the
real policy.
"""
from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
NGINX_CONF = ROOT / "deploy" / "nginx.conf"

_UPSTREAM_SERVER = re.compile(r"^(?P<indent>[ \t]*)server[ \t]+api:8000(?P<params>[^;]*);[ \t]*$", re.M)
_LISTEN = re.compile(r"^(?P<indent>[ \t]*)listen[ \t]+80(?P<params>(?:[ \t][^;]*)?);[ \t]*$", re.M)
_TEMP_DIRECTIVES = ("client_body_temp_path", "proxy_temp_path", "fastcgi_temp_path",
                    "uwsgi_temp_path", "scgi_temp_path")


def nginx_binary() -> str | None:
    """Path of the nginx executable (PATH, then the usual sbin folders), or None."""
    found = shutil.which("nginx")
    if found:
        return found
    for candidate in ("/usr/sbin/nginx", "/usr/local/sbin/nginx", "/usr/local/nginx/sbin/nginx"):
        if os.access(candidate, os.X_OK):
            return candidate
    return None


def render_nginx_conf(upstreams: list[str], listen: str, workdir: Path, *,
                      source: Path = NGINX_CONF, worker_processes: int | None = 1) -> Path:
    """Write a loopback variant of ``source`` into ``workdir`` and return its path.

    ``upstreams``: ``host:port`` addresses replacing ``server api:8000 ...;`` (parameters kept);
    ``listen``: e.g. ``127.0.0.1:18080``; ``worker_processes``: overrides ``auto`` (None keeps it).
    """
    if not upstreams:
        raise ValueError("at least one upstream address is needed")
    workdir = Path(workdir).resolve()
    logs, temp = workdir / "logs", workdir / "temp"
    logs.mkdir(parents=True, exist_ok=True)
    text = source.read_text()

    def upstream_lines(m: re.Match) -> str:
        params = re.sub(r"[ \t]+resolve\b", "", m["params"])
        return "\n".join(f"{m['indent']}server {addr}{params};" for addr in upstreams)

    text, n = _UPSTREAM_SERVER.subn(upstream_lines, text)
    if n != 1:
        raise ValueError(f"{source}: expected one `server api:8000 ...;` line, found {n}")
    text = re.sub(r"^[ \t]*resolver(?:_timeout)?[ \t][^;]*;[ \t]*\n", "", text, flags=re.M)
    text, n = _LISTEN.subn(lambda m: f"{m['indent']}listen {listen}{m['params']};", text)
    if n != 1:
        raise ValueError(f"{source}: expected one `listen 80;` line, found {n}")

    # Main context: no `user` (meaningless without root, fatal if the user does not exist here),
    # pid and error log in workdir.
    text = re.sub(r"^[ \t]*user[ \t][^;]*;[ \t]*\n", "", text, flags=re.M)
    text = _set_directive(text, "pid", f"{workdir / 'nginx.pid'}", main=True)
    text = re.sub(r"^(?P<i>[ \t]*)error_log[ \t]+\S+(?P<rest>[^;]*);",
                  lambda m: f"{m['i']}error_log {logs / 'error.log'}{m['rest']};", text, flags=re.M)
    if not re.search(r"^[ \t]*error_log[ \t]", text, flags=re.M):
        text = f"error_log {logs / 'error.log'} warn;\n" + text
    if worker_processes is not None:
        text = _set_directive(text, "worker_processes", str(worker_processes), main=True)

    # Access logs (any context) into workdir, format kept; `access_log off;` stays off.
    text = re.sub(r"^(?P<i>[ \t]*)access_log[ \t]+(?!off\b)\S+(?P<rest>[^;]*);",
                  lambda m: f"{m['i']}access_log {logs / 'access.log'}{m['rest']};", text, flags=re.M)

    # Temp paths: replaced where the file sets them, otherwise added at the top of `http {`.
    missing = []
    for directive in _TEMP_DIRECTIVES:
        path = temp / directive.removesuffix("_temp_path")
        path.mkdir(parents=True, exist_ok=True)
        pattern = re.compile(rf"^(?P<i>[ \t]*){directive}[ \t][^;]*;", re.M)
        if pattern.search(text):
            text = pattern.sub(lambda m, p=path, d=directive: f"{m['i']}{d} {p};", text)
        else:
            missing.append(f"    {directive} {path};")
    if missing:
        text, n = re.subn(r"^(?P<head>[ \t]*http[ \t]*\{[ \t]*)$",
                          lambda m: m["head"] + "\n" + "\n".join(missing), text, count=1, flags=re.M)
        if n != 1:
            raise ValueError(f"{source}: no `http {{` line to put temp paths under")

    conf = workdir / "nginx.conf"
    conf.write_text(text)
    return conf


def _set_directive(text: str, name: str, value: str, *, main: bool) -> str:
    """Replace a main-context directive's value, or prepend it when absent."""
    pattern = re.compile(rf"^{name}[ \t][^;]*;", re.M)  # main context: no indentation
    if pattern.search(text):
        return pattern.sub(f"{name} {value};", text)
    return f"{name} {value};\n" + text


def _nginx_version(binary: str) -> tuple[int, ...]:
    out = subprocess.run([binary, "-v"], capture_output=True, text=True).stderr
    m = re.search(r"nginx/(\d+)\.(\d+)\.(\d+)", out)
    return tuple(int(x) for x in m.groups()) if m else (0, 0, 0)


def nginx_command(conf: Path, *args: str, binary: str | None = None) -> list[str]:
    """argv running ``conf`` unprivileged: prefix = the conf's folder, early errors to stderr."""
    binary = binary or nginx_binary()
    if binary is None:
        raise FileNotFoundError("nginx is not installed")
    cmd = [binary, "-p", str(Path(conf).parent), "-c", str(conf)]
    if _nginx_version(binary) >= (1, 19, 5):
        # Before the config is read nginx opens its compiled-in error log (often /var/log/nginx,
        # not writable by an ordinary user): send those messages to stderr instead.
        cmd += ["-e", "stderr"]
    return cmd + list(args)


def nginx_test(conf: Path) -> subprocess.CompletedProcess:
    """``nginx -t`` on a rendered config (returncode 0 = valid); output in ``.stderr``."""
    return subprocess.run(nginx_command(conf, "-t", "-q"), capture_output=True, text=True, timeout=30)


def start_nginx(conf: Path, *, wait_for: str | None = None, timeout: float = 10.0,
                log: Path | None = None) -> subprocess.Popen:
    """Start nginx in the foreground on a rendered config; if ``wait_for`` (``host:port``), wait
    until it accepts connections. Its output goes to ``log`` (a file) or a pipe. Stop it with
    ``proc.terminate(); proc.wait()``."""
    cmd = nginx_command(conf, "-g", "daemon off;")
    if log is None:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    else:
        with open(log, "ab") as out:  # the child keeps its own copy of the descriptor
            proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
    if wait_for:
        host, _, port = wait_for.rpartition(":")
        try:
            wait_for_port(host or "127.0.0.1", int(port), timeout=timeout, proc=proc)
        except Exception:
            proc.kill()
            out, _ = proc.communicate(timeout=5)
            if log is not None:
                out = Path(log).read_text(errors="replace")
            raise RuntimeError(f"nginx did not start:\n{out}") from None
    return proc


def wait_for_port(host: str, port: int, *, timeout: float = 10.0,
                  proc: subprocess.Popen | None = None) -> None:
    """Block until ``host:port`` accepts TCP connections (fail early if ``proc`` exits)."""
    deadline = time.monotonic() + timeout
    while True:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before {host}:{port} opened")
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{host}:{port} not accepting connections after {timeout} s")
            time.sleep(0.05)
