"""The ``ingest()`` entry point and the command line (``pinfer-ingest``, ``pinfer ingest`` on a server
install, ``python -m pinfer_client.ingest``).

Ctrl-C and SIGTERM set the run's :class:`~pinfer_client.StopToken`: every thread and every SDK call
ends at its next wait, the output is flushed and the state saved, and the command exits 128 +
the signal number (130 for Ctrl-C). A second Ctrl-C while it winds down interrupts at once.
"""
from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from types import FrameType
from typing import Callable, Iterator, Sequence

from tqdm import tqdm

from pinfer_client.ingest.ledger import ResultsFile
from pinfer_client.ingest.run import Run
from pinfer_client.ingest.scan import scan_paths
from pinfer_client.ingest.state import state_path_for
from pinfer_client.ingest.summary import EXIT_FAILED, EXIT_INTERRUPTED, EXIT_OK, EXIT_USAGE, Summary, UsageError
from pinfer_client.sdk import AddResult, Client, ClientError
from pinfer_client.stop import Stopped, StopToken

DEFAULT_API = "http://127.0.0.1:8000"


def ingest(paths: Sequence[str | os.PathLike], api: str, out: str | os.PathLike, *, csv: bool = False,
           top_k: int | None = None, concurrency: int = 4, chunk: int = 16, name: str | None = None,
           progress: bool = True, retries: int = 5, timeout: float = 30.0, poll_interval: float = 0.5,
           overload_patience: float = 600.0, client: Client | None = None,
           stop: StopToken | threading.Event | None = None, on_upload: Callable[[AddResult], None] | None = None,
           log: Callable[[str], None] | None = None) -> Summary:
    """Classify every image under ``paths`` into ``out``, resumably (see :mod:`pinfer_client.ingest`).

    Setting ``stop`` (a StopToken, or a threading.Event) ends the run like a Ctrl-C: state saved,
    output flushed, ``Summary.interrupted`` set. ``on_upload`` sees every upload answer (progress, tests).
    Raises UsageError for bad paths or an ``out`` that is not a results file."""
    started = time.monotonic()
    log = log or _log
    out_path = Path(out)
    images, skipped = scan_paths(paths)
    output = ResultsFile(out_path, csv)
    output.open()
    summary = Summary(out=out_path, total=len(images), skipped=skipped,
                      already_done=sum(1 for img in images if img.name in output))
    run: Run | None = None
    stop = StopToken.of(stop)
    own_client = client is None
    try:
        if summary.already_done < len(images):
            if output.repaired:
                log(f"repaired {out_path}: cut a partial last line left by an interrupted run")
            if client is None:  # its calls and waits end as soon as the run is stopped
                client = Client(api, timeout=timeout, retries=retries, pool_size=concurrency + 2, stop=stop)
            default_name = name or Path(paths[0]).resolve().name or "pinfer-ingest"
            run = Run(images, output, client, api, top_k=top_k, concurrency=max(1, concurrency),
                      chunk=max(1, chunk), job_name=default_name, progress=progress,
                      poll_interval=poll_interval, overload_patience=overload_patience, stop=stop,
                      on_upload=on_upload, log=log)
            try:
                run.execute()
                if stop.is_set() and run.fatal is None:
                    summary.interrupted = True
            except KeyboardInterrupt:
                summary.interrupted = True
            except Stopped:  # an SDK call of this thread saw the token
                summary.interrupted = run.fatal is None
            except ClientError as exc:
                summary.error = str(exc)
            finally:
                run.finish(summary)
    finally:
        output.close()
        if own_client and client is not None:
            client.close()
    summary.elapsed_s = time.monotonic() - started
    for img in images:
        status, code = output.status.get(img.name, ("", ""))
        if status == "succeeded":
            summary.succeeded += 1
        elif status:
            summary.failed[code or "unknown"] = summary.failed.get(code or "unknown", 0) + 1
        else:
            summary.missing += 1
    return summary


def _log(message: str) -> None:
    tqdm.write(f"pinfer ingest: {message}", file=sys.stderr)


# --- command line ----------------------------------------------------------------------------------
def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return value


def build_parser(prog: str = "pinfer-ingest") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Classify every image under PATH... through a pinfer bulk job. Resumable: run the "
                    "same command again after an interruption and it continues where it stopped.")
    parser.add_argument("paths", nargs="+", metavar="PATH", help="image files or folders (walked recursively)")
    parser.add_argument("--api", default=os.environ.get("PINFER_API_URL", DEFAULT_API),
                        help="API base URL (default: $PINFER_API_URL or %(default)s)")
    parser.add_argument("--out", required=True, type=Path,
                        help="results file, one line per image (JSON Lines; CSV with --csv)")
    parser.add_argument("--csv", action="store_true", help="write CSV instead of JSON Lines")
    parser.add_argument("--top-k", type=_positive_int, default=None, help="labels per image (server default: 5)")
    parser.add_argument("--concurrency", type=_positive_int, default=4, help="upload threads (default: 4)")
    parser.add_argument("--chunk", type=_positive_int, default=16, help="images per upload request (default: 16)")
    parser.add_argument("--name", default=None, help="job name (default: the first PATH's folder name)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--retries", type=int, default=5, help="retries of a failing call (default: 5)")
    parser.add_argument("--timeout", type=float, default=30.0, help="seconds to wait for one answer (default: 30)")
    parser.add_argument("--poll-interval", type=float, default=0.5, help=argparse.SUPPRESS)
    return parser


@contextmanager
def _stop_on_signals(stop: StopToken) -> Iterator[list[int]]:
    """While inside: SIGINT and SIGTERM set ``stop`` (the run winds down and saves its state) and are
    listed in the yielded list. After a first Ctrl-C, a second one raises KeyboardInterrupt as usual.
    Outside the main thread (signals cannot be handled there) it does nothing."""
    caught: list[int] = []
    if threading.current_thread() is not threading.main_thread():
        yield caught
        return

    def handler(signum: int, frame: FrameType | None) -> None:
        caught.append(signum)
        stop.stop()
        if signum == signal.SIGINT:
            signal.signal(signal.SIGINT, signal.default_int_handler)

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield caught
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def main(argv: Sequence[str] | None = None, prog: str = "pinfer-ingest") -> int:
    """The command: 0 every image has a result, 1 the run could not finish, 2 usage, 128 + N when
    signal N stopped it (130 Ctrl-C, 143 SIGTERM)."""
    args = build_parser(prog).parse_args(argv)
    stop = StopToken()
    try:
        with _stop_on_signals(stop) as caught:
            summary = ingest(args.paths, args.api, args.out, csv=args.csv, top_k=args.top_k,
                             concurrency=args.concurrency, chunk=args.chunk, name=args.name,
                             progress=not args.no_progress, retries=args.retries, timeout=args.timeout,
                             poll_interval=args.poll_interval, stop=stop)
    except UsageError as exc:
        print(f"pinfer ingest: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except OSError as exc:  # the output or state file cannot be written (permissions, disk full)
        print(f"pinfer ingest: error: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        print("pinfer ingest: interrupted. Re-run the same command to resume.", file=sys.stderr)
        return EXIT_INTERRUPTED
    print(summary.format())
    if summary.interrupted:
        print(f"pinfer ingest: interrupted; state saved in {state_path_for(args.out)}. "
              "Re-run the same command to resume.", file=sys.stderr)
    elif summary.exit_code != EXIT_OK:
        reason = summary.error or f"{summary.missing} images have no result"
        print(f"pinfer ingest: could not finish: {reason}. Re-run the same command to resume.", file=sys.stderr)
    if summary.interrupted and caught:
        return 128 + caught[0]
    return summary.exit_code
