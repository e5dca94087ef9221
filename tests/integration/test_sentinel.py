"""Redis failover under load: one primary, one replica, three sentinels (real redis-server processes).

The API and the workers get only ``PINFER_REDIS_URL=sentinel://…?master=…``. A client thread submits
images steadily; the primary is SIGKILLed; the sentinels promote the replica. Required: every image
the API accepted (202) ends terminal, the API answers only 202 or 503 with ``Retry-After`` meanwhile
(never another 5xx, never a dropped connection), and the same worker processes carry on against the
new primary (no restart).
"""
from __future__ import annotations

import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest
import redis
import requests

from pinfer.procs import Proc, find_redis_server, free_port, wait_until
from pinfer.stack import Stack
from shared import keys
from shared.store import Store
from shared.settings import Settings
from tests.integration.conftest import TERMINAL, jpeg

pytestmark = pytest.mark.integration
MASTER = "pinfer-primary"
#: Sentinels declare the primary down after this long without an answer: small, to keep the test short.
DOWN_AFTER_MS = 1000


def _redis(workdir: Path, port: int, *extra: str) -> Proc:
    workdir.mkdir(parents=True, exist_ok=True)
    cmd = [find_redis_server(), "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
           "--maxmemory-policy", "noeviction", "--dir", str(workdir), "--logfile", str(workdir / "redis.log"),
           *extra]
    return Proc(f"redis:{port}", subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT))


def _sentinel(workdir: Path, port: int, primary_port: int) -> Proc:
    workdir.mkdir(parents=True, exist_ok=True)
    conf = workdir / "sentinel.conf"       # sentinels rewrite their config: one writable file each
    conf.write_text(f"port {port}\nbind 127.0.0.1\ndir {workdir}\nlogfile {workdir / 'sentinel.log'}\n"
                    f"sentinel monitor {MASTER} 127.0.0.1 {primary_port} 2\n"
                    f"sentinel down-after-milliseconds {MASTER} {DOWN_AFTER_MS}\n"
                    f"sentinel failover-timeout {MASTER} 10000\n"
                    f"sentinel parallel-syncs {MASTER} 1\n")
    cmd = [find_redis_server(), str(conf), "--sentinel"]
    return Proc(f"sentinel:{port}", subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT))


def _primary_port(sentinel_port: int) -> int:
    host, port = redis.Redis(port=sentinel_port, socket_timeout=1).sentinel_get_master_addr_by_name(MASTER)
    return int(port)


class Load(threading.Thread):
    """Submits one image after another until stopped; keeps every answer."""

    def __init__(self, base: str, images: list[bytes]) -> None:
        super().__init__(daemon=True)
        self.base, self.images = base, images
        self.accepted: list[str] = []
        self.unavailable = 0
        self.bad: list[str] = []
        self.stop = threading.Event()

    def run(self) -> None:
        http = requests.Session()
        i = 0
        while not self.stop.is_set():
            data = self.images[i % len(self.images)]
            i += 1
            try:
                r = http.post(f"{self.base}/v1/predictions", files={"image": ("img.jpg", data)}, timeout=30)
            except requests.RequestException as exc:
                self.bad.append(f"connection: {exc}")
                continue
            if r.status_code == 202:
                self.accepted.append(r.json()["id"])
            elif r.status_code == 503 and r.headers.get("Retry-After", "").isdigit() \
                    and r.json()["error"]["code"] == "service_unavailable":
                self.unavailable += 1
                self.stop.wait(0.1)     # a client backing off (shortened from Retry-After for the test)
            else:
                self.bad.append(f"{r.status_code} {r.headers.get('Retry-After')} {r.text[:200]}")


def _result(http: requests.Session, base: str, pid: str, deadline: float) -> dict:
    """Long-poll one prediction to a terminal state, treating 503 (+Retry-After) as 'ask again'."""
    while time.monotonic() < deadline:
        r = http.get(f"{base}/v1/predictions/{pid}", params={"wait": 10}, timeout=30)
        if r.status_code == 503:
            assert r.headers.get("Retry-After"), r.text
            continue
        assert r.status_code == 200, r.text
        body = r.json()
        if body["status"] in TERMINAL:
            return body
    return body


def test_failover_loses_nothing_accepted_and_workers_follow_the_new_primary(tmp_path, model_dir):
    with Stack.create(tmp_path, model_dir) as stack:  # its stop() also stops the Redis/sentinel processes
        check_failover(stack, stack.procs, tmp_path)


def check_failover(stack: Stack, procs: list[Proc], tmp_path: Path) -> None:
    p_port, r_port = free_port(), free_port()
    primary = _redis(tmp_path / "primary", p_port)
    procs += [primary, _redis(tmp_path / "replica", r_port, "--replicaof", "127.0.0.1", str(p_port))]
    s_ports = [free_port() for _ in range(3)]
    procs += [_sentinel(tmp_path / f"sentinel{i}", port, p_port) for i, port in enumerate(s_ports)]
    sent = redis.Redis(port=s_ports[0], socket_timeout=1, decode_responses=True)
    # Start-up: the sentinels see the replica and each other (quorum and majority reachable).
    wait_until(lambda: sent.execute_command("SENTINEL", "CKQUORUM", MASTER).startswith("OK 3 usable"),
               60, "sentinel quorum")
    wait_until(lambda: any(r["is_slave"] and not r["is_sdown"]
                           for r in sent.sentinel_slaves(MASTER)), 60, "replica known to the sentinels")

    url = "sentinel://" + ",".join(f"127.0.0.1:{p}" for p in s_ports) + f"/0?master={MASTER}"
    stack.redis_url = url
    stack.env.update({"PINFER_REDIS_URL": url, "PINFER_WORKERS": "1",
                      "PINFER_API_PROCESSES": "1", "PINFER_API_THREADS": "16", "PINFER_MAX_WAITERS": "8",
                      "PINFER_HEARTBEAT_S": "1", "PINFER_VISIBILITY_TIMEOUT_S": "10",
                      "PINFER_BATCH_TIME_LIMIT_S": "8", "PINFER_RESTORE_INTERVAL_S": "2"})
    settings = stack.settings
    workers = stack.start_workers(1, log=tmp_path / "workers.log", wait=False)
    stack.start_api(log=tmp_path / "api.log")
    base = stack.base
    wait_until(lambda: stack.client.readyz()[0], 120, "API ready (a worker loaded)", workers.popen)
    store = Store(settings)
    before = {w["pid"] for w in store.live_workers() if w.get("state") in ("READY", "BUSY")}
    assert before

    load = Load(base, [jpeg((i * 40 % 256, 90, 200 - i * 30 % 200)) for i in range(6)])
    load.start()
    wait_until(lambda: len(load.accepted) >= 20, 60, "steady load before the failover")
    accepted_before_kill = len(load.accepted)
    primary.popen.send_signal(signal.SIGKILL)
    primary.popen.wait(10)
    # The sentinels promote the replica; the API takes new work through the new primary.
    wait_until(lambda: _primary_port(s_ports[1]) == r_port, 60, "failover to the replica")
    wait_until(lambda: len(load.accepted) >= accepted_before_kill + 20, 60, "load accepted after the failover")
    load.stop.set()
    load.join(60)

    assert not load.bad, load.bad[:5]
    http = requests.Session()
    deadline = time.monotonic() + 120
    results = {pid: _result(http, base, pid, deadline) for pid in load.accepted}
    stuck = {pid: r["status"] for pid, r in results.items() if r["status"] not in TERMINAL}
    assert not stuck, f"{len(stuck)} of {len(results)} accepted images not terminal: {list(stuck.items())[:5]}"
    assert all(r["status"] == "succeeded" for r in results.values()), \
        {r["status"]: r.get("error") for r in results.values() if r["status"] != "succeeded"}
    # The same worker processes heartbeat into the new primary: they reconnected, nobody restarted them.
    assert workers.popen.poll() is None
    new = redis.Redis(port=r_port, decode_responses=True)
    assert new.info("replication")["role"] == "master"
    after = {w["pid"] for w in Store(settings, new).live_workers() if w.get("state") in ("READY", "BUSY")}
    assert after == before
    assert "exited with" not in (tmp_path / "workers.log").read_text()


def test_wait_replicas_makes_a_202_mean_the_upload_is_on_a_replica(tmp_path):
    """PINFER_REDIS_WAIT_REPLICAS closes the window that asynchronous replication leaves open: the
    store reports an upload accepted only once the replica has it, and refuses (503) otherwise."""
    from shared.errors import ServiceUnavailable

    p_port, r_port = free_port(), free_port()
    primary = _redis(tmp_path / "primary", p_port)
    replica = _redis(tmp_path / "replica", r_port, "--replicaof", "127.0.0.1", str(p_port))
    try:
        rep = redis.Redis(port=r_port, decode_responses=True)
        wait_until(lambda: rep.info("replication")["master_link_status"] == "up", 30, "replica in sync")
        store = Store(Settings.from_env({"PINFER_REDIS_URL": f"redis://127.0.0.1:{p_port}/0",
                                         "PINFER_REDIS_WAIT_REPLICAS": "1", "PINFER_REDIS_WAIT_TIMEOUT_MS": "300"}))
        store.submit("on-both", jpeg(), 3)
        assert rep.hget(keys.prediction("on-both"), "status") == "queued"        # on the replica when submit returned
        replica.stop(signal.SIGKILL)
        with pytest.raises(ServiceUnavailable, match="only 0 of 1 replicas"):
            store.submit("primary-only", jpeg(), 3)
    finally:
        for p in (replica, primary):
            p.stop(signal.SIGTERM, 10)
