"""Model roll-out without a restart (worker/reload.py): when a worker reloads, and what a failed load leaves.

Real tiny fixture models in a temporary model folder, loaded through the same ModelRuntime a worker
uses; a fake clock drives PINFER_RELOAD_CHECK_S. The wiring into Celery and the heartbeat is covered
on real processes by tests/integration/test_rollout.py.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from shared.settings import Settings
from tests.fixtures.models import make_fixture_model
from weights.manifest import MANIFEST_NAME, write_artifact
from worker import reload as rl
from worker.reload import CHANGED, REQUESTED, Reloader
from worker.runtime import ModelRuntime

CHECK_S = 2.0


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, s: float = CHECK_S) -> None:
        self.now += s


def settings_for(model_dir: Path, check_s: float = CHECK_S) -> Settings:
    return Settings(model_dir=str(model_dir), precision="fp32", runtime="torchscript", max_batch=2,
                    reload_check_s=check_s)


def install_tampered(model_dir: Path, staging: Path, seed: int) -> str:
    """What a corrupted copy looks like to a worker: a new manifest naming an artifact whose bytes
    are not the ones it was published with (the manifest replaced last, as export does). Its sha."""
    m = make_fixture_model("tiny", staging, seed=seed)
    data = bytearray((staging / m.artifact).read_bytes())
    data[len(data) // 2] ^= 0xFF
    (model_dir / m.artifact).write_bytes(bytes(data))
    shutil.copy(staging / MANIFEST_NAME, model_dir / ".manifest.new")
    os.replace(model_dir / ".manifest.new", model_dir / MANIFEST_NAME)
    return m.artifact_sha256


@pytest.fixture
def model_dir(tmp_path) -> Path:
    d = tmp_path / "model"
    make_fixture_model("tiny", d)
    return d


@pytest.fixture
def clock() -> Clock:
    return Clock()


def make_reloader(model_dir: Path, clock: Clock, check_s: float = CHECK_S, generation: int = 0,
                  loads: list | None = None) -> Reloader:
    s = settings_for(model_dir, check_s)

    def load(settings, plan, threads):
        if loads is not None:
            loads.append(plan.info.sha256)
        return ModelRuntime(settings, threads=1, plan=plan)

    return Reloader(s, ModelRuntime(s, threads=1), generation, load=load, clock=clock)


def probs(runtime) -> np.ndarray:
    return runtime.forward(np.full((1, 3, 224, 224), 0.5, dtype=np.float32))


def test_a_new_manifest_is_loaded_verified_warmed_and_swapped_in(model_dir, clock):
    r = make_reloader(model_dir, clock)
    old = r.runtime
    assert r.due() is None  # the manifest it loaded
    new = make_fixture_model("tiny", model_dir, seed=1)  # export-model: artifacts first, manifest last
    assert r.due() is None  # not before PINFER_RELOAD_CHECK_S
    clock.advance()
    assert r.due() == CHANGED
    assert r.reload(CHANGED) is True
    assert r.runtime is not old and r.runtime.info.sha256 == new.artifact_sha256 != old.info.sha256
    assert r.reloads == 1 and r.error is None
    assert not np.allclose(probs(r.runtime), probs(old))  # really the other network
    clock.advance()
    assert r.due() is None  # nothing more to do


def test_the_manifest_is_hashed_only_when_its_stat_changes(model_dir, clock, monkeypatch):
    hashed = []
    real = rl.manifest_digest
    monkeypatch.setattr(rl, "manifest_digest", lambda p: hashed.append(p) or real(p))
    r = make_reloader(model_dir, clock)
    assert r.due() is None and len(hashed) == 1  # first look: it may have changed while loading
    for _ in range(3):
        clock.advance()
        assert r.due() is None
    assert len(hashed) == 1
    os.utime(model_dir / MANIFEST_NAME)  # touched, same bytes: hashed once more, no reload
    clock.advance()
    assert r.due() is None and len(hashed) == 2


def test_zero_check_interval_reloads_only_on_request(model_dir, clock):
    loads: list[str] = []
    r = make_reloader(model_dir, clock, check_s=0, generation=3, loads=loads)
    new = make_fixture_model("tiny", model_dir, seed=1)
    clock.advance(100)
    assert r.due() is None
    r.request(3)  # the counter as it was when the worker started: already seen
    assert r.due() is None
    r.request(4)  # `pinfer reload`
    assert r.due() == REQUESTED
    assert r.reload(REQUESTED) is True and loads == [new.artifact_sha256]
    assert r.due() is None  # acted on once


def test_a_request_with_nothing_new_loads_nothing(model_dir, clock):
    loads: list[str] = []
    r = make_reloader(model_dir, clock, loads=loads)
    old = r.runtime
    r.request(1)
    assert r.reload(r.due()) is False
    assert r.runtime is old and loads == [] and r.error is None


def test_a_manifest_that_names_the_served_artifact_again_loads_nothing(model_dir, clock):
    """An export that only rewrote the manifest (or added a variant not chosen) swaps nothing."""
    loads: list[str] = []
    r = make_reloader(model_dir, clock, loads=loads)
    old = r.runtime
    m = write_artifact((model_dir / old.variant.artifact).read_bytes(), model_dir, weights_source="fixture",
                       pretrained=False, name="fixture-tiny", created_at="2000-01-01T00:00:00+00:00")
    assert m.artifact_sha256 == old.info.sha256
    clock.advance()
    assert r.due() == CHANGED  # another manifest...
    assert r.reload(CHANGED) is False  # ...naming what is served
    assert r.runtime is old and loads == []
    clock.advance()
    assert r.due() is None


def test_a_tampered_artifact_is_refused_and_the_old_model_keeps_serving(model_dir, clock, tmp_path):
    loads: list[str] = []
    r = make_reloader(model_dir, clock, loads=loads)
    old, before = r.runtime, probs(r.runtime)
    refused = install_tampered(model_dir, tmp_path / "staging", seed=2)
    clock.advance()
    assert r.reload(r.due()) is False
    assert r.runtime is old and np.array_equal(probs(r.runtime), before)
    assert r.error["sha256"] == refused and "sha256 mismatch" in r.error["reason"]
    assert r.error["manifest_sha256"] == rl.manifest_digest(model_dir / MANIFEST_NAME)
    # Not retried at every check (that would re-read a bad file forever)...
    clock.advance()
    assert r.due() is None and r.error is not None
    # ...but on request it is, and still refused.
    r.request(1)
    assert r.reload(r.due()) is False and r.error["sha256"] == refused
    # A good export afterwards rolls out and clears the error.
    good = make_fixture_model("tiny", model_dir, seed=3)
    clock.advance()
    assert r.reload(r.due()) is True
    assert r.runtime.info.sha256 == good.artifact_sha256 and r.error is None


def test_an_artifact_that_fails_its_warm_up_is_refused(model_dir, clock):
    r = make_reloader(model_dir, clock)
    old = r.runtime
    bad = make_fixture_model("raises", model_dir)  # loads, verifies, then fails every forward pass
    clock.advance()
    assert r.reload(r.due()) is False
    assert r.runtime is old and r.error["sha256"] == bad.artifact_sha256
    assert probs(r.runtime).shape == (1, 1000)


def test_an_unreadable_manifest_is_refused_without_a_sha(model_dir, clock):
    r = make_reloader(model_dir, clock)
    old = r.runtime
    (model_dir / ".m").write_text("{not json")
    os.replace(model_dir / ".m", model_dir / MANIFEST_NAME)
    clock.advance()
    assert r.reload(r.due()) is False
    assert r.runtime is old and r.error["sha256"] is None and "unreadable model manifest" in r.error["reason"]


def test_rolling_the_manifest_back_clears_the_error(model_dir, clock, tmp_path):
    r = make_reloader(model_dir, clock)
    shutil.copy(model_dir / MANIFEST_NAME, tmp_path / "good-manifest.json")
    install_tampered(model_dir, tmp_path / "staging", seed=2)
    clock.advance()
    assert r.reload(r.due()) is False and r.error is not None
    shutil.copy(tmp_path / "good-manifest.json", model_dir / ".m")
    os.replace(model_dir / ".m", model_dir / MANIFEST_NAME)
    clock.advance()
    assert r.due() is None and r.error is None


def test_reload_check_must_not_be_negative():
    with pytest.raises(ValueError, match="PINFER_RELOAD_CHECK_S"):
        Settings.from_env({"PINFER_RELOAD_CHECK_S": "-1"})


# ---------------------------------------------------------------- what /readyz shows
def _beat(store, name: str, sha: str, **over) -> None:
    info = {"state": "READY", "model": "m", "sha256": sha, "pretrained": 0, "precision": "fp32",
            "runtime": "torchscript", "selection": "s", "pid": 1, "host": "h", "core": "0", "reload_error": ""}
    info.update(over)
    store.heartbeat(name, info)


def test_readyz_shows_workers_per_sha_during_a_rollout_and_refused_reloads(client, store):
    _beat(store, "w1", "aaa")
    body = client.get("/readyz").get_json()
    assert body["models_by_sha"] == {"aaa": 1} and body["rollout"] is False and body["reload_errors"] == []

    _beat(store, "w2", "bbb", state="BUSY")
    _beat(store, "w3", "aaa", state="RELOADING")  # still serves aaa while it loads
    resp = client.get("/readyz")
    body = resp.get_json()
    assert resp.status_code == 200 and body["ready_workers"] == 3
    assert body["models_by_sha"] == {"aaa": 2, "bbb": 1} and body["rollout"] is True

    err = '{"reason": "model artifact x sha256 mismatch", "sha256": "ccc", "manifest_sha256": "m", "at": 1.0}'
    _beat(store, "w3", "aaa", reload_error=err)
    body = client.get("/readyz").get_json()
    assert body["status"] == "ready"  # a refused roll-out leaves the old model serving
    assert body["reload_errors"] == [{"worker": "w3", "reason": "model artifact x sha256 mismatch",
                                      "sha256": "ccc", "manifest_sha256": "m", "at": 1.0}]
    assert {w["name"]: w["reload_error"] for w in body["workers"]}["w3"]["sha256"] == "ccc"


def test_the_result_cache_answers_nothing_while_two_models_are_served(store):
    from api.cache import ResultCache

    _beat(store, "w1", "aaa", resize=store.settings.resize)
    _beat(store, "w2", "bbb", state="RELOADING", resize=store.settings.resize)
    assert ResultCache(store).serving() is None
    _beat(store, "w2", "aaa", resize=store.settings.resize)
    assert ResultCache(store).serving().sha256 == "aaa"


def test_pinfer_reload_bumps_the_counter_workers_read(store, monkeypatch, capsys, model_dir, clock):
    import shared.store
    from pinfer.cli import main

    monkeypatch.setattr(shared.store, "Store", lambda settings: store)
    _beat(store, "w1", "aaa")
    r = make_reloader(model_dir, clock, check_s=0, generation=store.reload_generation())
    assert main(["reload"]) == 0
    assert store.reload_generation() == 1 and "aaa: 1" in capsys.readouterr().out
    r.request(store.reload_generation())  # what the heartbeat thread does
    assert r.due() == REQUESTED
    assert main(["reload", "now"]) == 2  # takes no arguments
