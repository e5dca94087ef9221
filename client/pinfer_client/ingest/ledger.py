"""``--out``, the results ledger: one line per image name, append-only, repaired after a crash.

The ledger, not the server, is what decides what is left to do: a name with a line is never
uploaded again, so a rerun after any interruption ends with exactly one line per image.
"""
from __future__ import annotations

import csv
import io
import json
import os
import threading
from pathlib import Path
from typing import TextIO

from pinfer_client.ingest.summary import UsageError

CSV_COLUMNS = ("name", "id", "status", "label1", "score1", "class_index1", "top_k", "error_code", "error_message")



def result_record(row: dict) -> dict:
    """The line stored for one result: name, id, status, then top_k or error."""
    out = {"name": row.get("name"), "id": row.get("id"), "status": row.get("status")}
    if row.get("status") == "succeeded":
        out["top_k"] = row.get("top_k") or []
    else:
        out["error"] = row.get("error") or {"code": "unknown", "message": "no error given"}
    return out


def _csv_row(rec: dict) -> list:
    top = rec.get("top_k") or []
    first = top[0] if top else {}
    err = rec.get("error") or {}
    compact = json.dumps([[t.get("label"), t.get("score"), t.get("class_index")] for t in top],
                         ensure_ascii=False, separators=(",", ":")) if top else ""
    message = " ".join(str(err.get("message", "")).split())  # one physical line per row
    return [rec.get("name"), rec.get("id") or "", rec.get("status"), first.get("label", ""),
            first.get("score", ""), first.get("class_index", ""), compact, err.get("code", ""), message]


class ResultsFile:
    """``--out``: append-only, one line per image name, flushed line by line so a crash loses at
    most a partial last line, which :meth:`open` cuts off (and the run fetches again)."""

    def __init__(self, path: Path, use_csv: bool) -> None:
        self.path = path
        self.csv = use_csv
        self.status: dict[str, tuple[str, str]] = {}  # name -> (status, error code)
        self.repaired = False
        self._fh: TextIO | None = None
        self._lock = threading.Lock()

    def open(self) -> None:
        """Load the names already present, cut a crash-truncated last line, open for appending.

        Only the last line can be torn (each line is one write ending in a newline); any other bad
        line means ``--out`` is not ours, and it is refused rather than rewritten."""
        raw = self.path.read_bytes() if self.path.exists() else b""
        body, sep, tail = raw.rpartition(b"\n")
        header_seen = False
        for number, line in enumerate(body.split(b"\n") if sep else [], start=1):
            if not line.strip():
                continue
            parsed = self._parse(line, header_seen)
            if parsed is None:
                raise UsageError(f"{self.path}:{number} is not a line pinfer ingest wrote "
                                 f"({'CSV' if self.csv else 'JSON Lines'} expected); use another --out")
            if parsed == "header":
                header_seen = True
            else:
                self.status.setdefault(parsed[0], (parsed[1], parsed[2]))
        if tail:
            keep = len(body) + len(sep)
            # a JSON object that parses is whole (its last byte is the closing brace): keep it and
            # add the newline; a CSV row without its newline may be cut inside a field: drop it
            parsed = None if self.csv else self._parse(tail, header_seen)
            with self.path.open("r+b") as fh:
                fh.truncate(keep)
                if isinstance(parsed, tuple):
                    fh.seek(keep)
                    fh.write(tail + b"\n")
                    self.status.setdefault(parsed[0], (parsed[1], parsed[2]))
                else:
                    self.repaired = True
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fh = self.path.open("a", encoding="utf-8", newline="")
        if self.csv and not header_seen:
            self._write_line(self._csv_line(list(CSV_COLUMNS)))

    def _parse(self, line: bytes, header_seen: bool) -> tuple[str, str, str] | str | None:
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError:
            return None
        if self.csv:
            try:
                row = next(csv.reader([text]))
            except (csv.Error, StopIteration):
                return None
            if tuple(row) == CSV_COLUMNS:
                return "header" if not header_seen else None
            if not header_seen or len(row) != len(CSV_COLUMNS):
                return None
            return row[0], row[2], row[7]
        try:
            rec = json.loads(text)
        except ValueError:
            return None
        if not isinstance(rec, dict) or not isinstance(rec.get("name"), str):
            return None
        return rec["name"], str(rec.get("status")), str((rec.get("error") or {}).get("code", ""))

    @staticmethod
    def _csv_line(row: list) -> str:
        buf = io.StringIO()
        csv.writer(buf, lineterminator="\n").writerow(row)
        return buf.getvalue()

    def _write_line(self, text: str) -> None:
        assert self._fh is not None
        self._fh.write(text)
        self._fh.flush()

    def __contains__(self, name: object) -> bool:
        return name in self.status

    def write(self, rec: dict) -> bool:
        """Append one result unless its name already has a line (or the file is closed)."""
        with self._lock:
            name = rec["name"]
            if self._fh is None or name in self.status:
                return False
            if self.csv:
                self._write_line(self._csv_line(_csv_row(rec)))
            else:
                self._write_line(json.dumps(rec, ensure_ascii=False) + "\n")
            self.status[name] = (rec["status"], str((rec.get("error") or {}).get("code", "")))
            return True

    def sync(self) -> None:
        """Make the lines durable before the state file's cursor moves past them."""
        with self._lock:
            if self._fh is not None:
                self._fh.flush()
                os.fsync(self._fh.fileno())

    def close(self) -> None:
        with self._lock:
            if self._fh is not None:
                self._fh.flush()
                self._fh.close()
                self._fh = None
