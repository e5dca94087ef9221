"""Submit-and-poll end to end: real redis-server, real pinned Celery workers, gunicorn, HTTP."""
from __future__ import annotations

import os
import signal
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from pinfer.procs import wait_until
from tests.integration.conftest import jpeg

pytestmark = pytest.mark.integration


def reference_probs(model_dir, photos) -> dict:
    """Each photo classified alone, in this process, with the same artifact (exact mode, fp32)."""
    import torch

    from shared.settings import Settings
    from shared.transforms import preprocess
    from weights.manifest import verify_artifact

    _, path = verify_artifact(model_dir)
    model = torch.jit.load(str(path)).eval()
    s = Settings(resize="exact")
    out = {}
    with torch.inference_mode():
        for p in photos:
            x = torch.from_numpy(preprocess(p.read_bytes(), s)[None])
            out[p.name] = torch.softmax(model(x), dim=1)[0].numpy()
    return out



def assert_same_top_k(name: str, result: dict, probs: np.ndarray) -> None:
    """A served result names the same top-k, with the same scores, as ``probs`` computed in process;
    a swap is tolerated only where the reference itself is tied within 1e-5."""
    order = np.argsort(-probs, kind="stable")
    got = [t["class_index"] for t in result["top_k"]]
    for rank, idx in enumerate(got):
        if idx != order[rank]:
            assert abs(probs[idx] - probs[order[rank]]) < 1e-5, (name, rank, got, order[:5])
    for t in result["top_k"]:
        assert abs(t["score"] - float(probs[t["class_index"]])) <= 1e-4, (name, t)
        assert t["label"]

def test_corpus_concurrently_matches_in_process_classification(make_stack, corpus, model_dir):
    stack = make_stack(workers=2)
    with ThreadPoolExecutor(16) as pool:
        subs = list(pool.map(lambda p: (p, stack.submit(p.read_bytes(), top_k=5)), corpus))
        results = list(pool.map(lambda s: (s[0], stack.result(s[1]["id"])), subs))
    failed = [(p.name, r.get("error")) for p, r in results if r["status"] != "succeeded"]
    assert not failed, failed
    assert max(r["timings"]["batch_size"] for _, r in results) > 1, "no batch held more than one image"
    assert all(r["model"]["pretrained"] is False and r["model"]["precision"] == "fp32" for _, r in results)

    ref = reference_probs(model_dir, corpus)
    for p, r in results:
        assert_same_top_k(p.name, r, ref[p.name])


def _pids_running(stack, ids) -> int:
    return sum(1 for p in stack.store.get_many(ids) if p and p.status == "running")


def test_sigkill_mid_batch_loses_nothing_and_recovers_within_a_minute(make_stack, corpus):
    """Production delivery settings (PINFER_VISIBILITY_TIMEOUT_S=30, restore every 5 s)."""
    stack = make_stack(workers=1)
    images = [p.read_bytes() for p in corpus[:40]] or [jpeg((i * 5 % 255, 40, 90)) for i in range(40)]
    ids = [stack.submit(d)["id"] for d in images * 2]
    wait_until(lambda: _pids_running(stack, ids) > 0, 60, "a batch in flight")
    victim = int(stack.workers()[0]["pid"])
    os.kill(victim, signal.SIGKILL)
    killed_at = time.monotonic()

    results = [stack.result(pid, timeout=120) for pid in ids]
    recovery_s = time.monotonic() - killed_at
    assert [r["status"] for r in results] == ["succeeded"] * len(ids), \
        {r["status"] for r in results}
    redelivered = [r for r in results if r["attempts"] > 1]
    assert redelivered, "the kill hit no batch in flight"
    # Healthy work is delivered again only because its worker died: never more than once more.
    assert max(r["attempts"] for r in results) == 2
    print(f"\nSIGKILL recovery: all {len(ids)} results {recovery_s:.1f}s after the kill; "
          f"{len(redelivered)} were delivered again")
    assert recovery_s < 60
    # The launcher restarted the killed process.
    stack.wait_ready(1, exclude_pids={victim})



def test_poison_images_fail_after_bounded_deliveries_and_spare_every_neighbour(make_stack, tiny_model_dir):
    """Three poison images, first, in the middle and last of the batches they share with healthy
    images: each kills its (real, pinned) worker process with SIGKILL whenever it is decoded. The
    poison images end ``worker_crashed``; every healthy neighbour succeeds, whatever the order the
    broker delivers them in again. The old rule (every image of a redelivered batch charged for each
    crash) failed neighbours here every time."""
    batch, marker = 8, b"PINFER-POISON-PILL"
    # A short visibility timeout only to keep the test quick: the bound itself is what is tested.
    stack = make_stack(workers=0, PINFER_CHAOS_KILL_MARKER=marker.decode(), PINFER_MODEL_DIR=tiny_model_dir,
                       PINFER_VISIBILITY_TIMEOUT_S=5, PINFER_RESTORE_INTERVAL_S=1, PINFER_MAX_DELIVERIES=2,
                       PINFER_BATCH_TIME_LIMIT_S=4, PINFER_MAX_BATCH=batch, PINFER_MAX_WAIT_MS=200)
    poison_at = {0, batch + 3, 3 * batch - 1}  # first of batch 1, middle of batch 2, last of batch 3
    ids = []
    for i in range(3 * batch):  # all queued before a worker starts, so batches are 0-7, 8-15, 16-23
        ids.append(stack.submit(jpeg((10 * i % 256, 100, 50), extra=marker if i in poison_at else b""))["id"])
    stack.start_workers(wait=False)

    results = [stack.result(pid, timeout=240) for pid in ids]

    for i, (pid, r) in enumerate(zip(ids, results)):
        rec = stack.store.get(pid)
        if i in poison_at:
            assert r["status"] == "failed" and r["error"]["code"] == "worker_crashed", (i, r)
            # In flight twice (once in its shared batch, once alone), failed on the third delivery.
            assert (rec.runs, rec.attempts) == (2, 3), (i, rec)
        else:
            assert r["status"] == "succeeded", (i, r.get("error"), rec)
            assert rec.runs <= 2 and rec.alone_runs <= 1, (i, rec)
    # The neighbours of the first poison image really were in the forward pass its worker died in.
    assert all(stack.store.get(ids[i]).runs == 2 for i in range(1, batch)), \
        [stack.store.get(ids[i]) for i in range(1, batch)]
    log = (stack.workdir / "workers.log").read_text(errors="replace")
    assert log.count("chaos marker found") >= 6  # each poison image killed a real process twice


def test_readiness_reports_workers_and_unpretrained_model(make_stack):
    stack = make_stack(workers=0)
    ready, body = stack.client.readyz()  # False: answered 503
    assert not ready and body["status"] == "not_ready"
    stack.start_workers(wait=False)
    stack.wait_ready(1)
    ready, body = stack.client.readyz()
    assert ready and body["status"] == "ready" and body["pretrained"] is False and "NOT" in body["warning"]
    assert {w["core"] for w in body["workers"]} <= {str(c) for c in os.sched_getaffinity(0)}


def test_http_errors_through_gunicorn(make_stack):
    import requests

    stack = make_stack(workers=0, PINFER_MAX_UPLOAD_BYTES=100_000)
    big = requests.post(stack.base + "/v1/predictions", data=b"\xff\xd8" + b"0" * 200_000,
                        headers={"Content-Type": "image/jpeg"}, timeout=10)
    assert big.status_code == 413 and big.json()["error"]["code"] == "image_too_large"
    text = requests.post(stack.base + "/v1/predictions", files={"image": ("a.txt", b"hello")}, timeout=10)
    assert text.status_code == 415 and text.json()["error"]["code"] == "unsupported_format"
    k = requests.post(stack.base + "/v1/predictions?top_k=21", files={"image": ("a", jpeg())}, timeout=10)
    assert k.status_code == 400 and k.json()["error"]["code"] == "invalid_parameter"
    missing = requests.get(stack.base + "/v1/predictions/nope", timeout=10)
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "not_found"


def test_a_lost_message_is_found_and_published_again(make_stack):
    """An accepted image whose broker message vanished (popped by a worker that was then killed, or
    an API that died between storing and publishing) still gets its result: the sweeper finds it."""
    import requests

    from shared import keys

    # A short grace period only to keep the test quick; the mechanism is what is tested.
    stack = make_stack(workers=0, PINFER_VISIBILITY_TIMEOUT_S=5, PINFER_BATCH_TIME_LIMIT_S=4,
                       PINFER_HEARTBEAT_S=1)
    lost = stack.submit(jpeg((30, 160, 90)))["id"]
    kept = stack.submit(jpeg((160, 30, 90)))["id"]
    r = stack.store.r
    messages = r.lrange(keys.QUEUE_INTERACTIVE, 0, -1)
    assert len(messages) == 2
    from worker.celery_adapter import message_pid

    [victim] = [m for m in messages if message_pid(m) == lost]
    assert r.lrem(keys.QUEUE_INTERACTIVE, 1, victim) == 1  # the message is gone; the record is queued

    stack.start_workers(wait=False)
    stack.wait_ready(1)
    assert stack.result(kept)["status"] == "succeeded"
    body = stack.result(lost, timeout=60)
    assert body["status"] == "succeeded" and body["attempts"] == 1
    log = (stack.workdir / "workers.log").read_text(errors="replace")
    assert f"prediction {lost} was accepted" in log  # republished by the sweeper, once
    assert log.count(f"prediction {lost} was accepted") == 1
    assert requests.get(stack.base + "/readyz", timeout=5).status_code == 200


def test_onnx_runtime_int8_serves_what_it_computes_in_process_without_torch(make_stack, resnet_variants,
                                                                          tmp_path_factory):
    """The same end-to-end comparison as fp32, for the ONNX Runtime int8 variant of ResNet-18: results
    computed by a pinned worker in batches equal each photo classified alone in this process, and that
    worker process never mapped libtorch."""
    from tests.integration._images import source_photos
    from weights.manifest import read_manifest, verify_variant
    from worker.runtimes.ort import OrtBackend

    photos = source_photos(tmp_path_factory.mktemp("int8-photos"))[:24]
    stack = make_stack(workers=1, PINFER_MODEL_DIR=resnet_variants, PINFER_PRECISION="int8",
                       PINFER_RUNTIME="onnx")
    with ThreadPoolExecutor(8) as pool:
        subs = list(pool.map(lambda p: (p, stack.submit(p.read_bytes(), top_k=5)), photos))
        results = list(pool.map(lambda s: (s[0], stack.result(s[1]["id"])), subs))
    failed = [(p.name, r.get("error")) for p, r in results if r["status"] != "succeeded"]
    assert not failed, failed
    variant = next(v for v in read_manifest(resnet_variants).variant_list() if v.key == "int8/onnx")
    assert {(r["model"]["precision"], r["model"]["runtime"], r["model"]["sha256"]) for _, r in results} == \
        {("int8", "onnx", variant.artifact_sha256)}
    worker = stack.workers()[0]
    assert "int8/onnx" in worker["selection"]
    maps = open(f"/proc/{worker['pid']}/maps").read()
    assert "onnxruntime" in maps and "libtorch" not in maps

    from shared.settings import Settings
    from shared.transforms import preprocess

    backend = OrtBackend(verify_variant(resnet_variants, variant), "int8", threads=1)
    s = Settings(resize="exact")
    for p, r in results:
        assert_same_top_k(p.name, r, backend.probs(preprocess(p.read_bytes(), s)[None])[0])
