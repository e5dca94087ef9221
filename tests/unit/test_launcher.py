"""worker.launcher: the core list syntax, the worker-to-core plan, and each worker's command line."""
from __future__ import annotations

import os
import shutil

import fakeredis
import pytest

from shared import keys
from shared.settings import Settings
from shared.store import Store
from worker import launcher as launcher_mod
from worker.launcher import Child, Launcher, parse_cores


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


def test_host_id_prefers_the_setting():
    assert launcher_mod.host_id(Settings(host_id="rack-7")) == "rack-7"
