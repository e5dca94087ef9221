"""Classify a folder tree through a bulk job, resumably (``pinfer-ingest``; ``pinfer ingest`` on a
server install; ``python -m pinfer_client.ingest``).

    pinfer-ingest PATH... --api URL --out results.jsonl [--csv] [--top-k K] [--concurrency N]
                  [--chunk N] [--name JOBNAME] [--no-progress]

Images are uploaded in chunks by a few threads while a reader thread follows the job's results
cursor and appends one line per image to ``--out`` as results arrive. A small state file beside it
(``<out>.state.json``) remembers the job and the cursor, so running the same command again after a
crash, a Ctrl-C or a lost API continues where it stopped: names that already have a line are never
uploaded again, names already in the job come back as duplicates (their results arrive through the
cursor), and the output ends with exactly one line per image.

Modules: :mod:`.scan` (which files, under which names), :mod:`.ledger` (``--out``, repaired after
a crash), :mod:`.state` (the state file), :mod:`.summary` (how a run ends), :mod:`.run` (the
threads), :mod:`.cli` (:func:`ingest` and the command line). Programmatic use: :func:`ingest`
returns a :class:`Summary`; a :class:`~pinfer_client.StopToken` passed as ``stop`` ends it cleanly.
"""
from pinfer_client.ingest.cli import build_parser, ingest, main
from pinfer_client.ingest.ledger import CSV_COLUMNS, ResultsFile, result_record
from pinfer_client.ingest.scan import IMAGE_SUFFIXES, ImageFile, scan_paths
from pinfer_client.ingest.state import load_state, save_state, state_path_for
from pinfer_client.ingest.summary import EXIT_FAILED, EXIT_INTERRUPTED, EXIT_OK, EXIT_USAGE, Summary, UsageError

__all__ = [
    "CSV_COLUMNS",
    "EXIT_FAILED",
    "EXIT_INTERRUPTED",
    "EXIT_OK",
    "EXIT_USAGE",
    "IMAGE_SUFFIXES",
    "ImageFile",
    "ResultsFile",
    "Summary",
    "UsageError",
    "build_parser",
    "ingest",
    "load_state",
    "main",
    "result_record",
    "save_state",
    "scan_paths",
    "state_path_for",
]
