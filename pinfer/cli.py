"""``pinfer``: one command, lazy subcommands (``ingest`` and ``api`` never import torch)."""
from __future__ import annotations

import os
import signal
import sys
import tempfile
import time
from pathlib import Path

USAGE = """usage: pinfer COMMAND [ARGS]

commands:
  up             run everything on this machine: Redis (private unless PINFER_REDIS_URL), API, pinned workers
                 (first exports the model if missing; takes export-model's --precision/--runtime/--calibration)
  api            run the API under gunicorn (deploy/gunicorn.conf.py)
  worker         run one pinned Celery worker per core (--check: health check)
  export-model   build the TorchScript artifact + manifest (see --help)
  ingest         classify a folder of photos through a running API (see --help)
  settings       print the settings (--markdown for the README table)
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
        from client.ingest import main as run
    elif cmd == "api":
        run = _api
    elif cmd == "up":
        run = _up
    elif cmd == "settings":
        run = _settings
    else:
        print(f"pinfer: unknown command {cmd!r}\n\n{USAGE}", file=sys.stderr)
        return 2
    return int(run(rest) or 0)


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


def _api(argv: list[str]) -> int:
    from pinfer.procs import ROOT

    os.execvp(sys.executable, [sys.executable, "-m", "gunicorn", "-c", str(ROOT / "deploy" / "gunicorn.conf.py"),
                               *argv, "api:create_app()"])
    return 0


def _up(argv: list[str]) -> int:
    """Run the whole service in the foreground until Ctrl-C/SIGTERM, then stop it in order.

    The first signal starts an orderly stop: API first, then the workers (each finishes its batch;
    Redis is still up to take their results), then Redis. A second signal kills what is left.
    """
    import threading

    import requests

    from pinfer.procs import ROOT, start_api, start_redis, start_workers
    from shared.settings import Settings
    from weights.export import main as export
    from worker.launcher import worker_slots

    settings = Settings.from_env()
    if export(["--out", settings.model_dir, "--if-missing", "--fallback-random-init", *_variant_args(argv)]) != 0:
        return 1
    run_dir = Path(os.environ.get("PINFER_RUN_DIR", ROOT / "run"))
    run_dir.mkdir(exist_ok=True)
    env = dict(os.environ)
    procs = []
    stop = threading.Event()
    signals_seen = [0]

    def on_signal(signum, _frame):
        signals_seen[0] += 1
        if signals_seen[0] == 1:
            print("\nstopping: API, then workers (they finish their batches), then Redis; "
                  "signal again to kill", flush=True)
            stop.set()
        else:
            for p in procs:
                p.popen.kill()

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    try:
        if not os.environ.get("PINFER_REDIS_URL"):
            redis_proc, url = start_redis(Path(tempfile.mkdtemp(prefix="pinfer-redis-")))
            procs.append(redis_proc)
            env["PINFER_REDIS_URL"] = url
            print(f"started a private redis-server at {url}", flush=True)
        procs.append(start_workers(env))
        procs.append(start_api(env, settings.port, run_dir / "api.log"))
        base = f"http://127.0.0.1:{settings.port}"
        _, expected = worker_slots(settings)
        ready: dict = {}
        deadline = time.monotonic() + 300
        while not stop.is_set() and time.monotonic() < deadline:
            if any(p.popen.poll() is not None for p in procs):
                break
            try:
                ready = requests.get(base + "/readyz", timeout=2).json()
            except (requests.RequestException, ValueError):
                ready = {}
            if ready.get("ready_workers", 0) >= expected:
                break
            stop.wait(0.25)
        if ready.get("status") == "ready" and not stop.is_set():
            warn = "" if ready.get("pretrained") else "  WARNING: model NOT pretrained (random weights)"
            n = ready["ready_workers"]
            print(f"pinfer ready on {base} ({n} worker{'s' if n != 1 else ''}){warn}  Ctrl-C to stop", flush=True)
        while not stop.is_set() and all(p.popen.poll() is None for p in procs):
            stop.wait(0.5)
        if stop.is_set():
            return 0
        dead = [p.name for p in procs if p.popen.poll() is not None]
        print(f"pinfer: {', '.join(dead)} exited; stopping", file=sys.stderr)
        return 1
    finally:
        for p in reversed(procs):  # API, then workers (warm shutdown), then Redis
            p.stop(signal.SIGTERM, 60)
        print("stopped", flush=True)


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
