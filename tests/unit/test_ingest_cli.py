"""``pinfer ingest`` (pinfer_client.ingest) against the in-memory fake API: output, backpressure, resume."""
from __future__ import annotations

import _thread
import csv
import json
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from PIL import Image

from pinfer_client.ingest import ResultsFile, UsageError, ingest, main, scan_paths, state_path_for
from pinfer_client.sdk import wire_name
from tests.fixtures.fake_api import FakeApi, fake_top_k

ROOT = Path(__file__).resolve().parents[2]
N_IMAGES = 200
FAST = ["--no-progress", "--poll-interval", "0.01", "--retries", "2"]


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> tuple[Path, dict[str, bytes]]:
    """A folder tree of tiny images plus non-images; returns (root, {expected name: bytes})."""
    root = tmp_path_factory.mktemp("photos")
    expected: dict[str, bytes] = {}

    def put(rel: str, data: bytes) -> None:
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        expected[wire_name(rel)] = data

    for i in range(N_IMAGES):
        img = Image.new("RGB", (4, 4), (i % 256, (i * 7) % 256, 40))
        fmt, ext = [("PNG", "png"), ("JPEG", "jpg"), ("PNG", "PNG"), ("JPEG", "jpeg")][i % 4]
        path = root / f"set{i % 3}" / ("deep/er" if i % 5 == 0 else "") / f"img{i:03d}.{ext}"
        path.parent.mkdir(parents=True, exist_ok=True)
        img.save(path, format=fmt)
        expected[path.relative_to(root).as_posix()] = path.read_bytes()
    put("broken1.jpg", b"BROKEN jpeg")
    put("set1/broken2.png", b"BROKEN png")
    put("set2/not-really.png", b"just some text")           # rejected by content: unsupported_format
    put("café/ü ñ.png", b"\x89PNG\r\n\x1a\n" + b"unicode")     # non-ASCII and a space
    put("odd\\name.png", b"\x89PNG\r\n\x1a\n" + b"backslash")  # sent as odd%5Cname.png
    for rel in ("notes.txt", "set0/readme.md", "set1/deep/.DS_Store"):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text("not an image")
    return root, expected


@pytest.fixture
def fake():
    with FakeApi() as api:
        yield api


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def check_complete(out: Path, expected: dict[str, bytes], k: int = 5) -> list[dict]:
    """Exactly one line per image, each the right result for that image's bytes."""
    rows = read_jsonl(out)
    names = [r["name"] for r in rows]
    assert len(names) == len(set(names)), "duplicate lines"
    assert set(names) == set(expected)
    for r in rows:
        data = expected[r["name"]]
        if data.startswith(b"BROKEN"):
            assert r["status"] == "failed" and r["error"]["code"] == "corrupt_image"
        elif r["name"] == "set2/not-really.png":
            assert r["status"] == "failed" and r["error"]["code"] == "unsupported_format"
        else:
            assert r["status"] == "succeeded" and r["top_k"] == fake_top_k(data, k), r["name"]
        assert set(r) == {"name", "id", "status", "top_k" if r["status"] == "succeeded" else "error"}
    return rows


def wait_until(predicate, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.005)


def run(fake: FakeApi, root: Path, out: Path, *extra: str) -> int:
    return main([str(root), "--api", fake.url, "--out", str(out), *FAST, *extra])


# --- a plain run -------------------------------------------------------------------------------
def test_full_run_one_line_per_image(fake, tree, tmp_path, capsys):
    root, expected = tree
    out = tmp_path / "results.jsonl"
    assert run(fake, root, out, "--chunk", "16", "--concurrency", "4") == 0
    check_complete(out, expected)
    sent = fake.sent_names()
    assert sorted(sent) == sorted(expected)  # each image uploaded exactly once
    printed = capsys.readouterr().out
    assert f"{len(expected)} images" in printed
    assert "skipped    3 non-image files" in printed
    assert "failed     3  (corrupt_image 2, unsupported_format 1)" in printed
    assert f"succeeded  {len(expected) - 3}" in printed
    state = json.loads(state_path_for(out).read_text())
    assert state["api"] == fake.url and state["job_id"] in fake.jobs and state["cursor"] == len(expected)
    assert state["version"] == 1 and state["format"] == "jsonl"
    assert fake.jobs[state["job_id"]].status == "finished" and fake.jobs[state["job_id"]].name == root.name


def test_programmatic_summary(fake, tree, tmp_path):
    root, expected = tree
    summary = ingest([root], fake.url, tmp_path / "r.jsonl", top_k=3, progress=False, poll_interval=0.01,
                     name="my-job")
    assert summary.exit_code == 0
    assert (summary.total, summary.skipped, summary.missing) == (len(expected), 3, 0)
    assert summary.succeeded == len(expected) - 3
    assert summary.failed == {"corrupt_image": 2, "unsupported_format": 1}
    assert summary.new_results == len(expected) and summary.uploaded == len(expected)
    assert summary.rate > 0 and fake.jobs[summary.job_id].name == "my-job"
    check_complete(tmp_path / "r.jsonl", expected, k=3)


def test_rerun_when_complete_makes_no_requests(fake, tree, tmp_path):
    root, expected = tree
    out = tmp_path / "r.jsonl"
    assert run(fake, root, out) == 0
    before = len(fake.requests)
    assert run(fake, root, out) == 0
    assert len(fake.requests) == before
    check_complete(out, expected)


# --- backpressure ------------------------------------------------------------------------------
def test_backpressure_resends_only_what_did_not_get_in(fake, tree, tmp_path):
    root, expected = tree
    fake.admit_per_request = 5
    fake.overload_next_uploads(3, retry_after=0.01)
    out = tmp_path / "r.jsonl"
    assert run(fake, root, out, "--chunk", "12") == 0
    check_complete(out, expected)
    assert any(u["status"] == 429 for u in fake.uploads)
    assert fake.duplicate_names() == []  # nothing that got in was sent again
    got_in = fake.accepted_names() + [n for u in fake.uploads for n in u["rejected"]]
    assert sorted(got_in) == sorted(expected)


# --- resuming ----------------------------------------------------------------------------------
def test_resume_after_stop_uploads_only_what_has_no_line(fake, tree, tmp_path):
    root, expected = tree
    out = tmp_path / "r.jsonl"
    stop = threading.Event()
    uploads = []

    def hook(res):
        uploads.append(res)
        if len(uploads) == 3:
            wait_until(lambda: out.exists() and len(out.read_text().splitlines()) >= 10)
            fake.pause()  # what is uploaded from now on stays without a result
        if len(uploads) == 5:
            stop.set()

    first = ingest([root], fake.url, out, progress=False, poll_interval=0.01, chunk=10, concurrency=1,
                   stop=stop, on_upload=hook)
    assert first.interrupted and first.exit_code == 130 and first.missing > 0
    job_id = json.loads(state_path_for(out).read_text())["job_id"]
    done_after_first = {r["name"] for r in read_jsonl(out)}
    in_job_after_first = set(fake.jobs[job_id].items)
    queued_after_first = {n for n, item in fake.jobs[job_id].items.items() if item.status == "queued"}
    assert len(done_after_first) >= 10 and queued_after_first
    sent_before = len(fake.sent_names())

    # still paused: the images queued by the first run get no result until the job is closed,
    # so the second run must send them again, and they must come back as duplicates
    def resume_when_closed():
        wait_until(lambda: fake.jobs[job_id].status == "closed", timeout=10)
        fake.resume()

    resumer = threading.Thread(target=resume_when_closed)
    resumer.start()
    second = ingest([root], fake.url, out, progress=False, poll_interval=0.01, chunk=10)
    resumer.join()
    assert second.exit_code == 0 and second.already_done == len(done_after_first)
    check_complete(out, expected)
    resent = fake.sent_names()[sent_before:]
    assert not set(resent) & done_after_first          # never re-upload an image that has a line
    assert json.loads(state_path_for(out).read_text())["job_id"] == job_id  # same job reused
    dups = set(fake.duplicate_names())
    assert queued_after_first <= dups <= in_job_after_first - done_after_first
    assert dups == set(resent) & in_job_after_first    # what the job had was not stored twice
    assert len(fake.jobs[job_id].items) == len(expected)


def test_ctrl_c_exits_130_then_rerun_finishes(fake, tree, tmp_path, capsys, monkeypatch):
    root, expected = tree
    out = tmp_path / "r.jsonl"
    fake.pause()  # no result can arrive, so the run is still going when the interrupt lands
    fired = []

    def hook(res):
        if not fired:
            fired.append(True)
            _thread.interrupt_main()

    import pinfer_client.ingest.cli as ingest_module

    original = ingest_module.ingest
    monkeypatch.setattr(ingest_module, "ingest", lambda *a, **kw: original(*a, on_upload=hook, **kw))
    code = run(fake, root, out)
    monkeypatch.undo()
    assert code == 130
    err = capsys.readouterr().err
    assert "Re-run the same command to resume" in err
    state = json.loads(state_path_for(out).read_text())
    assert state["job_id"] in fake.jobs and fake.jobs[state["job_id"]].status == "open"
    # paused: only images rejected at upload (failed at once, by contract) can have a line yet
    assert all(r["error"]["code"] == "unsupported_format" for r in read_jsonl(out))

    fake.resume()
    assert run(fake, root, out) == 0
    check_complete(out, expected)
    assert json.loads(state_path_for(out).read_text())["job_id"] == state["job_id"]


def test_sigterm_stops_cleanly_with_state_saved_then_rerun_finishes(fake, tree, tmp_path):
    """SIGTERM (a container stop, a killed terminal) winds the run down like Ctrl-C: exit 143, the
    output flushed, the state saved; the same command then finishes the same job."""
    root, expected = tree
    out = tmp_path / "r.jsonl"
    fake.pause()  # no result arrives, so the run is still going when the signal lands
    proc = subprocess.Popen([sys.executable, "-m", "pinfer_client.ingest", str(root), "--api", fake.url,
                             "--out", str(out), *FAST], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    try:
        wait_until(lambda: state_path_for(out).exists() and fake.sent_names() or proc.poll() is not None, timeout=60)
        proc.send_signal(signal.SIGTERM)
        stdout, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 143, err
    assert "Re-run the same command to resume" in err and "Traceback" not in err
    assert f"{len(expected)} images" in stdout  # the summary is still printed
    state = json.loads(state_path_for(out).read_text())
    assert fake.jobs[state["job_id"]].status == "open"

    fake.resume()
    assert run(fake, root, out) == 0
    check_complete(out, expected)
    assert json.loads(state_path_for(out).read_text())["job_id"] == state["job_id"]


def test_truncated_last_line_is_repaired_without_uploading(fake, tree, tmp_path):
    root, expected = tree
    out = tmp_path / "r.jsonl"
    assert run(fake, root, out) == 0
    lines = out.read_text(encoding="utf-8").splitlines(keepends=True)
    torn_name = json.loads(lines[-1])["name"]
    with out.open("r+b") as fh:  # a crash in the middle of writing the last line
        fh.truncate(out.stat().st_size - 20)
    uploads = len(fake.uploads)
    assert run(fake, root, out) == 0
    rows = check_complete(out, expected)
    assert torn_name in {r["name"] for r in rows}
    assert len(fake.uploads) == uploads  # recovered from the job's results, not uploaded again


def test_results_file_keeps_a_whole_line_that_lost_its_newline(tmp_path):
    out = tmp_path / "r.jsonl"
    out.write_text('{"name": "a.png", "id": "x", "status": "succeeded", "top_k": []}\n'
                   '{"name": "b.png", "id": "y", "status": "failed", "error": {"code": "corrupt_image"}}')
    rf = ResultsFile(out, use_csv=False)
    rf.open()
    rf.close()
    assert set(rf.status) == {"a.png", "b.png"} and not rf.repaired
    assert out.read_text().endswith("}\n") and len(read_jsonl(out)) == 2


def test_foreign_output_file_is_refused(fake, tree, tmp_path, capsys):
    root, _ = tree
    out = tmp_path / "r.jsonl"
    out.write_text("this is\nnot ours\n")
    assert run(fake, root, out) == 2
    assert "not a line pinfer ingest wrote" in capsys.readouterr().err
    assert out.read_text() == "this is\nnot ours\n"


def test_job_gone_starts_a_new_job(fake, tree, tmp_path):
    root, expected = tree
    out = tmp_path / "r.jsonl"
    stop = threading.Event()
    first = ingest([root], fake.url, out, progress=False, poll_interval=0.01, stop=stop,
                   on_upload=lambda res: stop.set())
    assert first.interrupted
    old = json.loads(state_path_for(out).read_text())["job_id"]
    fake.forget_job(old)
    assert run(fake, root, out) == 0
    check_complete(out, expected)
    assert json.loads(state_path_for(out).read_text())["job_id"] != old


def test_job_canceled_by_someone_else_exits_1_then_resumes_in_new_job(fake, tree, tmp_path, capsys):
    root, expected = tree
    out = tmp_path / "r.jsonl"
    seen = []

    def hook(res):
        seen.append(res)
        if len(seen) == 1:
            fake.pause()  # the second chunk stays queued, so the cancel catches it
        if len(seen) == 2:
            fake.cancel_job(json.loads(state_path_for(out).read_text())["job_id"])

    summary = ingest([root], fake.url, out, progress=False, poll_interval=0.01, concurrency=1, on_upload=hook)
    assert summary.exit_code == 1 and "canceled" in (summary.error or "")
    rows = read_jsonl(out)
    assert all(r["status"] != "canceled" for r in rows)  # a canceled image has no result yet
    old = json.loads(state_path_for(out).read_text())["job_id"]

    fake.resume()
    assert run(fake, root, out) == 0
    check_complete(out, expected)
    assert json.loads(state_path_for(out).read_text())["job_id"] != old


def test_api_lost_mid_run_exits_1_then_resumes(fake, tree, tmp_path, capsys):
    root, expected = tree
    out = tmp_path / "r.jsonl"
    seen = []

    def hook(res):
        seen.append(res)
        if len(seen) == 2:
            fake.pause()
            fake.stop()

    summary = ingest([root], fake.url, out, progress=False, poll_interval=0.01, concurrency=1, retries=1,
                     on_upload=hook)
    assert summary.exit_code == 1 and summary.error and not summary.interrupted
    fake.start()
    fake.resume()
    assert run(fake, root, out) == 0
    check_complete(out, expected)


def test_unreachable_api_exits_1(tree, tmp_path, capsys):
    root, _ = tree
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again at the end of the block: nothing listens there
    started = time.monotonic()
    code = main([str(root), "--api", f"http://127.0.0.1:{port}", "--out", str(tmp_path / "r.jsonl"),
                 "--no-progress", "--retries", "1"])
    assert code == 1 and time.monotonic() - started < 5
    assert "could not finish" in capsys.readouterr().err


def test_local_failures_are_results(fake, tmp_path):
    """A file that cannot be read, or whose name the API would refuse, gets a failed line of its own."""
    root = tmp_path / "p"
    (root / "ok").mkdir(parents=True)
    (root / "ok" / "a.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"a")
    (root / "gone.jpg").symlink_to(root / "nowhere.jpg")  # dangling: listed, but unreadable
    deep = root.joinpath(*["d" * 250] * 5)
    deep.mkdir(parents=True)
    (deep / "long.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"long")
    out = tmp_path / "r.jsonl"
    summary = ingest([root], fake.url, out, progress=False, poll_interval=0.01)
    assert summary.exit_code == 0
    assert summary.failed == {"unreadable_file": 1, "name_too_long": 1} and summary.succeeded == 1
    rows = {r["name"]: r for r in read_jsonl(out)}
    assert rows["gone.jpg"]["error"]["code"] == "unreadable_file" and rows["gone.jpg"]["id"] is None
    assert fake.sent_names() == ["ok/a.png"]


# --- CSV ---------------------------------------------------------------------------------------
def test_csv_output_and_resume(fake, tree, tmp_path):
    root, expected = tree
    out = tmp_path / "r.csv"
    assert run(fake, root, out, "--csv", "--top-k", "3") == 0
    with out.open(newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    assert list(rows[0]) == ["name", "id", "status", "label1", "score1", "class_index1", "top_k",
                             "error_code", "error_message"]
    assert sorted(r["name"] for r in rows) == sorted(expected)
    by_name = {r["name"]: r for r in rows}
    assert by_name["broken1.jpg"]["status"] == "failed" and by_name["broken1.jpg"]["error_code"] == "corrupt_image"
    ok = by_name["set2/img002.PNG"]
    want = fake_top_k(expected["set2/img002.PNG"], 3)
    assert ok["label1"] == want[0]["label"] and float(ok["score1"]) == want[0]["score"]
    assert int(ok["class_index1"]) == want[0]["class_index"]
    assert json.loads(ok["top_k"]) == [[t["label"], t["score"], t["class_index"]] for t in want]
    assert ok["error_code"] == "" and ok["error_message"] == ""

    with out.open("r+b") as fh:  # torn last row
        fh.truncate(out.stat().st_size - 5)
    assert run(fake, root, out, "--csv", "--top-k", "3") == 0
    with out.open(newline="", encoding="utf-8") as fh:
        names = [r["name"] for r in csv.DictReader(fh)]
    assert sorted(names) == sorted(expected)


# --- finding files -----------------------------------------------------------------------------
def test_scan_names_and_skips(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    for p in (a / "x" / "1.JPG", a / "2.png", b / "3.tiff", b / "sub" / "4.webp", tmp_path / "single.gif"):
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(b"img")
    (a / "note.txt").write_text("x")
    images, skipped = scan_paths([a])
    assert [i.name for i in images] == ["2.png", "x/1.JPG"] and skipped == 1
    images, skipped = scan_paths([a, b, tmp_path / "single.gif", a])
    assert [i.name for i in images] == ["a/2.png", "a/x/1.JPG", "b/3.tiff", "b/sub/4.webp", "single.gif"]
    assert skipped == 1
    (tmp_path / "other" / "a").mkdir(parents=True)
    (tmp_path / "other" / "a" / "2.png").write_bytes(b"img")
    with pytest.raises(UsageError):
        scan_paths([a, tmp_path / "other" / "a"])
    with pytest.raises(UsageError):
        scan_paths([tmp_path / "missing"])


def test_bad_paths_exit_2(fake, tmp_path, capsys):
    assert main([str(tmp_path / "missing"), "--api", fake.url, "--out", str(tmp_path / "r.jsonl")]) == 2
    assert "no such file" in capsys.readouterr().err


def test_runs_as_python_dash_m():
    proc = subprocess.run([sys.executable, "-m", "pinfer_client.ingest", "--help"], cwd=ROOT, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0
    for flag in ("--api", "--out", "--csv", "--top-k", "--concurrency", "--chunk", "--name", "--no-progress"):
        assert flag in proc.stdout
