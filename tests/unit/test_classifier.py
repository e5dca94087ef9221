"""worker.classify.Classifier with the real store on fakeredis.

Most tests use a fake runtime that records what each forward pass received (a fingerprint per
image: every test image is a solid colour, so its preprocessed tensor's mean identifies it); a few
run the real ModelRuntime over the ``tiny`` / ``raises`` fixture artifacts.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from shared import keys
from shared.errors import InferenceError
from shared.labels import load_labels
from shared.schema import BULK, CANCELED, FAILED, INTERACTIVE, QUEUED, RUNNING, SUCCEEDED, new_id
from shared.transforms import preprocess
from tests.fixtures.models import make_fixture_model
from worker.classify import Classifier, Item
from worker.runtime import ModelInfo, ModelRuntime

LABELS = load_labels()
pytestmark = pytest.mark.filterwarnings("ignore:.*deprecated:DeprecationWarning")


def fingerprint(tensor: np.ndarray) -> float:
    return round(float(tensor.mean()), 4)


class FakeRuntime:
    """forward() records the fingerprints of each batch and ranks classes 0, 1, 2, ... best first."""

    top_k = staticmethod(ModelRuntime.top_k)

    def __init__(self, fail: bool = False) -> None:
        self.info = ModelInfo("fake-net", "f" * 64, False, "fp32")
        self.fail = fail
        self.batches: list[list[float]] = []

    def forward(self, batch: np.ndarray) -> np.ndarray:
        assert batch.dtype == np.float32 and batch.shape[1:] == (3, 224, 224)
        self.batches.append([fingerprint(x) for x in batch])
        if self.fail:
            raise InferenceError(f"the model failed on a batch of {len(batch)}")
        row = np.linspace(1.0, 0.0, 1000, dtype=np.float32)
        return np.tile(row / row.sum(), (len(batch), 1))

    @property
    def sizes(self) -> list[int]:
        return [len(b) for b in self.batches]


class World:
    """Store + fake runtime + helpers to submit distinct solid-colour images."""

    def __init__(self, store, settings, images, runtime=None, waiting=None, recent=lambda: True) -> None:
        """``recent``: whether interactive traffic was seen lately (bulk then runs in small chunks)."""
        self.store, self.settings, self.images = store, settings, images
        self.runtime = runtime or FakeRuntime()
        self.clf = Classifier(settings, store, self.runtime, "worker-1", interactive_waiting=waiting,
                              interactive_recent=recent)
        self.fp: dict[str, float] = {}
        self._n = 0

    def add(self, lane: str = INTERACTIVE, top_k: int = 3, data: bytes | None = None) -> Item:
        pid = new_id()
        if data is None:
            self._n += 1
            data = self.images.jpeg(size=(40, 30), color=(10 * self._n % 256, 255 - 7 * self._n % 256, 90))
            fp = self.fp_of(data)
            assert fp not in self.fp.values()  # distinct images, so batches can be told apart
            self.fp[pid] = fp
        assert self.store.submit(pid, data, top_k, lane).outcome == "ok"
        return Item(pid, lane)

    def fp_of(self, data: bytes) -> float:
        return fingerprint(preprocess(data, self.settings))

    def status(self, item: Item) -> str:
        return self.store.get(item.pid).status

    def fps(self, items) -> list[float]:
        return [self.fp[i.pid] for i in items]


@pytest.fixture
def world(store, settings, images):
    return World(store, settings, images)


def corrupt_jpeg(images) -> bytes:
    good = images.jpeg(size=(64, 64))
    return good[: len(good) // 2]  # a JPEG cut in half: the header is fine, the data is not


# --- one bad image fails alone ------------------------------------------------------------------
def test_corrupt_image_fails_alone_and_the_others_succeed_in_one_batch(world, images):
    good = [world.add(top_k=3) for _ in range(3)]
    bad = world.add(data=corrupt_jpeg(images))
    items = [good[0], bad, good[1], good[2]]

    out = world.clf.run(items)

    assert out.done == items and out.deferred == []
    assert world.runtime.sizes == [3] and out.batch_sizes == [3]
    rec = world.store.get(bad.pid)
    assert rec.status == FAILED and rec.error["code"] == "corrupt_image"
    for item in good:
        rec = world.store.get(item.pid)
        assert rec.status == SUCCEEDED and rec.attempts == 1
        assert [t["label"] for t in rec.result["top_k"]] == LABELS[:3]
        assert [t["class_index"] for t in rec.result["top_k"]] == [0, 1, 2]
        scores = [t["score"] for t in rec.result["top_k"]]
        assert scores == sorted(scores, reverse=True)
        assert rec.result["model"] == world.runtime.info.public()
        assert rec.result["timings"]["batch_size"] == 3
        assert rec.result["timings"]["total_ms"] >= rec.result["timings"]["queued_ms"] >= 0
        assert rec.started_at is not None and rec.finished_at is not None
    # classified images' bytes and pending entries are gone
    assert world.store.images([i.pid for i in items]) == [None] * 4
    assert world.store.r.zcard(keys.PENDING) == 0


def test_each_item_gets_its_own_top_k(world):
    a, b = world.add(top_k=1), world.add(top_k=7)
    world.clf.run([a, b])
    assert len(world.store.get(a.pid).result["top_k"]) == 1
    assert len(world.store.get(b.pid).result["top_k"]) == 7


def test_batches_are_at_most_max_batch(store, settings, images):
    w = World(store, settings.replace(max_batch=2), images)
    items = [w.add() for _ in range(5)]
    out = w.clf.run(items)
    assert w.runtime.sizes == [2, 2, 1] and out.batch_sizes == [2, 2, 1]
    assert {w.status(i) for i in items} == {SUCCEEDED}
    assert [w.store.get(i.pid).result["timings"]["batch_size"] for i in items] == [2, 2, 2, 2, 1]


def test_inference_error_fails_every_item_of_the_batch(store, settings, images):
    w = World(store, settings, images, runtime=FakeRuntime(fail=True))
    items = [w.add() for _ in range(3)]
    out = w.clf.run(items)
    assert out.batch_sizes == []
    for item in items:
        rec = store.get(item.pid)
        assert rec.status == FAILED and rec.error["code"] == "inference_error"
    assert store.r.zcard(keys.PENDING) == 0


def test_expired_image_bytes_fail_image_expired(world):
    gone, ok = world.add(), world.add()
    world.store.r.delete(keys.image(gone.pid))
    world.clf.run([gone, ok])
    rec = world.store.get(gone.pid)
    assert rec.status == FAILED and rec.error["code"] == "image_expired"
    assert world.status(ok) == SUCCEEDED and world.runtime.sizes == [1]


def test_duplicate_delivery_of_a_finished_prediction_is_skipped(world):
    item = world.add()
    world.clf.run([item])
    first = world.store.get(item.pid)

    out = world.clf.run([Item(item.pid, item.lane)])
    assert world.runtime.sizes == [1]  # no second forward pass
    again = world.store.get(item.pid)
    assert again.status == SUCCEEDED and again.attempts == 1
    assert again.finished_at == first.finished_at and again.result == first.result
    assert out.batch_sizes == []


def test_canceled_items_are_skipped(world):
    a, b = world.add(), world.add()
    world.store.transition(a.pid, CANCELED, (QUEUED,), {"error_code": "canceled"})
    world.clf.run([a, b])
    assert world.status(a) == CANCELED and world.store.get(a.pid).result is None
    assert world.runtime.batches == [world.fps([b])]


def test_expired_record_is_skipped(world):
    a, b = world.add(), world.add()
    world.store.r.delete(keys.prediction(a.pid))
    world.clf.run([a, b])
    assert world.store.get(a.pid) is None and world.status(b) == SUCCEEDED


def _in_flight_when_a_worker_died(store, item, runs: int, alone_runs: int = 0) -> None:
    """What a delivery leaves behind when its process dies with ``item`` in the forward pass."""
    store.r.hset(keys.prediction(item.pid), mapping={"status": RUNNING, "attempts": runs, "runs": runs,
                                                     "alone_runs": alone_runs})


def test_past_max_deliveries_fails_worker_crashed(store, settings, images):
    w = World(store, settings.replace(max_deliveries=3), images)
    crashed, last_chance, never_alone = w.add(), w.add(), w.add()
    _in_flight_when_a_worker_died(store, crashed, runs=3, alone_runs=2)  # died 3 times, twice alone
    _in_flight_when_a_worker_died(store, last_chance, runs=2, alone_runs=1)
    _in_flight_when_a_worker_died(store, never_alone, runs=5)  # only ever died in shared forward passes

    w.clf.run([crashed, last_chance, never_alone])

    rec = store.get(crashed.pid)
    assert rec.status == FAILED and rec.error["code"] == "worker_crashed" and rec.attempts == 4
    assert "3 times" in rec.error["message"]
    assert w.status(last_chance) == SUCCEEDED and store.get(last_chance.pid).runs == 3
    # Never blamed without having crashed alone: it runs (alone) instead of failing.
    assert w.status(never_alone) == SUCCEEDED
    assert w.runtime.batches == [w.fps([never_alone]), w.fps([last_chance])]  # known crashers last


def test_redelivered_items_run_in_forward_passes_of_their_own_after_the_fresh_ones(world):
    fresh = [world.add() for _ in range(3)]
    suspects = [world.add() for _ in range(2)]
    for s in suspects:  # a previous delivery ran it and its worker died
        _in_flight_when_a_worker_died(world.store, s, runs=1)
    items = [suspects[0], fresh[0], suspects[1], fresh[1], fresh[2]]

    out = world.clf.run(items)

    assert world.runtime.batches == [world.fps(fresh), world.fps([suspects[0]]), world.fps([suspects[1]])]
    assert out.batch_sizes == [3, 1, 1]
    assert {world.status(i) for i in items} == {SUCCEEDED}
    assert [world.store.get(s.pid).result["timings"]["batch_size"] for s in suspects] == [1, 1]
    assert [world.store.get(i.pid).alone_runs for i in suspects + fresh] == [1, 1, 0, 0, 0]


def test_a_claimed_image_that_never_ran_is_not_a_suspect(world):
    """Claimed by a delivery whose worker died before this image's forward pass: not charged."""
    item = world.add()
    world.store.transition(item.pid, RUNNING, (QUEUED,), {}, True)  # claimed, never in flight
    other = world.add()
    world.clf.run([item, other])
    assert world.runtime.batches == [world.fps([item, other])]
    rec = world.store.get(item.pid)
    assert rec.status == SUCCEEDED and rec.attempts == 2 and rec.runs == 1 and rec.alone_runs == 0


def test_a_poison_suspect_does_not_take_fresh_images_down(store, settings, images):
    w = World(store, settings, images)
    fresh = w.add()
    poison = w.add(data=corrupt_jpeg(images))
    _in_flight_when_a_worker_died(store, poison, runs=1)
    w.clf.run([poison, fresh])
    assert w.status(fresh) == SUCCEEDED
    assert store.get(poison.pid).error["code"] == "corrupt_image"


class ProcessDied(BaseException):
    """Stands in for the SIGKILL of a worker process: nothing after it runs, Redis keeps its state."""


def _deliver_until_done(w, items, poison, flush_size, order_seed, max_rounds=60):
    """Deliver every unfinished image again and again, as the broker does after each crash.

    Each round shuffles the unfinished images (seeded) into flushes of ``flush_size``; a flush whose
    process "dies" loses the rest of its work, which is what the next round delivers again.
    """
    import random

    rng = random.Random(order_seed)
    for rounds in range(1, max_rounds + 1):
        left = [i for i in items if w.status(i) not in (SUCCEEDED, FAILED)]
        if not left:
            return rounds - 1
        rng.shuffle(left)
        for start in range(0, len(left), flush_size):
            try:
                w.clf.run(left[start:start + flush_size], may_defer=False)
            except ProcessDied:
                pass
    raise AssertionError(f"not done after {max_rounds} rounds of deliveries")


@pytest.mark.parametrize("max_deliveries", [1, 2, 3])
@pytest.mark.parametrize("max_batch,flush_size", [(1, 1), (4, 4), (16, 16), (4, 16)])
@pytest.mark.parametrize("where", ["decode", "forward"])
@pytest.mark.parametrize("order_seed", range(4))
def test_healthy_images_sharing_batches_with_poison_always_succeed(store, settings, images, monkeypatch,
                                                                   max_deliveries, max_batch, flush_size, where,
                                                                   order_seed):
    """The rule, for any order, batch size and PINFER_MAX_DELIVERIES: a crash is charged only to the
    images in the forward pass that died; a poison image ends ``worker_crashed`` after being in
    flight PINFER_MAX_DELIVERIES times (at least once alone); every healthy image succeeds."""
    import worker.classify as classify

    w = World(store, settings.replace(max_deliveries=max_deliveries, max_batch=max_batch), images)
    items = [w.add() for _ in range(24)]
    poison = {items[0].pid, items[11].pid, items[23].pid}  # first, middle, last of the submissions
    poison_fps = {w.fp[p] for p in poison}
    poison_bytes = {d for d in store.images(list(poison))}

    if where == "decode":
        real = classify.preprocess

        def preprocess(data, s):
            if data in poison_bytes:
                raise ProcessDied()
            return real(data, s)

        monkeypatch.setattr(classify, "preprocess", preprocess)
    else:
        real_forward = w.runtime.forward

        def forward(batch):
            out = real_forward(batch)
            if poison_fps & set(w.runtime.batches[-1]):
                raise ProcessDied()
            return out

        monkeypatch.setattr(w.runtime, "forward", forward)

    rounds = _deliver_until_done(w, items, poison, flush_size, order_seed)

    for item in items:
        rec = store.get(item.pid)
        if item.pid in poison:
            assert rec.status == FAILED and rec.error["code"] == "worker_crashed", rec
            assert rec.runs == max(max_deliveries, 2 if max_batch > 1 else 1) and rec.alone_runs >= 1
        else:
            assert rec.status == SUCCEEDED, (rec.status, rec.error, rec.runs)
            assert rec.alone_runs <= 1 and rec.runs <= 2  # at most one shared pass that died, then alone
    # Every round that leaves work behind is a crash charged to a poison image: no loop beyond that.
    assert rounds <= sum(store.get(p).runs for p in poison) + 1


def test_interactive_items_are_classified_before_bulk(world):
    b1, i1, b2, i2 = world.add(BULK), world.add(INTERACTIVE), world.add(BULK), world.add(INTERACTIVE)
    out = world.clf.run([b1, i1, b2, i2])
    assert world.runtime.batches == [world.fps([i1, i2]), world.fps([b1, b2])]
    assert out.done == [i1, i2, b1, b2]
    assert world.store.get(i1.pid).finished_at <= world.store.get(b1.pid).finished_at


def test_bulk_is_handed_back_when_interactive_work_waits(store, settings, images):
    asked = []

    def waiting() -> bool:
        asked.append(len(w.runtime.batches))
        return True

    w = World(store, settings.replace(bulk_chunk=2), images, waiting=waiting)
    bulk = [w.add(BULK) for _ in range(5)]

    first = [w.add(INTERACTIVE)]
    out = w.clf.run(first + bulk)

    # The interactive image first; then, as more interactive work waits, no bulk chunk at all.
    assert w.runtime.batches == [w.fps(first)]
    assert asked == [1]  # looked before the first bulk chunk
    assert out.done == first and out.deferred == bulk
    for item in bulk:  # untouched: still queued, bytes kept, claimable later
        rec = store.get(item.pid)
        assert rec.status == QUEUED and rec.attempts == 0 and rec.error is None
    assert None not in store.images([i.pid for i in bulk])

    # handed back, they are classified by a later batch
    out2 = w.clf.run(out.deferred, may_defer=False)
    assert out2.deferred == [] and {w.status(i) for i in first + bulk} == {SUCCEEDED}
    assert all(store.get(i.pid).attempts == 1 for i in bulk)


def test_bulk_runs_in_chunks_when_nothing_interactive_waits(store, settings, images):
    w = World(store, settings.replace(bulk_chunk=2), images, waiting=lambda: False)
    bulk = [w.add(BULK) for _ in range(5)]
    out = w.clf.run(bulk)
    assert w.runtime.sizes == [2, 2, 1] and out.deferred == []


def test_bulk_runs_in_full_batches_when_no_interactive_traffic_is_recent(store, settings, images):
    asked = []
    w = World(store, settings.replace(bulk_chunk=2, max_batch=4), images,
              waiting=lambda: asked.append(1) or False, recent=lambda: False)
    bulk = [w.add(BULK) for _ in range(9)]
    out = w.clf.run(bulk)
    assert w.runtime.sizes == [4, 4, 1] and out.deferred == []


def test_interactive_submissions_switch_bulk_to_small_chunks(client, store, settings, images):
    """The API marks recent interactive traffic; the worker's own check reads that mark."""
    w = World(store, settings.replace(bulk_chunk=2, max_batch=16), images, waiting=lambda: False, recent=None)
    w.clf.run([w.add(BULK) for _ in range(5)])
    assert w.runtime.sizes == [5]
    assert client.post("/v1/predictions", data=images.jpeg(), content_type="image/jpeg").status_code == 202
    w.clf.run([w.add(BULK) for _ in range(5)])
    assert w.runtime.sizes == [5, 2, 2, 1]


def test_default_waiting_check_looks_at_the_interactive_queue(store, settings, images):
    w = World(store, settings.replace(bulk_chunk=1), images, recent=None)  # the Classifier's own checks
    store.r.set(keys.INTERACTIVE_RECENT, "1")
    bulk = [w.add(BULK) for _ in range(3)]
    assert w.clf.run(bulk[:2]).deferred == []
    store.r.lpush(keys.QUEUE_INTERACTIVE, "{}")  # an interactive message waits in the queue
    rest = bulk[2:] + [w.add(BULK)]
    out = w.clf.run(rest)
    assert out.deferred == rest and out.done == []
    store.r.delete(keys.QUEUE_INTERACTIVE)  # fetched (by this worker or another)
    assert w.clf.run(out.deferred).deferred == []
    assert {w.status(i) for i in bulk} == {SUCCEEDED}


# --- the real runtime over the fixture artifacts -----------------------------------------------------
@pytest.fixture(scope="module")
def artifacts(tmp_path_factory):
    dirs = {}
    for kind in ("tiny", "raises"):
        d = tmp_path_factory.mktemp(f"model-{kind}")
        make_fixture_model(kind, d)
        dirs[kind] = str(d)
    return dirs


@pytest.fixture
def keep_torch_threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def test_real_tiny_model_classifies_good_images_and_fails_the_corrupt_one(store, settings, images, artifacts,
                                                                          keep_torch_threads):
    s = settings.replace(model_dir=artifacts["tiny"], max_batch=4)
    runtime = ModelRuntime(s, threads=1)
    w = World(store, s, images, runtime=runtime)
    good = [w.add(top_k=5) for _ in range(3)]
    bad = w.add(data=b"\xff\xd8\xff\xe0 not really a jpeg")
    out = w.clf.run(good + [bad])

    assert out.batch_sizes == [3]
    assert store.get(bad.pid).error["code"] == "corrupt_image"
    for item in good:
        rec = store.get(item.pid)
        assert rec.status == SUCCEEDED
        top = rec.result["top_k"]
        assert len(top) == 5 and all(t["label"] == LABELS[t["class_index"]] for t in top)
        assert [t["score"] for t in top] == sorted((t["score"] for t in top), reverse=True)
        assert 0 < sum(t["score"] for t in top) <= 1.0 + 1e-6
        assert rec.result["model"] == {"name": "fixture-tiny", "sha256": runtime.info.sha256,
                                       "pretrained": False, "precision": "fp32", "runtime": "torchscript"}
        assert rec.result["timings"]["batch_size"] == 3


def test_real_raises_model_fails_every_item_with_inference_error(store, settings, images, artifacts,
                                                                 keep_torch_threads, monkeypatch):
    s = settings.replace(model_dir=artifacts["raises"])
    with pytest.raises(InferenceError):  # a worker refuses to start with it (warm-up fails) ...
        ModelRuntime(s, threads=1)
    monkeypatch.setattr(ModelRuntime, "warm_up", lambda self: 0.0)
    runtime = ModelRuntime(s, threads=1)  # ... and if it ran anyway, no image would be left running
    w = World(store, s, images, runtime=runtime)
    items = [w.add() for _ in range(3)]
    w.clf.run(items)
    for item in items:
        rec = store.get(item.pid)
        assert rec.status == FAILED and rec.error["code"] == "inference_error"
    assert store.r.zcard(keys.PENDING) == 0
