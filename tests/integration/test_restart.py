"""`pinfer up` restarted mid-job loses nothing: its private Redis keeps its data in PINFER_DATA_DIR.

The real command a user runs (`python -m pinfer.cli up`: private durable Redis, gunicorn, pinned
workers) is started, fed a bulk job by `pinfer ingest` plus single predictions, and stopped while work
is still queued: once in order (SIGTERM to `pinfer up`), once by SIGKILL of every process of the
stack at once. After each restart every image that was answered 202 must reach a terminal state,
and a rerun of the same `pinfer ingest` command must continue the same job to one line per image.
"""
from __future__ import annotations

import json
import re
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from pinfer_client.sdk import Client, WaitTimeout

from pinfer.procs import ROOT, free_port, wait_until
from shared import keys
from shared.settings import Settings
from shared.store import Store
from tests.integration.conftest import jpeg

pytestmark = pytest.mark.integration
N_BULK = 60


def children(pid: int) -> list[int]:
    """Every descendant of ``pid`` (from /proc), parents before children."""
    by_parent: dict[int, list[int]] = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            by_parent.setdefault(ppid, []).append(int(d.name))
    out, todo = [], [pid]
    while todo:
        kids = by_parent.get(todo.pop(0), [])
        out += kids
        todo += kids
    return out


class Up:
    """One `pinfer up` process tree on a fixed port and data folder."""

    def __init__(self, env: dict, log: Path) -> None:
        self.env, self.log = env, log
        self.base = f"http://127.0.0.1:{env['PINFER_PORT']}"
        self.proc: subprocess.Popen | None = None
        self.client = Client(self.base, timeout=10.0, retries=0)

    def start(self) -> None:
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen([sys.executable, "-m", "pinfer.cli", "up"], env=self.env, cwd=ROOT,
                                         stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        wait_until(lambda: self.client.readyz()[0], 180, "pinfer up", self.proc)

    @property
    def redis_url(self) -> str:
        """The private Redis of the running `pinfer up` (from its log; it takes a free port each start)."""
        return re.findall(r"private redis-server at (\S+),", self.log.read_text())[-1]

    def stop_in_order(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        assert self.proc.wait(90) == 0, self.log.read_text()[-3000:]

    def kill_everything(self) -> None:
        """SIGKILL every process of the stack at once, Redis first (so it gets no orderly shutdown)."""
        tree = children(self.proc.pid)
        redis = [p for p in tree if "redis" in Path(f"/proc/{p}/cmdline").read_bytes().decode(errors="replace")]
        for p in redis + [self.proc.pid] + [p for p in tree if p not in redis]:
            try:
                os.kill(p, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.proc.wait(10)
        for p in tree:  # reap check: nothing of the old stack may survive
            wait_until(lambda: not Path(f"/proc/{p}").exists()
                       or Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z",
                       10, f"pid {p} gone")

    def close(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.stop_in_order()
        self.client.close()


def ingest(up: Up, folder: Path, out: Path, log: Path) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "pinfer.cli", "ingest", str(folder), "--api", up.base, "--out", str(out),
           "--no-progress", "--chunk", "8", "--concurrency", "1", "--retries", "2", "--timeout", "10"]
    with open(log, "ab") as f:
        return subprocess.Popen(cmd, env=up.env, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT)


def job_counts(up: Up, job_id: str) -> dict:
    return up.client.get_job(job_id)["counts"]


def final_status(up: Up, pid: str, timeout: float = 120) -> str:
    """Long-poll (the API's own wait) until terminal; the last status after ``timeout``."""
    try:
        return up.client.wait(pid, timeout=timeout)["status"]
    except WaitTimeout as exc:
        return exc.last["status"]


@pytest.mark.parametrize("how", ["sigterm", "sigkill"])
def test_restart_mid_job_loses_nothing_and_ingest_continues_the_same_job(tmp_path, model_dir, how):
    folder = tmp_path / "photos"
    folder.mkdir()
    for i in range(N_BULK):  # distinct bytes (a result cache must not answer them)
        (folder / f"{i:04d}.jpg").write_bytes(jpeg((i * 4 % 256, 90, 255 - i), extra=b"%d" % i))
    env = {**os.environ, "PINFER_PORT": str(free_port()), "PINFER_DATA_DIR": str(tmp_path / "data"),
           "PINFER_RUN_DIR": str(tmp_path / "run"), "PINFER_MODEL_DIR": str(model_dir), "PINFER_WORKERS": "1",
           "PINFER_API_PROCESSES": "1", "PINFER_API_THREADS": "16", "PINFER_MAX_WAITERS": "8",
           # a small per-job bound keeps a backlog queued; short timeouts make SIGKILL recovery quick
           "PINFER_MAX_PENDING_PER_JOB": "16", "PINFER_RETRY_AFTER_S": "1",
           "PINFER_VISIBILITY_TIMEOUT_S": "8", "PINFER_BATCH_TIME_LIMIT_S": "6", "PINFER_RESTORE_INTERVAL_S": "1",
           "PINFER_HEARTBEAT_S": "1", "PINFER_CACHE_TTL_S": "0", "PYTHONUNBUFFERED": "1"}
    env.pop("PINFER_REDIS_URL", None)
    up = Up(env, tmp_path / "up.log")
    out = tmp_path / "results.jsonl"
    try:
        up.start()
        first = ingest(up, folder, out, tmp_path / "ingest1.log")
        state = Path(str(out) + ".state.json")
        wait_until(lambda: state.exists(), 60, "ingest created its job", first)
        job_id = json.loads(state.read_text())["job_id"]
        wait_until(lambda: job_counts(up, job_id)["queued"] >= 6, 60, "a backlog in the job", first)
        singles = []
        for i in range(6):
            singles.append(up.client.submit(jpeg((i, 1, 2), extra=b"s%d" % i))["id"])  # 202, or ApiError
        first.kill()  # the client is interrupted too
        first.wait(10)
        assert job_counts(up, job_id)["queued"] > 0, "the job finished before the stack was stopped: nothing tested"
        # every image of the job the server has accepted so far (the API may still be finishing the
        # request the killed client had in flight: those are checked after the restart too, if any)
        accepted = Store(Settings(redis_url=up.redis_url)).r.hgetall(keys.job_names(job_id))
        if how == "sigterm":
            up.stop_in_order()
        else:
            up.kill_everything()
        up.start()

        assert job_counts(up, job_id)["total"] >= len(accepted), "images of the job were lost"
        for pid in singles:
            assert final_status(up, pid) == "succeeded", pid

        second = ingest(up, folder, out, tmp_path / "ingest2.log")
        assert second.wait(180) == 0, (tmp_path / "ingest2.log").read_text()[-3000:]
        assert json.loads(state.read_text())["job_id"] == job_id, "the rerun started a new job"
        lines = [json.loads(x) for x in out.read_text().splitlines()]
        assert sorted(x["name"] for x in lines) == sorted(p.name for p in folder.iterdir())
        assert {x["status"] for x in lines} == {"succeeded"}, [x for x in lines if x["status"] != "succeeded"][:3]
        ids = {x["name"]: x["id"] for x in lines}
        assert {n: ids[n] for n in accepted} == accepted, "an image accepted before the stop was uploaded again"
        job = up.client.get_job(job_id)
        assert job["status"] == "finished" and job["counts"]["succeeded"] == N_BULK, job
    finally:
        up.close()
