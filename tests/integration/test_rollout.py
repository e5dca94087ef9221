"""Rolling out a model without a restart, on real processes: two pinned workers, gunicorn, Redis.

A bulk job keeps both workers busy while a second model is exported into their model folder; then a
tampered artifact is installed. Synchronisation is on conditions with deadlines (heartbeats, job
counts), never on a fixed sleep. Tiny fixture models keep loads and forward passes quick.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import threading
from collections import Counter, defaultdict

import pytest

from pinfer_client.sdk import Client
from pinfer.procs import wait_until
from shared import keys
from tests.fixtures.models import make_fixture_model
from tests.integration.conftest import jpeg
from weights.manifest import MANIFEST_NAME, read_manifest

pytestmark = pytest.mark.integration
CHUNK = 8  # images per upload request


def _image(i: int) -> bytes:
    return jpeg(((37 * i) % 256, (91 * i) % 256, (13 * i) % 256), size=(96, 96))


def test_a_model_rolls_out_under_load_and_a_tampered_one_is_refused(make_stack, tiny_model_dir, tmp_path):
    model_dir = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model_dir)  # the session's fixture folder stays untouched
    old_sha = read_manifest(model_dir).artifact_sha256
    stack = make_stack(workers=2, PINFER_MODEL_DIR=model_dir, PINFER_RELOAD_CHECK_S=0.2, PINFER_HEARTBEAT_S=0.5,
                       PINFER_MAX_BATCH=4, PINFER_BULK_CHUNK=4)
    assert stack.http.get(f"{stack.base}/readyz", timeout=10).json()["models_by_sha"] == {old_sha: 2}

    def serving() -> dict[str, str]:
        return {w["name"]: w.get("sha256") for w in stack.workers()}

    client = Client(stack.base)
    job = client.create_job("rollout")
    names: list[str] = []
    stop = threading.Event()
    errors: list[BaseException] = []

    def upload() -> None:  # the load: chunks of images, one after another, until told to stop
        try:
            while not stop.is_set():
                batch = [(f"{len(names) + k}.jpg", _image(len(names) + k)) for k in range(CHUNK)]
                added = client.add_images(job["id"], batch)
                assert not added.rejected, added.rejected
                names.extend(n for n, _ in batch)
        except BaseException as exc:  # surfaced in the test thread
            errors.append(exc)

    uploader = threading.Thread(target=upload, daemon=True)
    uploader.start()
    try:
        wait_until(lambda: client.get_job(job["id"])["counts"]["succeeded"] >= 2 * CHUNK or errors, 60,
                   "the first images classified by the old model")
        new = make_fixture_model("tiny", model_dir, seed=1)  # what `pinfer export-model` does: manifest last
        assert new.artifact_sha256 != old_sha
        wait_until(lambda: set(serving().values()) == {new.artifact_sha256} and len(serving()) == 2 or errors, 60,
                   "both workers serving the new model")
        uploaded_before_swap_done = len(names)
        wait_until(lambda: len(names) >= uploaded_before_swap_done + CHUNK or errors, 60,
                   "more images uploaded after the swap")
    finally:
        stop.set()
        uploader.join(60)
    assert not errors, errors
    after = [(f"after/{i}.jpg", _image(10_000 + i)) for i in range(CHUNK)]  # sent once both had swapped
    client.add_images(job["id"], after)
    client.close_job(job["id"])
    wait_until(lambda: client.get_job(job["id"])["status"] == "finished", 60, "the job finished")

    # Nothing lost: every image uploaded has exactly one result, and it succeeded.
    final = client.get_job(job["id"])
    assert final["counts"]["total"] == final["counts"]["succeeded"] == len(names) + len(after), final
    ids = list(stack.store.r.hgetall(keys.job_names(job["id"])).values())
    preds = stack.store.get_many(ids)
    pipe = stack.store.r.pipeline(transaction=False)
    for pid in ids:
        pipe.hget(keys.prediction(pid), "worker")
    workers = pipe.execute()
    shas = [p.result["model"]["sha256"] for p in preds]
    assert set(shas) == {old_sha, new.artifact_sha256}, Counter(shas)  # both models served the job
    by_name = {p.name: sha for p, sha in zip(preds, shas)}
    assert {by_name[n] for n, _ in after} == {new.artifact_sha256}
    # No batch mixes models (one claim = one started_at per worker), and once a worker served the
    # new model it never served the old one again.
    batches: dict[tuple[str, float], set[str]] = defaultdict(set)
    per_worker: dict[str, list[tuple[float, str]]] = defaultdict(list)
    for p, sha, w in zip(preds, shas, workers):
        batches[(w, p.started_at)].add(sha)
        per_worker[w].append((p.finished_at, sha))
    assert all(len(s) == 1 for s in batches.values()), {k: v for k, v in batches.items() if len(v) > 1}
    for w, seq in per_worker.items():
        order = [sha for _, sha in sorted(seq)]
        first_new = order.index(new.artifact_sha256) if new.artifact_sha256 in order else len(order)
        assert set(order[first_new:]) <= {new.artifact_sha256}, (w, order)
    heartbeat_reloads = {w["name"]: int(w["reloads"]) for w in stack.workers()}
    assert set(heartbeat_reloads.values()) == {1}, heartbeat_reloads  # swapped in place: no restart

    # A tampered artifact: refused by every worker, reported, and the new model keeps serving.
    pids_before = {w["pid"] for w in stack.workers()}
    staged = make_fixture_model("tiny", tmp_path / "staging", seed=2)
    data = bytearray((tmp_path / "staging" / staged.artifact).read_bytes())
    data[len(data) // 2] ^= 0xFF
    (model_dir / staged.artifact).write_bytes(bytes(data))
    shutil.copy(tmp_path / "staging" / MANIFEST_NAME, model_dir / ".manifest.new")
    os.replace(model_dir / ".manifest.new", model_dir / MANIFEST_NAME)

    def refusals() -> list[dict]:
        return stack.http.get(f"{stack.base}/readyz", timeout=10).json()["reload_errors"]

    wait_until(lambda: len(refusals()) == 2, 60, "both workers reporting the refused model")
    resp = stack.http.get(f"{stack.base}/readyz", timeout=10)
    body = resp.json()
    assert resp.status_code == 200 and body["status"] == "ready"
    assert body["models_by_sha"] == {new.artifact_sha256: 2} and body["rollout"] is False
    for err in body["reload_errors"]:
        assert err["sha256"] == staged.artifact_sha256 and "sha256 mismatch" in err["reason"], err
    for w in body["workers"]:
        assert w["reload_error"]["sha256"] == staged.artifact_sha256
    assert {w["pid"] for w in stack.workers()} == pids_before
    # Not retried by itself; `pinfer reload` retries it (and it is refused again).
    refused_at = {e["worker"]: e["at"] for e in body["reload_errors"]}
    subprocess.run([sys.executable, "-m", "pinfer.cli", "reload"], env=stack.env, check=True, timeout=60,
                   capture_output=True)
    wait_until(lambda: {e["worker"]: e["at"] > refused_at[e["worker"]] for e in refusals()}
               == dict.fromkeys(refused_at, True), 60, "both workers retrying on `pinfer reload`")
    served = [stack.result(stack.submit(_image(20_000 + i))["id"]) for i in range(4)]
    assert [r["status"] for r in served] == ["succeeded"] * 4
    assert {r["model"]["sha256"] for r in served} == {new.artifact_sha256}
