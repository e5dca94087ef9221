"""``pinfer``: one command, lazy subcommands (``ingest`` and ``api`` never import torch)."""
from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path

USAGE = """usage: pinfer COMMAND [ARGS]

commands:
  up             run everything on this machine: Redis (private unless PINFER_REDIS_URL), API, pinned workers
                 (first exports the model if missing; takes export-model's --precision/--runtime/--calibration)
  api            run the API under gunicorn (pinfer/gunicorn_conf.py)
  worker         run one pinned Celery worker per core (--check: health check)
  export-model   build the TorchScript artifact + manifest (see --help)
  reload         ask every worker to load the model PINFER_MODEL_DIR names now, between batches (a roll-out)
  ingest         classify a folder of photos through a running API (see --help)
  settings       print the settings (--markdown for the README table)
  api-key NAME   make an API key, add its hash to PINFER_API_KEYS_FILE (or --file PATH), print the key once
"""


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE)
        return 0
    cmd, rest = argv[0], argv[1:]
    if cmd == "export-model":
        from weights.export import main as run
    elif cmd == "worker":
        from worker.launcher import main as run
    elif cmd == "ingest":
        run = _ingest
    elif cmd == "api":
        run = _api
    elif cmd == "up":
        run = _up
    elif cmd == "settings":
        run = _settings
    elif cmd == "api-key":
        run = _api_key
    elif cmd == "reload":
        run = _reload
    else:
        print(f"pinfer: unknown command {cmd!r}\n\n{USAGE}", file=sys.stderr)
        return 2
    return int(run(rest) or 0)


def _ingest(argv: list[str]) -> int:
    """``pinfer ingest`` is the client distribution's command (``pinfer-ingest``, package
    ``pinfer_client``), run from here so a server install keeps one ``pinfer`` for everything."""
    try:
        from pinfer_client.ingest.cli import main
    except ImportError as exc:
        print(f"pinfer ingest: the client is not installed ({exc}); `pip install ./client` "
              "(make install does it)", file=sys.stderr)
        return 2
    return main(argv, prog="pinfer ingest")


def _settings(argv: list[str]) -> int:
    from dataclasses import fields

    from shared.settings import Settings

    if "--markdown" in argv:
        print(Settings.markdown_table())
        return 0
    s = Settings.from_env()
    for f in fields(s):
        print(f"{f.metadata['env']}={getattr(s, f.name)}")
    return 0


def _reload(argv: list[str]) -> int:
    """Bump the reload counter in Redis; each worker acts on it at its next heartbeat, between batches."""
    from collections import Counter

    from shared.schema import SERVING
    from shared.settings import Settings
    from shared.store import Store

    if argv:
        print("usage: pinfer reload   (no arguments; uses PINFER_REDIS_URL)", file=sys.stderr)
        return 2
    settings = Settings.from_env()
    store = Store(settings)
    generation = store.request_reload()
    by_sha = Counter(w.get("sha256", "?")[:12] for w in store.live_workers() if w.get("state") in SERVING)
    now = ", ".join(f"{sha}: {n}" for sha, n in sorted(by_sha.items())) or "none"
    print(f"reload {generation} requested: each worker loads, verifies and warms the model its "
          f"PINFER_MODEL_DIR names within about PINFER_HEARTBEAT_S={settings.heartbeat_s}s, after its current "
          f"batch. Serving workers by sha now: {now}. Watch `models_by_sha` and `reload_errors` in /readyz.")
    return 0


def _api_key(argv: list[str]) -> int:
    """Append ``NAME sha256(key)`` to the keys file and print the key: it is shown only this once."""
    import argparse
    import re
    import secrets

    from api.auth import hash_key
    from shared.settings import Settings

    parser = argparse.ArgumentParser(prog="pinfer api-key")
    parser.add_argument("name", help="who the key is for (letters, digits, . _ -)")
    parser.add_argument("--file", default=None, help="keys file (default: PINFER_API_KEYS_FILE)")
    args = parser.parse_args(argv)
    path = Path(args.file or Settings.from_env().api_keys_file or "")
    if not str(path) or str(path) == ".":
        print("pinfer api-key: set PINFER_API_KEYS_FILE or pass --file", file=sys.stderr)
        return 2
    if not re.fullmatch(r"[A-Za-z0-9._-]{1,64}", args.name):
        print("pinfer api-key: NAME must be 1-64 of letters, digits, '.', '_', '-'", file=sys.stderr)
        return 2
    lines = path.read_text(encoding="utf-8").splitlines() if path.exists() else []
    if args.name in {ln.split()[0] for ln in lines if ln.split() and not ln.lstrip().startswith("#")}:
        print(f"pinfer api-key: {args.name!r} already has a key in {path}", file=sys.stderr)
        return 1
    key = "pk_" + secrets.token_urlsafe(32)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    with os.fdopen(fd, "a", encoding="utf-8") as f:
        f.write(f"{args.name} {hash_key(key)}\n")
    print(key)
    return 0


def _api(argv: list[str]) -> int:
    from pinfer.procs import GUNICORN_CONF

    os.execvp(sys.executable, [sys.executable, "-m", "gunicorn", "-c", GUNICORN_CONF, *argv, "api:create_app()"])
    return 0


def _up(argv: list[str]) -> int:
    """Run the whole service in the foreground until Ctrl-C/SIGTERM, then stop it in order.

    The first signal starts an orderly stop: API first, then the workers (each finishes its batch;
    Redis is still up to take their results), then Redis. A second signal kills what is left.
    """
    import logging
    import threading

    from pinfer.procs import ROOT
    from pinfer.stack import Stack
    from shared import logs
    from shared.settings import Settings
    from weights.export import main as export
    from worker.launcher import worker_slots

    settings = Settings.from_env()
    logs.setup(settings.log_format)
    log = logging.getLogger("pinfer.up")
    if export(["--out", settings.model_dir, "--if-missing", "--fallback-random-init", *_variant_args(argv)]) != 0:
        return 1
    run_dir = Path(os.environ.get("PINFER_RUN_DIR", ROOT / "run"))
    run_dir.mkdir(exist_ok=True)
    stack = Stack(run_dir, dict(os.environ), redis_url=os.environ.get("PINFER_REDIS_URL", ""))
    stop = threading.Event()
    signals_seen = [0]

    def on_signal(signum, _frame):
        signals_seen[0] += 1
        if signals_seen[0] == 1:
            log.warning("stopping: API, then workers (they finish their batches), then Redis; "
                        "signal again to kill")
            stop.set()
        else:
            for p in stack.procs:
                p.popen.kill()

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    try:
        if not stack.redis_url:
            data = settings.data_path()
            lock = _lock_data_dir(data)
            if lock is None:
                print(f"pinfer: another `pinfer up` is using {data}; stop it, or set PINFER_DATA_DIR "
                      "to another folder", file=sys.stderr)
                return 1
            stack.start_redis(durable=True, maxmemory=settings.derived_redis_maxmemory(), workdir=data)
            log.info("started a private redis-server at %s, data in %s (PINFER_DATA_DIR)", stack.redis_url, data)
        stack.start_workers(log=run_dir / "workers.log", wait=False)
        stack.start_api(settings.port, log=run_dir / "api.log", wait=False)
        base = stack.base
        _, expected = worker_slots(settings)
        ready: dict = {}
        deadline = time.monotonic() + 300
        while not stop.is_set() and time.monotonic() < deadline:
            if any(p.popen.poll() is not None for p in stack.procs):
                break
            ready = _readyz(base)
            if ready.get("ready_workers", 0) >= expected:
                break
            stop.wait(0.25)
        if ready.get("status") == "ready" and not stop.is_set():
            warn = "" if ready.get("pretrained") else "  WARNING: model NOT pretrained (random weights)"
            n = ready["ready_workers"]
            log.info("pinfer ready on %s (%d worker%s)%s  dashboard: %s/dashboard  Ctrl-C to stop", base, n,
                     "s" if n != 1 else "", warn, base)
        while not stop.is_set() and all(p.popen.poll() is None for p in stack.procs):
            stop.wait(0.5)
        if stop.is_set():
            return 0
        dead = [p.name for p in stack.procs if p.popen.poll() is not None]
        log.error("%s exited; stopping", ", ".join(dead))
        return 1
    finally:
        stack.stop()  # API, then workers (warm shutdown), then Redis
        log.info("stopped")


def _readyz(base: str) -> dict:
    """The /readyz body, {} while the API does not answer yet."""
    from pinfer_client.sdk import Client, ClientError

    try:
        with Client(base, timeout=2.0, retries=0) as c:
            return c.readyz()[1]
    except ClientError:
        return {}


def _lock_data_dir(data: Path):
    """Hold an exclusive lock on the data folder for this process's life (two Redis servers writing
    one append-only file would corrupt it); None when another process holds it."""
    import fcntl

    data.mkdir(parents=True, exist_ok=True)
    f = open(data / "pinfer-up.lock", "a+")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        f.close()
        return None
    _HELD_LOCKS.append(f)  # released by the kernel when this process exits, however it exits
    return f


_HELD_LOCKS: list = []


def _variant_args(argv: list[str]) -> list[str]:
    """``pinfer up``'s options: the model variants to export when missing (as ``pinfer export-model``)."""
    import argparse

    from weights.export import add_variant_arguments

    p = argparse.ArgumentParser(prog="pinfer up", description="run the whole service on this machine")
    add_variant_arguments(p)
    args = p.parse_args(argv)
    out = ["--precision", args.precision, "--runtime", args.runtime, "--calibration-images",
           str(args.calibration_images), "--holdout-images", str(args.holdout_images)]
    return out + (["--calibration", str(args.calibration)] if args.calibration else [])


if __name__ == "__main__":
    sys.exit(main())
