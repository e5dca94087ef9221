"""Runtimes and precisions: every variant loads and stays close to fp32, the manifest carries the fidelity
gate, ``PINFER_PRECISION=auto`` falls back with its reason, tampered artifacts are refused for every
runtime, and a worker serving ONNX Runtime never imports torch."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from shared.errors import ModelArtifactError
from shared.settings import Settings
from weights.manifest import Manifest, read_manifest, verify_variant
from worker.runtime import ModelRuntime, select_variant

pytestmark = pytest.mark.filterwarnings(r"ignore:`torch\.jit\.\w+` is deprecated:DeprecationWarning")

SERVED = [("fp32", "torchscript"), ("int8", "torchscript"), ("fp32", "onnx"), ("int8", "onnx")]
#: Documented tolerance (README "Precisions and runtimes"): per image, the relative error of the centred
#: logits, |d logits| / |logits|, against the TorchScript fp32 reference. Measured on ResNet-18: bf16
#: <= 0.005, int8 <= 0.07 (TorchScript) and <= 0.07 (ONNX Runtime); fp32 ONNX Runtime ~1e-7.
TOLERANCE = {"fp32": 1e-4, "bf16": 0.01, "int8": 0.1}


@pytest.fixture(scope="module")
def tiny_variants(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tests.fixtures.models import make_fixture_variants

    d = tmp_path_factory.mktemp("tiny-variants")
    make_fixture_variants(d)
    return d


def runtime(model_dir: Path, precision: str = "auto", rt: str = "auto", **kw) -> ModelRuntime:
    return ModelRuntime(Settings(model_dir=str(model_dir), precision=precision, runtime=rt, max_batch=4, **kw),
                        threads=1)


def centred_logits(probs: np.ndarray) -> np.ndarray:
    logits = np.log(np.maximum(probs, 1e-30))
    return logits - logits.mean(axis=1, keepdims=True)


def test_manifest_carries_every_variant_and_its_fidelity(tiny_variants: Path) -> None:
    manifest = json.loads((tiny_variants / "manifest.json").read_text())
    variants = {(v["precision"], v["runtime"]): v for v in manifest["variants"]}
    assert set(variants) == {("fp32", "torchscript"), ("bf16", "torchscript"), ("int8", "torchscript"),
                             ("fp32", "onnx"), ("int8", "onnx")}
    assert variants[("fp32", "torchscript")]["fidelity"] is None  # the reference
    assert variants[("fp32", "torchscript")]["artifact"] == manifest["artifact"]
    assert variants[("bf16", "torchscript")]["artifact"] == manifest["artifact"]  # fp32 file under autocast
    assert variants[("int8", "onnx")]["artifact"].endswith(".onnx")
    for key in [("bf16", "torchscript"), ("int8", "torchscript"), ("fp32", "onnx"), ("int8", "onnx")]:
        fid = variants[key]["fidelity"]
        assert set(fid) == {"top1_agreement", "top5_overlap", "max_abs_dprob", "images"}, key
        assert 0 <= fid["top1_agreement"] <= 1 and 0 <= fid["top5_overlap"] <= 1 and fid["max_abs_dprob"] >= 0
        assert fid["images"] == manifest["calibration"]["holdout_images"] == 24
    assert variants[("fp32", "onnx")]["fidelity"]["top1_agreement"] == 1.0
    # Every artifact named is on disk and verifies; nothing else is left in the folder.
    names = {v["artifact"] for v in manifest["variants"]}
    assert {p.name for p in tiny_variants.iterdir()} == names | {"manifest.json"}
    for v in read_manifest(tiny_variants).variant_list():
        verify_variant(tiny_variants, v)


@pytest.mark.parametrize("precision,rt", SERVED)
def test_each_variant_loads_and_serves_what_it_names(tiny_variants: Path, precision: str, rt: str) -> None:
    served = runtime(tiny_variants, precision, rt)
    variant = next(v for v in read_manifest(tiny_variants).variant_list()
                   if (v.precision, v.runtime) == (precision, rt))
    assert (served.precision, served.runtime) == (precision, rt)
    assert served.info.public() == {"name": "fixture-tiny", "sha256": variant.artifact_sha256, "pretrained": False,
                                    "precision": precision, "runtime": rt}
    assert f"forces {precision}/{rt}" in served.selection
    probs = served.forward(np.zeros((3, 3, 224, 224), np.float32))
    assert probs.shape == (3, 1000) and probs.dtype == np.float32
    assert np.allclose(probs.sum(axis=1), 1, atol=1e-4)


@pytest.mark.parametrize("precision,rt", SERVED[1:] + [("bf16", "torchscript")])
def test_reduced_precision_stays_within_tolerance_of_fp32_on_resnet18(resnet_variants: Path, precision: str,
                                                                      rt: str) -> None:
    from tests.fixtures.models import fixture_calibration
    from worker.runtimes import load_backend

    x = fixture_calibration(0, 8, seed=3).holdout  # fixed inputs, not the calibration images
    manifest = read_manifest(resnet_variants)
    ref = runtime(resnet_variants, "fp32", "torchscript").forward(x)
    if precision == "bf16":  # this CPU may lack native bf16 (the runtime would serve fp32): run it anyway
        backend = load_backend("torchscript", "bf16", verify_variant(resnet_variants, manifest.variant_list()[0]), 1)
        got = backend.probs(x)
    else:
        got = runtime(resnet_variants, precision, rt).forward(x)
    c_ref, c_got = centred_logits(ref), centred_logits(got)
    rel = np.linalg.norm(c_got - c_ref, axis=1) / np.linalg.norm(c_ref, axis=1)
    assert rel.max() <= TOLERANCE[precision], (precision, rt, rel)
    assert rel.max() > 0 or precision == "fp32"  # it really ran in another precision


def _manifest(**fidelity: float | None) -> Manifest:
    """A manifest naming variants with the given top-1 agreements (key like int8_onnx)."""
    variants = [{"runtime": "torchscript", "precision": "fp32", "artifact": "ref.pt", "artifact_sha256": "r"}]
    for key, agreement in fidelity.items():
        precision, rt = key.split("_")
        fid = None if agreement is None else {"top1_agreement": agreement, "top5_overlap": 1.0,
                                              "max_abs_dprob": 0.01, "images": 200}
        variants.append({"runtime": rt, "precision": precision, "artifact": f"{key}.x", "artifact_sha256": key,
                         "fidelity": fid})
    return Manifest(artifact="ref.pt", artifact_sha256="r", weights_source="fixture", pretrained=True,
                    variants=variants)


def test_auto_serves_the_fastest_variant_that_passes_the_gate() -> None:
    m = _manifest(int8_torchscript=0.999, int8_onnx=0.999, fp32_onnx=1.0)
    choice = select_variant(m, "auto", "auto", 0.995, bf16_ok=False)
    assert choice.variant.key == "int8/torchscript" and "chose" in choice.reason and "0.9990" in choice.reason
    assert select_variant(m, "auto", "onnx", 0.995, bf16_ok=False).variant.key == "int8/onnx"


def test_auto_falls_back_int8_then_bf16_then_fp32_and_says_why() -> None:
    m = _manifest(int8_torchscript=0.42, int8_onnx=None, bf16_torchscript=0.999)
    choice = select_variant(m, "auto", "auto", 0.995, bf16_ok=True)
    assert choice.variant.key == "bf16/torchscript"
    assert "fell back" in choice.reason and "int8/torchscript: top-1 agreement with fp32 0.4200 < " \
        "PINFER_MIN_AGREEMENT 0.995" in choice.reason and "int8/onnx: fidelity not measured" in choice.reason
    # bf16 only where the CPU has it.
    choice = select_variant(m, "auto", "auto", 0.995, bf16_ok=False)
    assert choice.variant.key == "fp32/torchscript" and "no AVX-512-BF16/AMX" in choice.reason
    # A lower bar lets int8 through.
    assert select_variant(m, "auto", "auto", 0.4, bf16_ok=False).variant.key == "int8/torchscript"


def test_forced_precision_and_runtime(tmp_path: Path) -> None:
    m = _manifest(int8_onnx=0.1)
    assert select_variant(m, "int8", "auto", 0.995, bf16_ok=False).variant.key == "int8/onnx"  # gate not applied
    bf16 = select_variant(m, "bf16", "auto", 0.995, bf16_ok=True)
    assert bf16.variant.key == "bf16/torchscript" and bf16.variant.artifact == "ref.pt"
    emulated = select_variant(m, "bf16", "auto", 0.995, bf16_ok=False)
    assert emulated.variant.key == "fp32/torchscript" and "emulated" in emulated.reason
    with pytest.raises(ModelArtifactError, match=r"PINFER_PRECISION=int8 with PINFER_RUNTIME=torchscript.*"
                                                 r"pinfer export-model --precision fp32,int8 --runtime "
                                                 r"torchscript --calibration DIR"):
        select_variant(m, "int8", "torchscript", 0.995, bf16_ok=False)
    with pytest.raises(ModelArtifactError, match="no variant in the model folder passes"):
        select_variant(m, "auto", "onnx", 0.995, bf16_ok=False)


def test_auto_falls_back_on_a_real_export_with_low_agreement(tiny_variants: Path) -> None:
    """The tiny fixture's int8 variants agree with fp32 on fewer than 99.5% of held-out images."""
    variants = {v.key: v for v in read_manifest(tiny_variants).variant_list()}
    assert variants["int8/torchscript"].fidelity["top1_agreement"] < 0.995
    assert variants["int8/onnx"].fidelity["top1_agreement"] < 0.995
    served = runtime(tiny_variants)
    assert served.precision == "fp32" and "fell back" in served.selection
    assert "int8/torchscript: top-1 agreement" in served.selection
    bar = min(variants["int8/torchscript"].fidelity["top1_agreement"], 0.9)
    assert runtime(tiny_variants, min_agreement=bar).precision == "int8"


@pytest.mark.parametrize("precision,rt", SERVED)
def test_a_tampered_artifact_is_refused_for_every_runtime(tiny_variants: Path, tmp_path: Path, precision: str,
                                                          rt: str) -> None:
    import shutil

    d = tmp_path / "m"
    shutil.copytree(tiny_variants, d)
    variant = next(v for v in read_manifest(d).variant_list() if (v.precision, v.runtime) == (precision, rt))
    data = bytearray((d / variant.artifact).read_bytes())
    data[len(data) // 2] ^= 0xFF
    (d / variant.artifact).write_bytes(bytes(data))
    with pytest.raises(ModelArtifactError, match="sha256 mismatch") as err:
        runtime(d, precision, rt)
    assert variant.artifact_sha256 in err.value.message and "export-model" in err.value.message


def test_a_worker_serving_onnx_runtime_never_imports_torch(tiny_variants: Path) -> None:
    code = ("import sys, numpy as np, worker.app, worker.classify\n"
            "from shared.settings import Settings\n"
            "from worker.runtime import ModelRuntime\n"
            "rt = ModelRuntime(Settings.from_env(), threads=1)\n"
            "p = rt.forward(np.zeros((2, 3, 224, 224), np.float32))\n"
            "print(rt.precision, rt.runtime, p.shape, 'torch' in sys.modules)")
    env = {"PATH": "/usr/bin:/bin", "PINFER_MODEL_DIR": str(tiny_variants), "PINFER_PRECISION": "int8",
           "PINFER_RUNTIME": "onnx", "PINFER_MAX_BATCH": "2"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                         cwd=Path(__file__).resolve().parents[2])
    assert out.returncode == 0, out.stderr
    assert out.stdout.split("\n")[-2] == "int8 onnx (2, 1000) False"
