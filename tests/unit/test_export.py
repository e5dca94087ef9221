"""export-model: torchvision-compatible weights, verified TorchScript, atomic publish, clear offline failure."""
from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import urllib.error
from pathlib import Path

import pytest
import torch

from shared.errors import ModelArtifactError, WeightsUnavailable
from weights.export import export_model, main
from weights.manifest import read_manifest, verify_artifact
from weights.resnet import OFFICIAL_FILENAME, OFFICIAL_URL, resnet18

# TorchScript is deprecated upstream in favour of torch.export, but it is still this project's artifact format.
pytestmark = pytest.mark.filterwarnings(r"ignore:`torch\.jit\.\w+` is deprecated:DeprecationWarning")

BN = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")


def torchvision_resnet18_layout() -> dict[str, tuple[int, ...]]:
    """torchvision's resnet18 state_dict (key -> shape), written out from its documented architecture."""
    def bn(prefix: str, c: int) -> dict[str, tuple[int, ...]]:
        return {f"{prefix}.{n}": (() if n == "num_batches_tracked" else (c,)) for n in BN}

    table = {"conv1.weight": (64, 3, 7, 7), **bn("bn1", 64)}
    inplanes = 64
    for layer, planes in enumerate((64, 128, 256, 512), start=1):
        for block in (0, 1):
            p = f"layer{layer}.{block}"
            cin = inplanes if block == 0 else planes
            table[f"{p}.conv1.weight"] = (planes, cin, 3, 3)
            table.update(bn(f"{p}.bn1", planes))
            table[f"{p}.conv2.weight"] = (planes, planes, 3, 3)
            table.update(bn(f"{p}.bn2", planes))
            if block == 0 and layer > 1:
                table[f"{p}.downsample.0.weight"] = (planes, inplanes, 1, 1)
                table.update(bn(f"{p}.downsample.1", planes))
        inplanes = planes
    table.update({"fc.weight": (1000, 512), "fc.bias": (1000,)})
    return table


@pytest.fixture(scope="module")
def official_like(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A randomly initialised state dict saved like the official file (stands in for it offline)."""
    torch.manual_seed(7)
    path = tmp_path_factory.mktemp("dl") / OFFICIAL_FILENAME
    torch.save(resnet18().state_dict(), path)
    return path


@pytest.fixture
def offline(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: object, **kwargs: object) -> None:
        raise urllib.error.URLError("no network in tests")
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", refuse)


def test_state_dict_layout_is_torchvision_and_loads_strict() -> None:
    table = torchvision_resnet18_layout()
    assert len(table) == 122
    ours = {k: tuple(v.shape) for k, v in resnet18().state_dict().items()}
    assert ours == table and list(ours) == list(table)
    foreign = {k: (torch.tensor(0) if s == () else torch.randn(s).abs()) for k, s in table.items()}
    model = resnet18()
    model.load_state_dict(foreign, strict=True)
    assert torch.equal(model.fc.weight, foreign["fc.weight"])
    assert sum(p.numel() for p in model.parameters()) == 11_689_512


def test_export_with_weights_file(tmp_path: Path, official_like: Path, offline: None) -> None:
    manifest = export_model(tmp_path / "m", weights=official_like, hub_dir=tmp_path / "hub")
    assert manifest.weights_source == "local-file" and manifest.pretrained is True
    assert manifest.weights_sha256 == hashlib.sha256(official_like.read_bytes()).hexdigest()
    assert (manifest.input_size, manifest.resize, manifest.num_classes) == (224, 256, 1000)
    assert manifest.mean == [0.485, 0.456, 0.406] and manifest.std == [0.229, 0.224, 0.225]
    assert manifest.torch_version == torch.__version__ and manifest.seed is None
    on_disk = json.loads((tmp_path / "m" / "manifest.json").read_text())
    assert on_disk["artifact"] == manifest.artifact == f"model-{manifest.artifact_sha256[:12]}.pt"
    checked, path = verify_artifact(tmp_path / "m")
    assert checked == manifest
    eager = resnet18().eval()
    eager.load_state_dict(torch.load(official_like, weights_only=True))
    x = torch.randn(3, 3, 224, 224)
    with torch.inference_mode():
        assert torch.allclose(torch.jit.load(str(path))(x), eager(x), atol=1e-5)


def test_wrapped_state_dict_is_accepted(tmp_path: Path, official_like: Path) -> None:
    wrapped = tmp_path / "ckpt.pth"
    torch.save({"state_dict": torch.load(official_like, weights_only=True), "epoch": 90}, wrapped)
    assert export_model(tmp_path / "m", weights=wrapped).weights_source == "local-file"


def test_tampered_or_missing_artifact_is_refused(tmp_path: Path) -> None:
    manifest = export_model(tmp_path, random_init=True)
    artifact = tmp_path / manifest.artifact
    data = bytearray(artifact.read_bytes())
    data[len(data) // 2] ^= 0xFF
    artifact.write_bytes(bytes(data))
    with pytest.raises(ModelArtifactError, match="sha256 mismatch") as err:
        verify_artifact(tmp_path)
    assert manifest.artifact_sha256 in err.value.message and "export-model" in err.value.message
    artifact.unlink()
    with pytest.raises(ModelArtifactError, match="missing"):
        verify_artifact(tmp_path)
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(ModelArtifactError, match="unreadable"):
        read_manifest(tmp_path)


def test_offline_without_weights_explains_how(tmp_path: Path, offline: None, monkeypatch: pytest.MonkeyPatch,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(WeightsUnavailable) as err:
        export_model(tmp_path / "m", hub_dir=tmp_path / "hub")
    message = err.value.message
    for needle in (OFFICIAL_URL, str(tmp_path / "hub" / "checkpoints" / OFFICIAL_FILENAME), "--weights",
                   "--random-init", "no network in tests"):
        assert needle in message
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))
    assert main(["--out", str(tmp_path / "m")]) == 2
    assert OFFICIAL_URL in capsys.readouterr().err
    assert not (tmp_path / "m" / "manifest.json").exists()
    assert main(["--out", str(tmp_path / "m"), "--fallback-random-init"]) == 0
    captured = capsys.readouterr()
    assert "MEANINGLESS" in captured.err and '"pretrained": false' in captured.err
    assert "pretrained=false" in captured.out
    assert read_manifest(tmp_path / "m").weights_source == "random-init"


def test_random_init_is_deterministic(tmp_path: Path) -> None:
    a = export_model(tmp_path / "a", random_init=True, seed=3)
    b = export_model(tmp_path / "b", random_init=True, seed=3)
    c = export_model(tmp_path / "c", random_init=True, seed=4)
    assert a.pretrained is False and a.weights_sha256 is None and a.seed == 3
    assert (b.seed, c.seed) == (3, 4)
    x = torch.randn(2, 3, 224, 224)
    outs = [torch.jit.load(str(verify_artifact(tmp_path / d)[1]))(x) for d in "abc"]
    assert torch.equal(outs[0], outs[1]) and not torch.allclose(outs[0], outs[2])


def test_random_init_cli_artifact_is_byte_identical(tmp_path: Path) -> None:
    """Across processes the bytes match too (in one process TorchScript's name mangling differs)."""
    shas = []
    for d in ("x", "y"):
        subprocess.run([sys.executable, "-m", "weights.export", "--out", str(tmp_path / d), "--random-init",
                        "--seed", "5"], check=True, capture_output=True)
        shas.append(read_manifest(tmp_path / d).artifact_sha256)
    assert shas[0] == shas[1]


def test_hub_cache_is_used(tmp_path: Path, official_like: Path, offline: None) -> None:
    cached = tmp_path / "hub" / "checkpoints" / OFFICIAL_FILENAME
    cached.parent.mkdir(parents=True)
    cached.write_bytes(official_like.read_bytes())
    manifest = export_model(tmp_path / "m", hub_dir=tmp_path / "hub")
    assert manifest.weights_source == "hub-cache" and manifest.pretrained is True
    assert manifest.weights_sha256 == hashlib.sha256(cached.read_bytes()).hexdigest()


def test_publish_replaces_old_artifact_and_if_missing_is_a_no_op(tmp_path: Path,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    export_model(tmp_path, random_init=True, seed=1)
    second = export_model(tmp_path, random_init=True, seed=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["manifest.json", second.artifact])
    before = (tmp_path / "manifest.json").read_bytes()
    assert main(["--out", str(tmp_path), "--random-init", "--seed", "9", "--if-missing"]) == 0
    assert "nothing to do" in capsys.readouterr().out
    assert (tmp_path / "manifest.json").read_bytes() == before


def test_fixture_models(tmp_path: Path) -> None:
    from tests.fixtures.models import make_fixture_model

    x = torch.randn(2, 3, 224, 224)
    manifest = make_fixture_model("tiny", tmp_path / "tiny")
    assert manifest.pretrained is False and manifest.weights_source == "fixture"
    assert torch.jit.load(str(verify_artifact(tmp_path / "tiny")[1]))(x).shape == (2, 1000)
    make_fixture_model("raises", tmp_path / "raises")
    with pytest.raises(RuntimeError):
        torch.jit.load(str(verify_artifact(tmp_path / "raises")[1]))(x)


def test_manifest_module_does_not_import_torch() -> None:
    code = "import sys, weights.manifest; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def test_int8_without_calibration_photos_is_a_clear_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--out", str(tmp_path / "m"), "--random-init", "--precision", "fp32,int8"]) == 1
    err = capsys.readouterr().err
    assert "int8 needs calibration photos: pass --calibration DIR" in err
    assert not (tmp_path / "m" / "manifest.json").exists()
    assert main(["--out", str(tmp_path / "m"), "--random-init", "--precision", "int4"]) == 1
    assert "--precision 'int4': choose from fp32, bf16, int8" in capsys.readouterr().err


def test_calibration_split_is_deterministic_and_disjoint(tmp_path: Path) -> None:
    from weights.variants import split_calibration

    a, b = tmp_path / "a", tmp_path / "b"
    names = [f"img-{i:02d}.jpg" for i in range(30)]
    for folder, order in ((a, names), (b, list(reversed(names)))):  # created in opposite orders
        (folder / "sub").mkdir(parents=True)
        for n in order:
            (folder / ("sub" if n.endswith("7.jpg") else "") / n).write_bytes(b"x")
        (folder / "notes.txt").write_text("not an image")
    calib, holdout = split_calibration(a, 8, 10)
    assert [p.relative_to(a) for p in calib] == [p.relative_to(b) for p in split_calibration(b, 8, 10)[0]]
    assert len(calib) == 8 and len(holdout) == 10 and not set(calib) & set(holdout)
    assert sorted(calib) != calib  # shuffled with the fixed seed, not just the first names
    assert split_calibration(a, 8, 10, seed=1)[0] != calib


def test_if_missing_builds_variants_the_present_artifact_lacks(tmp_path: Path,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--out", str(tmp_path), "--random-init"]) == 0
    assert main(["--out", str(tmp_path), "--random-init", "--if-missing"]) == 0
    assert "nothing to do" in capsys.readouterr().out
    assert main(["--out", str(tmp_path), "--random-init", "--if-missing", "--runtime", "torchscript,onnx"]) == 0
    assert "nothing to do" not in capsys.readouterr().out
    keys = {v.key for v in read_manifest(tmp_path).variant_list()}
    assert keys == {"fp32/torchscript", "fp32/onnx"}
    assert main(["--out", str(tmp_path), "--random-init", "--if-missing", "--runtime", "onnx"]) == 0
    assert "nothing to do" in capsys.readouterr().out


def test_pinfer_up_passes_the_same_variant_options_to_the_export() -> None:
    from pinfer.cli import _variant_args

    args = _variant_args(["--precision", "fp32,int8", "--runtime", "onnx", "--calibration", "photos"])
    assert args[args.index("--precision") + 1] == "fp32,int8" and args[args.index("--runtime") + 1] == "onnx"
    assert args[args.index("--calibration") + 1] == "photos"
    with pytest.raises(SystemExit):
        _variant_args(["--bogus"])
