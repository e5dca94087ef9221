"""``pinfer worker``: one Celery worker process per core, each pinned with ``taskset -c N``.

The launcher restarts a child that dies (with backoff), and on the first SIGTERM/SIGINT asks every
child for a warm shutdown (finish the running batch; buffered messages go back to the queue), then
exits; a second signal stops them at once. With PINFER_CORE_LEASE (compose replicas on one host) it
first claims free cores through a Redis lease keyed by the physical host, renewed while it runs,
so replicas land on distinct cores without per-replica configuration.
"""
from __future__ import annotations

import argparse
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

from shared import keys
from shared.schema import SERVING
from shared.settings import Settings
from worker.threads import PINNED_CORE_ENV, torch_threads

log = logging.getLogger("pinfer.launcher")


def parse_cores(spec: str) -> list[int]:
    """``"0-3,6"`` -> [0, 1, 2, 3, 6]."""
    cores: list[int] = []
    for part in filter(None, (p.strip() for p in spec.split(","))):
        lo, _, hi = part.partition("-")
        cores.extend(range(int(lo), int(hi or lo) + 1))
    return sorted(set(cores))


def worker_slots(settings: Settings) -> tuple[list[int], int]:
    """The cores workers may use (PINFER_CORES, else this process's affinity) and how many workers."""
    cores = parse_cores(settings.cores) if settings.cores else sorted(os.sched_getaffinity(0))
    return cores, settings.workers or len(cores)


# The kernel's boot id: the same for every container on one kernel (Docker Desktop's VM included),
# readable without a mount, different on every other host (and after a reboot, when the old leases
# have long expired).
BOOT_ID = Path("/proc/sys/kernel/random/boot_id")


def host_id(settings: Settings, boot_id: Path | None = None) -> str | None:
    """The key core leases are grouped by: one per physical host, shared by all its containers.

    PINFER_HOST_ID when set, else the kernel's boot id (``boot_id`` replaces its path in tests).
    None when neither is there (a missing, empty or unreadable file, or a directory in its place):
    never a per-container value such as the hostname, with which every replica would believe it is
    alone on its host and lease core 0.
    """
    if settings.host_id:
        return settings.host_id
    try:
        key = (boot_id or BOOT_ID).read_text().strip()
    except (OSError, ValueError):  # missing, a directory, unreadable, not text
        return None
    return key or None


@dataclass
class Child:
    slot: int
    core: int | None
    proc: subprocess.Popen | None = None
    started: float = 0.0
    backoff: float = 0.5
    restarts: int = 0


@dataclass
class Launcher:
    settings: Settings
    loglevel: str = "INFO"
    children: list[Child] = field(default_factory=list)
    stopping: int = 0

    def plan(self) -> list[int | None]:
        s = self.settings
        cores, n = worker_slots(s)
        if s.core_lease:
            return self._lease(cores, n)
        if n > len(cores):
            log.warning("%d workers for %d cores: some cores get two workers", n, len(cores))
        return [cores[i % len(cores)] for i in range(n)]

    def _lease(self, cores: list[int], n: int) -> list[int | None]:
        from shared.store import Store

        self.host = host_id(self.settings)
        if self.host is None:
            log.error("PINFER_CORE_LEASE is on but this host has no key (PINFER_HOST_ID is empty and %s "
                      "is unreadable): running %d worker(s) UNPINNED; set PINFER_HOST_ID to a name shared "
                      "by every replica on this host", BOOT_ID, n)
            return [None] * n
        self.store = Store(self.settings)
        self.holder = f"{socket.gethostname()}:{os.getpid()}"
        got: list[int | None] = []
        for _ in range(n):
            core = self.store.lease_core(self.host, self.holder, [c for c in cores if c not in got],
                                         self._lease_s())
            if core is None:
                log.warning("no free core left on host %s: this worker runs unpinned", self.host)
            got.append(core)
        threading.Thread(target=self._renew, daemon=True, name="core-lease").start()
        return got

    def _lease_s(self) -> float:
        return 3 * self.settings.heartbeat_s + 5

    def _renew(self) -> None:
        while not self.stopping:
            for c in self.children:
                if c.core is not None:
                    try:
                        if self.store.lease_core(self.host, self.holder, [c.core], self._lease_s()) is None:
                            log.error("lost the lease on core %d of host %s (Redis unreachable for longer "
                                      "than the lease?): another replica may share it", c.core, self.host)
                    except Exception as exc:
                        log.warning("core lease renewal failed: %s", exc)
            time.sleep(self.settings.heartbeat_s)

    def command(self, child: Child) -> list[str]:
        name = f"pinfer{'' if child.core is None else child.core}-{child.slot}@%h"
        # JSON logs: no start-up banner (plain text on stdout) among the JSON lines.
        quiet = ["--quiet"] if self.settings.log_format == "json" else []
        cmd = [sys.executable, "-m", "celery", "-A", "worker.app", *quiet, "worker", "--pool", "solo",
               "--concurrency", "1", "-Q", f"{keys.QUEUE_INTERACTIVE},{keys.QUEUE_BULK}", "-n", name,
               "--without-gossip", "--without-mingle", "-l", self.loglevel]
        if self.pinned(child):
            cmd = ["taskset", "-c", str(child.core)] + cmd
        return cmd

    @staticmethod
    def pinned(child: Child) -> bool:
        return child.core is not None and shutil.which("taskset") is not None

    def environment(self, child: Child, base: Mapping[str, str] | None = None) -> dict[str, str]:
        """The child's environment: which core it is pinned to, and its thread count (worker/threads.py)
        for torch and every OpenMP/MKL pool, so that no library starts one thread per host core."""
        env = dict(os.environ if base is None else base)
        env[PINNED_CORE_ENV] = str(child.core) if self.pinned(child) else ""
        threads = str(torch_threads(env, affinity={child.core} if self.pinned(child) else None))
        env.update(OMP_NUM_THREADS=threads, MKL_NUM_THREADS=threads)
        return env

    def spawn(self, child: Child) -> None:
        env = self.environment(child)
        env["PINFER_WORKER_SLOT"] = str(child.slot)  # the worker's metrics port is PINFER_METRICS_PORT + slot
        child.proc = subprocess.Popen(self.command(child), env=env, preexec_fn=die_with_parent)
        child.started = time.monotonic()
        log.info("worker slot %d started on core %s (pid %d)", child.slot, child.core, child.proc.pid)

    def _on_signal(self, signum, _frame) -> None:
        self.stopping += 1
        sig = signal.SIGTERM if self.stopping == 1 else signal.SIGQUIT
        log.warning("%s: %s", signal.Signals(signum).name,
                    "finishing current batches, then exiting (signal again to stop at once)"
                    if self.stopping == 1 else "stopping now")
        for c in self.children:
            if c.proc and c.proc.poll() is None:
                c.proc.send_signal(sig)

    def run(self) -> int:
        signal.signal(signal.SIGTERM, self._on_signal)
        signal.signal(signal.SIGINT, self._on_signal)
        self.children = [Child(i, core) for i, core in enumerate(self.plan())]
        for c in self.children:
            self.spawn(c)
        from worker.webhooks import start_delivery

        webhooks = start_delivery(self.settings)  # threads here, never in an inference process
        while True:
            alive = 0
            for c in self.children:
                if c.proc is None:
                    continue
                rc = c.proc.poll()
                if rc is None:
                    alive += 1
                    continue
                if self.stopping:
                    c.proc = None
                    continue
                if time.monotonic() - c.started > 60:
                    c.backoff = 0.5
                log.error("worker slot %d (core %s) exited with %s; restarting in %.1fs",
                          c.slot, c.core, rc, c.backoff)
                time.sleep(c.backoff)
                c.backoff = min(c.backoff * 2, 10.0)
                c.restarts += 1
                if not self.stopping:
                    self.spawn(c)
                    alive += 1
            if self.stopping and not alive:
                break
            time.sleep(0.2)
        if self.settings.core_lease:
            for c in self.children:
                if c.core is not None:
                    self.store.release_core(self.host, c.core)
        if webhooks is not None:
            webhooks.stop()
        log.info("all workers stopped")
        return 0


def check(settings: Settings) -> int:
    """Health check for a container: exit 0 when a worker on this host has a fresh heartbeat."""
    from shared.store import Store

    me = socket.gethostname()
    try:
        workers = Store(settings).live_workers()
    except Exception as exc:
        print(f"redis unreachable: {exc}", file=sys.stderr)
        return 1
    mine = [w for w in workers if w.get("host") == me and w.get("state") in SERVING]
    print(f"{len(mine)} ready worker(s) on {me}")
    return 0 if mine else 1


def die_with_parent() -> None:
    """SIGTERM this child when the process that started it dies (Linux prctl PR_SET_PDEATHSIG):
    the launcher's workers, and the private redis-server of `pinfer up` and the tests."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)
    except OSError:
        pass


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="pinfer worker", description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="exit 0 if a worker on this host is ready")
    ap.add_argument("--loglevel", default=os.environ.get("PINFER_LOG_LEVEL", "INFO"))
    args = ap.parse_args(argv)
    settings = Settings.from_env()
    if args.check:
        return check(settings)
    from shared import logs
    from worker.celery_adapter import UntestedVersions, check_versions

    logs.setup(settings.log_format, args.loglevel)
    try:  # here too, so a wrong install stops at once instead of each child exiting in a restart loop
        check_versions(settings.allow_untested_celery)
    except UntestedVersions as exc:
        log.critical("%s", exc)
        return 2
    return Launcher(settings, args.loglevel).run()


if __name__ == "__main__":
    sys.exit(main())
