"""worker.launcher: the core list syntax, the worker-to-core plan, and each worker's command line."""
from __future__ import annotations

import logging
import os
import shutil

import fakeredis
import pytest

from shared import keys
from shared.settings import Settings
from shared.store import Store
from worker import launcher as launcher_mod
from worker.launcher import Child, Launcher, parse_cores
from worker.threads import torch_threads


@pytest.mark.parametrize("spec,cores", [("0-3,6", [0, 1, 2, 3, 6]), ("5", [5]), ("", []),
                                        (" 1 , 3-4 ", [1, 3, 4]), ("6,0-1", [0, 1, 6]),
                                        ("1,1-2,2", [1, 2]), ("0-0", [0]), ("2,", [2])])
def test_parse_cores(spec, cores):
    assert parse_cores(spec) == cores


@pytest.mark.parametrize("spec", ["a", "1-b", "x-3"])
def test_parse_cores_refuses_garbage(spec):
    with pytest.raises(ValueError):
        parse_cores(spec)


@pytest.mark.parametrize("env,plan", [({"PINFER_CORES": "4-5"}, [4, 5]),
                                      ({"PINFER_CORES": "0-3,6", "PINFER_WORKERS": "2"}, [0, 1]),
                                      ({"PINFER_CORES": "0-1", "PINFER_WORKERS": "3"}, [0, 1, 0]),
                                      ({"PINFER_CORES": "7", "PINFER_WORKERS": "1"}, [7])])
def test_plan_from_workers_and_cores(env, plan):
    assert Launcher(Settings.from_env(env)).plan() == plan


def test_plan_defaults_to_one_worker_per_core_of_the_affinity():
    assert Launcher(Settings.from_env({})).plan() == sorted(os.sched_getaffinity(0))


def test_plan_with_core_lease_takes_distinct_free_cores(monkeypatch):
    server = fakeredis.FakeServer()
    s = Settings.from_env({"PINFER_CORES": "0-3", "PINFER_WORKERS": "2", "PINFER_CORE_LEASE": "1",
                           "PINFER_HOST_ID": "box"})
    store = Store(s, fakeredis.FakeRedis(server=server, decode_responses=True), fakeredis.FakeRedis(server=server))
    store.lease_core("box", "someone-else", [0], 60)  # another replica on this host holds core 0
    monkeypatch.setattr("shared.store.Store", lambda settings: store)

    launcher = Launcher(s)
    try:
        plan = launcher.plan()
    finally:
        launcher.stopping = 1  # ends the renewal thread
    assert plan == [1, 2]
    assert set(store.r.hkeys(keys.core_leases("box"))) == {"0", "1", "2"}


def test_command_pins_the_worker_and_reads_both_queues(monkeypatch):
    monkeypatch.setattr(shutil, "which", lambda name: "/usr/bin/" + name)
    cmd = Launcher(Settings()).command(Child(slot=1, core=3))
    assert cmd[:3] == ["taskset", "-c", "3"]
    queues = cmd[cmd.index("-Q") + 1].split(",")
    assert sorted(queues) == sorted([keys.QUEUE_INTERACTIVE, keys.QUEUE_BULK])
    assert queues[0] == keys.QUEUE_INTERACTIVE
    assert cmd[cmd.index("--pool") + 1] == "solo"
    assert "worker.app" in cmd
    name = cmd[cmd.index("-n") + 1]
    assert "3" in name and name.endswith("@%h")


def test_distinct_children_get_distinct_names(monkeypatch):
    monkeypatch.setattr(shutil, "which", lambda name: "/usr/bin/" + name)
    launcher = Launcher(Settings())
    cmds = [launcher.command(Child(slot=i, core=c)) for i, c in enumerate([0, 1, 0])]
    assert len({cmd[cmd.index("-n") + 1] for cmd in cmds}) == 3


def test_unpinned_worker_has_no_taskset(monkeypatch):
    monkeypatch.setattr(shutil, "which", lambda name: "/usr/bin/" + name)
    cmd = Launcher(Settings()).command(Child(slot=0, core=None))
    assert "taskset" not in cmd and "-Q" in cmd


def test_without_taskset_the_worker_still_starts_unpinned(monkeypatch):
    monkeypatch.setattr(shutil, "which", lambda name: None)
    cmd = Launcher(Settings()).command(Child(slot=0, core=2))
    assert "taskset" not in cmd and cmd[1:3] == ["-m", "celery"]


def test_host_id_prefers_the_setting(tmp_path):
    boot_id = tmp_path / "boot_id"
    boot_id.write_text("b1946ac9-2b4e-4b4e-9c4e-2f1e0b0c0d0e\n")
    assert launcher_mod.host_id(Settings(host_id="rack-7"), boot_id) == "rack-7"


def test_host_id_is_the_kernels_boot_id(tmp_path):
    boot_id = tmp_path / "boot_id"
    boot_id.write_text(" b1946ac9-2b4e-4b4e-9c4e-2f1e0b0c0d0e\n")
    assert launcher_mod.host_id(Settings(), boot_id) == "b1946ac9-2b4e-4b4e-9c4e-2f1e0b0c0d0e"


def test_host_id_of_this_kernel_is_shared_by_every_process():
    """The real file: every container on this kernel reads the same value, no mount needed."""
    if not launcher_mod.BOOT_ID.is_file():
        pytest.skip("no /proc/sys/kernel/random/boot_id (not Linux?)")
    key = launcher_mod.host_id(Settings())
    assert key and key == launcher_mod.BOOT_ID.read_text().strip()


@pytest.mark.parametrize("shape", ["missing", "empty", "blank", "directory"])
def test_host_id_without_a_key_is_none_never_the_hostname(tmp_path, shape):
    """The shapes Docker leaves behind: no file, an empty one, or a directory where a bind source
    was missing. A hostname fallback would differ per container and let every replica take core 0."""
    path = tmp_path / "boot_id"
    if shape == "empty":
        path.write_text("")
    elif shape == "blank":
        path.write_text("\n  \n")
    elif shape == "directory":
        path.mkdir()
    assert launcher_mod.host_id(Settings(), path) is None


def test_core_lease_without_a_host_key_runs_unpinned_and_says_so(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(launcher_mod, "BOOT_ID", tmp_path / "missing")

    def no_redis(settings):
        raise AssertionError("no host key: nothing may be leased")

    monkeypatch.setattr("shared.store.Store", no_redis)
    s = Settings.from_env({"PINFER_CORES": "0-3", "PINFER_WORKERS": "2", "PINFER_CORE_LEASE": "1"})
    with caplog.at_level(logging.ERROR, logger="pinfer.launcher"):
        plan = Launcher(s).plan()
    assert plan == [None, None]
    assert any(r.levelno == logging.ERROR and "UNPINNED" in r.getMessage() and "PINFER_HOST_ID" in r.getMessage()
               for r in caplog.records), caplog.text


def test_core_lease_keys_by_the_boot_id(tmp_path, monkeypatch):
    boot_id = tmp_path / "boot_id"
    boot_id.write_text("kernel-1\n")
    monkeypatch.setattr(launcher_mod, "BOOT_ID", boot_id)
    server = fakeredis.FakeServer()
    s = Settings.from_env({"PINFER_CORES": "0-1", "PINFER_WORKERS": "1", "PINFER_CORE_LEASE": "1"})
    store = Store(s, fakeredis.FakeRedis(server=server, decode_responses=True), fakeredis.FakeRedis(server=server))
    monkeypatch.setattr("shared.store.Store", lambda settings: store)
    first, second = Launcher(s), Launcher(s)  # two replicas (containers) on one kernel
    try:
        monkeypatch.setattr(launcher_mod.socket, "gethostname", lambda: "container-a")
        assert first.plan() == [0]
        monkeypatch.setattr(launcher_mod.socket, "gethostname", lambda: "container-b")
        assert second.plan() == [1]
    finally:
        first.stopping = second.stopping = 1
    assert set(store.r.hkeys(keys.core_leases("kernel-1"))) == {"0", "1"}


# --------------------------------------------------------------------------- threads per worker
def test_pinned_worker_uses_one_thread_per_leased_core(monkeypatch):
    monkeypatch.setattr(shutil, "which", lambda name: "/usr/bin/" + name)
    env = Launcher(Settings()).environment(Child(slot=0, core=3), base={"OMP_NUM_THREADS": "8", "PATH": "/bin"})
    assert env["PINFER_WORKER_CORE"] == "3"
    assert env["OMP_NUM_THREADS"] == env["MKL_NUM_THREADS"] == "1"
    assert torch_threads(env, affinity={3}) == 1  # what the child's runtime computes under taskset -c 3
    assert env["PATH"] == "/bin"


@pytest.mark.parametrize("omp,threads", [(None, 1), ("1", 1), ("3", 3), ("0", 1), ("", 1), ("many", 1)])
def test_unpinned_worker_honours_omp_num_threads_else_one(monkeypatch, omp, threads):
    monkeypatch.setattr(shutil, "which", lambda name: "/usr/bin/" + name)
    base = {} if omp is None else {"OMP_NUM_THREADS": omp}
    env = Launcher(Settings()).environment(Child(slot=0, core=None), base=base)
    assert env["PINFER_WORKER_CORE"] == ""
    assert env["OMP_NUM_THREADS"] == env["MKL_NUM_THREADS"] == str(threads)
    # The child sees all host cores, yet does not start a thread per core.
    assert torch_threads(env, affinity=set(range(64))) == threads


def test_worker_without_taskset_counts_as_unpinned(monkeypatch):
    monkeypatch.setattr(shutil, "which", lambda name: None)
    env = Launcher(Settings()).environment(Child(slot=0, core=2), base={})
    assert env["PINFER_WORKER_CORE"] == "" and env["OMP_NUM_THREADS"] == "1"


def test_torch_threads_of_a_process_pinned_to_several_cores():
    assert torch_threads({"PINFER_WORKER_CORE": "0", "OMP_NUM_THREADS": "1"}, affinity={0, 1}) == 2
    assert torch_threads({"PINFER_WORKER_CORE": "0"}) == len(os.sched_getaffinity(0))
