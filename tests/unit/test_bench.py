"""`make bench`'s moving parts, without running a benchmark: the registry and the variant matrix,
the JSON -> targets/README generator, and the seed-design baseline app (with a tiny fixture model).
"""
from __future__ import annotations

import copy
import io
import json

import pytest
from PIL import Image

from bench import report
from bench.benchmarks import BENCHMARKS
from bench.cli import main as bench_main
from bench.variants import REFERENCE, VARIANTS, Variant, select

# --------------------------------------------------------------------------------------- registry


def test_every_registered_benchmark_is_a_module_with_a_name_a_doc_and_a_run() -> None:
    assert list(BENCHMARKS)[0] == "inprocess"  # the others read its figures
    for name, mod in BENCHMARKS.items():
        assert mod.NAME == name
        assert (mod.__doc__ or "").strip(), name
        assert callable(mod.run), name


def test_bench_list_names_every_benchmark_and_variant(capsys: pytest.CaptureFixture) -> None:
    assert bench_main(["--list"]) == 0
    out = capsys.readouterr().out
    for name in BENCHMARKS:
        assert name in out
    for v in VARIANTS:
        assert v.name in out


def test_an_unknown_benchmark_is_refused() -> None:
    with pytest.raises(SystemExit):
        bench_main(["nosuch"])


def test_variants_are_selected_by_glob_in_matrix_order() -> None:
    assert [v.name for v in select(["*-int8-fast"], quick=False)] == ["torchscript-int8-fast", "onnx-int8-fast"]
    assert select(None, quick=False) == VARIANTS
    assert select(None, quick=True)[0] == REFERENCE
    with pytest.raises(ValueError):
        select(["tensorrt-*"], quick=False)


def test_a_variant_the_settings_refuse_is_reported_with_the_reason() -> None:
    assert REFERENCE.unsupported() is None
    why = Variant("torchscript", "fp64", "exact").unsupported()
    assert why and "PINFER_PRECISION" in why


# --------------------------------------------------------------------------------------- report
def _variant(figs: dict, status: str = "ok") -> dict:
    return {"status": status, "reason": None, "figures": figs, "units": {}, "notes": []}


SAMPLE = {
    "schema": 1,
    "meta": {"started": "2026-01-01T00:00:00+0000", "git": "abc1234", "cpu": "Test CPU", "cores": [0, 1],
             "server_cores": [0], "client_cores": [1], "corpus": "141 photos", "corpus_synthetic": False,
             "model": "random-init", "quick": False, "fastest_variant": "torchscript-int8-fast"},
    "variants": [{"name": "torchscript-fp32-exact"}, {"name": "torchscript-int8-fast"}, {"name": "onnx-int8-fast"}],
    "benchmarks": {
        "inprocess": {"status": "ok", "figures": {}, "variants": {
            "torchscript-fp32-exact": _variant({"images_per_s": 36.0}),
            "torchscript-int8-fast": _variant({"images_per_s": 100.0}),
            "onnx-int8-fast": {"status": "skipped", "reason": "no onnxruntime", "figures": {}}}},
        "e2e": {"status": "ok", "figures": {}, "variants": {
            "torchscript-fp32-exact": _variant({"images_per_s": 34.0, "ratio_to_inprocess": 0.944,
                                                "idle_p50": 40.0, "idle_p95": 45.0}),
            "torchscript-int8-fast": _variant({"images_per_s": 80.0, "ratio_to_inprocess": 0.8,
                                               "idle_p50": 15.0, "idle_p95": 18.0})}},
        "baseline": {"status": "ok", "figures": {"fastest_variant": "torchscript-int8-fast"}, "variants": {
            "torchscript-fp32-exact": _variant({"images_per_s": 28.0, "idle_p50": 27.0, "idle_p95": 30.0}),
            "torchscript-int8-fast": _variant({"images_per_s": 50.0, "idle_p50": 9.0, "idle_p95": 11.0})}},
        "bulk": {"status": "ok", "figures": {"ratio_2w_1w": 1.9, "variant": "torchscript-int8-fast"}},
    },
}


def test_targets_pass_miss_and_not_measured_follow_the_figures() -> None:
    t = {x["what"]: x for x in report.check_targets(SAMPLE)}
    rows = list(t.values())
    assert rows[0]["value"] == 80.0 and rows[0]["pass"] is True             # >= 75 img/s
    assert rows[1]["value"] == 0.8 and rows[1]["pass"] is False             # share >= 0.90
    assert rows[2]["value"] == 0.944 and rows[2]["pass"] is False           # fp32 share >= 0.95
    assert rows[3]["value"] == 15.0 and rows[3]["pass"] is True             # idle p50 <= 20 ms
    assert rows[4]["value"] == pytest.approx(1.6) and rows[4]["pass"] is True   # 80 / 50 >= 1.3
    assert rows[5]["value"] == pytest.approx(80 / 28, abs=1e-3) and rows[5]["pass"] is True
    assert rows[6]["pass"] is True                                          # bulk 1.9 >= 1.85
    assert rows[7]["value"] is None and rows[7]["pass"] is None             # priority did not run
    slower = copy.deepcopy(SAMPLE)
    slower["benchmarks"]["e2e"]["variants"]["torchscript-int8-fast"]["figures"]["images_per_s"] = 60.0
    assert report.check_targets(slower)[0]["pass"] is False


def test_the_readme_block_is_generated_from_the_json(tmp_path) -> None:
    block = report.render_block(SAMPLE)
    assert block.startswith(report.BEGIN) and block.endswith(report.END)
    assert "| 1 worker, fastest settings, corpus, 16 clients | ≥ 75 img/s | 80.0 | pass |" in block
    assert "| the same, as a share of its in-process limit | ≥ 0.9 | 0.80 | **miss** |" in block
    assert "not measured" in block
    assert "`onnx-int8-fast` | skipped: no onnxruntime" in block
    assert "| `torchscript-int8-fast` | 100.0 | 80.0 | 0.80 | 15.0 / 18.0 | 50.0 | 9.00 / 11.0 |" in block
    readme = tmp_path / "README.md"
    readme.write_text(f"# x\n\nbefore\n\n{report.render_block(None)}\n\nafter\n")
    assert report.update_readme(SAMPLE, readme) is True
    text = readme.read_text()
    assert block in text and "before" in text and "after" in text
    assert report.update_readme(SAMPLE, readme) is False  # idempotent


def test_the_readme_benchmark_block_matches_the_committed_results() -> None:
    """Regenerate with `python -m bench.report` after a `make bench` (or when this fails)."""
    assert report.render_block(report.load()) in report.README.read_text()


# --------------------------------------------------------------------------------------- baseline
@pytest.fixture()
def baseline_client(tmp_path):
    from bench.baselines.flask_sync import create_app
    from shared.settings import Settings
    from tests.fixtures.models import make_fixture_model

    make_fixture_model("tiny", tmp_path / "model")
    app = create_app(Settings(model_dir=str(tmp_path / "model")))
    return app.test_client()


def _jpeg() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (320, 240), (200, 80, 40)).save(buf, "JPEG")
    return buf.getvalue()


def test_the_baseline_classifies_synchronously_with_the_worker_runtime(baseline_client) -> None:
    r = baseline_client.post("/v1/predictions", data={"image": (io.BytesIO(_jpeg()), "x.jpg")})
    assert r.status_code == 200
    body = r.get_json()
    assert body["status"] == "succeeded"
    assert len(body["top_k"]) == 5
    scores = [t["score"] for t in body["top_k"]]
    assert scores == sorted(scores, reverse=True)
    assert body["model"]["precision"] == "fp32"
    assert body["model"]["name"] == "fixture-tiny"


def test_the_baseline_answers_a_bad_image_with_a_failed_record(baseline_client) -> None:
    r = baseline_client.post("/v1/predictions", data={"image": (io.BytesIO(b"not an image"), "x.jpg")})
    assert r.status_code == 200
    body = r.get_json()
    assert body["status"] == "failed" and body["error"]["code"]
    assert baseline_client.post("/v1/predictions", data={}).status_code == 400


def test_results_json_round_trips(tmp_path) -> None:
    p = tmp_path / "r.json"
    p.write_text(json.dumps(SAMPLE))
    assert report.load(p) == SAMPLE
    assert report.load(tmp_path / "missing.json") is None


# --------------------------------------------------------------------------------------- soak
def test_make_soak_imports_and_accepts_the_options_its_readme_documents() -> None:
    """`make soak` is not in CI: this catches it importing names a refactor removed, and its
    documented usage line drifting from its parser."""
    import re

    from bench import soak
    from shared.settings import PROJECT_ROOT

    readme = (PROJECT_ROOT / "bench" / "README.md").read_text()
    usage = re.search(r"`python -m bench\.soak ([^`]*)`", readme)
    assert usage, "bench/README.md lost the `python -m bench.soak [...]` usage line"
    documented = dict(re.findall(r"\[(--[\w-]+) ([^\]]+)\]", usage.group(1)))
    assert set(documented) == {"--minutes", "--load", "--kill-every", "--warmup"}
    args = soak.parser().parse_args([tok for kv in documented.items() for tok in kv])
    assert (args.minutes, args.load, args.kill_every, args.warmup) == (10.0, 0.7, 120.0, 180.0)
    assert soak.parser().parse_args([]) == args  # the documented values are the defaults
    with pytest.raises(SystemExit):
        soak.parser().parse_args(["--nosuch", "1"])
