"""``pinfer export-model``: turn torchvision's ResNet-18 weights into verified artifacts, one per variant.

Always a frozen TorchScript fp32 artifact (the reference); with ``--precision``/``--runtime`` also
bf16, int8 (``--calibration DIR``) and ONNX variants of the same weights, each with its fidelity against
fp32 measured on held-out photos (``weights/variants.py``). Workers load only the artifacts, so the
serving path needs neither torchvision nor this module.
Weights are taken, in order, from ``--weights PATH``, the torch hub cache, or a download with hash check;
without any of them the export fails with instructions instead of silently serving a random model.
"""
from __future__ import annotations

import argparse
import io
import socket
import sys
from pathlib import Path
from typing import Sequence

import torch

from shared.errors import ModelArtifactError, PinferError, WeightsUnavailable
from weights.manifest import PRECISIONS, RUNTIMES, Manifest, publish, read_manifest, sha256_file, verify_variant
from weights.variants import (CALIBRATION_IMAGES, HOLDOUT_IMAGES, NO_CALIBRATION, CalibrationSet,
                              build_variants, load_calibration)
from weights.resnet import OFFICIAL_FILENAME, OFFICIAL_SHA256_PREFIX, OFFICIAL_URL, resnet18

_DOWNLOAD_TIMEOUT_S = 60


def _hub_checkpoint(hub_dir: str | Path | None) -> Path:
    return Path(hub_dir or torch.hub.get_dir()) / "checkpoints" / OFFICIAL_FILENAME


def _how_to(cache: Path, reason: str) -> str:
    return (f"ResNet-18 ImageNet weights are not available ({reason}). Supply them in one of these ways:\n"
            f"  1. download {OFFICIAL_URL}\n"
            f"     and put it at {cache}  (the torch hub cache), then re-run `pinfer export-model`;\n"
            f"  2. or pass the file explicitly: `pinfer export-model --weights PATH/{OFFICIAL_FILENAME}`;\n"
            f"  3. or, for testing only, `pinfer export-model --random-init` (predictions will be meaningless).")


def _resolve_weights(weights: Path | None, hub_dir: str | Path | None) -> tuple[str, Path]:
    """Find the weights file and say where it came from (the manifest's ``weights_source``)."""
    cache = _hub_checkpoint(hub_dir)
    if weights is not None:
        if not Path(weights).is_file():
            raise WeightsUnavailable(_how_to(cache, f"--weights {weights} does not exist"))
        return "local-file", Path(weights)
    if cache.is_file():
        if not sha256_file(cache).startswith(OFFICIAL_SHA256_PREFIX):
            print(f"warning: {cache} does not match the official hash prefix; using it anyway", file=sys.stderr)
        return "hub-cache", cache
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(_DOWNLOAD_TIMEOUT_S)  # torch.hub's urlopen has none: never hang offline
    try:
        torch.hub.load_state_dict_from_url(OFFICIAL_URL, model_dir=str(cache.parent), map_location="cpu",
                                           check_hash=True, file_name=OFFICIAL_FILENAME, weights_only=True)
    except Exception as exc:  # URLError, hash mismatch, disk full: all mean "not available"
        raise WeightsUnavailable(_how_to(cache, f"no --weights, nothing in the hub cache, download failed: {exc}"),
                                 url=OFFICIAL_URL, hub_cache=str(cache)) from None
    finally:
        socket.setdefaulttimeout(previous)
    return "official-download", cache


def _load_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Accept a raw state_dict or ``{'state_dict': ...}`` (and strip DataParallel's ``module.``)."""
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise WeightsUnavailable(f"cannot read weights file {path}: {exc}") from None
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise WeightsUnavailable(f"weights file {path} holds a {type(obj).__name__}, not a state_dict")
    return {k.removeprefix("module."): v for k, v in obj.items()}


def _script_and_check(model: torch.nn.Module) -> bytes:
    """Script + freeze, then reload the saved bytes and compare with eager: what we publish is what we tested."""
    model.eval()
    frozen = torch.jit.freeze(torch.jit.script(model))
    buf = io.BytesIO()
    torch.jit.save(frozen, buf)
    loaded = torch.jit.load(io.BytesIO(buf.getvalue()), map_location="cpu")
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(1234))
    with torch.inference_mode():
        expected, got = model(x), loaded(x)
    if not torch.allclose(expected, got, atol=1e-5, rtol=1e-4):
        diff = (expected - got).abs().max().item()
        raise ModelArtifactError(f"TorchScript output differs from eager (max abs diff {diff:.3g}); not published")
    return buf.getvalue()


def export_model(model_dir: str | Path, weights: Path | None = None, random_init: bool = False, seed: int = 0,
                 hub_dir: str | Path | None = None, precisions: Sequence[str] = ("fp32",),
                 runtimes: Sequence[str] = ("torchscript",), calibration: "Path | CalibrationSet | None" = None,
                 calibration_images: int = CALIBRATION_IMAGES, holdout_images: int = HOLDOUT_IMAGES) -> Manifest:
    """Build, verify and atomically publish the ResNet-18 artifacts into ``model_dir``.

    ``calibration``: a folder of photos (or an already loaded ``CalibrationSet``); int8 needs it, and
    without it no variant's fidelity can be measured (``auto`` then serves fp32).
    """
    _check_variants(precisions, runtimes)
    if "int8" in precisions and calibration is None:
        raise ModelArtifactError(NO_CALIBRATION)
    if isinstance(calibration, (str, Path)):
        calibration = load_calibration(Path(calibration), calibration_images, holdout_images)
    if random_init:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = resnet18()
        fields = dict(weights_source="random-init", weights_sha256=None, pretrained=False, seed=seed)
    else:
        source, path = _resolve_weights(Path(weights) if weights is not None else None, hub_dir)
        model = resnet18()
        try:
            model.load_state_dict(_load_state_dict(path), strict=True)
        except RuntimeError as exc:
            raise WeightsUnavailable(f"{path} is not a torchvision resnet18 state_dict: {exc}") from None
        fields = dict(weights_source=source, weights_sha256=sha256_file(path), pretrained=True)
    data = _script_and_check(model)
    extra = build_variants(model, data, precisions, runtimes, calibration)
    return publish(data, model_dir, extra, architecture="resnet18", name="resnet18",
                   calibration=calibration.info if calibration is not None else None, **fields)


def _check_variants(precisions: Sequence[str], runtimes: Sequence[str]) -> None:
    for p in precisions:
        if p not in PRECISIONS:
            raise ModelArtifactError(f"--precision {p!r}: choose from {', '.join(PRECISIONS)}")
    for r in runtimes:
        if r not in RUNTIMES:
            raise ModelArtifactError(f"--runtime {r!r}: choose from {', '.join(RUNTIMES)}")
    if "bf16" in precisions and "torchscript" not in runtimes:
        raise ModelArtifactError("bf16 is served by TorchScript only: add --runtime torchscript")


def present_variants(model_dir: str | Path, precisions: Sequence[str], runtimes: Sequence[str]) -> Manifest:
    """The manifest when every requested variant is there and verifies (``--if-missing``), else raise."""
    manifest = read_manifest(model_dir)
    have = {(v.precision, v.runtime): v for v in manifest.variant_list()}
    wanted = {("fp32", "torchscript")} | {("fp32", r) for r in runtimes} | {
        (p, r) for p in precisions for r in runtimes if p != "bf16" or r == "torchscript"}
    for key in sorted(wanted):
        if key not in have:
            raise ModelArtifactError(f"the model in {model_dir} has no {key[0]}/{key[1]} variant")
        verify_variant(model_dir, have[key])
    return manifest


_LOUD = """\
!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!
!!  WARNING: official ResNet-18 weights unavailable -- exporting a RANDOMLY INITIALISED model.
!!  Every prediction it makes will be MEANINGLESS. The API reports "pretrained": false.
!!  Reason: {reason}
!!  Fix: supply the weights (see above) and re-run `pinfer export-model`.
!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!"""


def main(argv: list[str] | None = None) -> int:
    """CLI entry point; returns the exit status (2 when weights are unavailable)."""
    from shared.settings import Settings

    p = argparse.ArgumentParser(prog="pinfer export-model", description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, default=None, help="model directory (default: PINFER_MODEL_DIR)")
    group = p.add_mutually_exclusive_group()
    group.add_argument("--weights", type=Path, help="torchvision-format resnet18 .pth (state_dict)")
    group.add_argument("--random-init", action="store_true", help="seeded random weights (testing only)")
    p.add_argument("--seed", type=int, default=0, help="seed for --random-init (default 0)")
    p.add_argument("--if-missing", action="store_true", help="do nothing when a verified artifact exists")
    p.add_argument("--fallback-random-init", action="store_true",
                   help="when official weights cannot be had, export random weights (with a loud warning)")
    add_variant_arguments(p)
    args = p.parse_args(argv)
    out = args.out or Path(Settings.from_env().model_dir)
    precisions, runtimes = _csv(args.precision), _csv(args.runtime)
    try:
        _check_variants(precisions, runtimes)
        if args.if_missing:
            try:
                manifest = present_variants(out, precisions, runtimes)
            except ModelArtifactError:
                pass
            else:
                print(f"model present: {out / manifest.artifact} sha256={manifest.artifact_sha256[:12]} "
                      f"pretrained={str(manifest.pretrained).lower()} variants="
                      f"{','.join(v.key for v in manifest.variant_list())} (--if-missing: nothing to do)")
                return 0
        options = dict(seed=args.seed, precisions=precisions, runtimes=runtimes, calibration=args.calibration,
                       calibration_images=args.calibration_images, holdout_images=args.holdout_images)
        try:
            manifest = export_model(out, weights=args.weights, random_init=args.random_init, **options)
        except WeightsUnavailable as exc:
            if not args.fallback_random_init or args.weights is not None:
                raise
            print(exc.message, file=sys.stderr)
            print(_LOUD.format(reason=exc.message.split(" Supply them")[0]), file=sys.stderr)
            manifest = export_model(out, random_init=True, **options)
    except WeightsUnavailable as exc:
        print(f"error: {exc.message}", file=sys.stderr)
        return 2
    except PinferError as exc:
        print(f"error: {exc.message}", file=sys.stderr)
        return 1
    print(f"exported {out / manifest.artifact} sha256={manifest.artifact_sha256[:12]} "
          f"pretrained={str(manifest.pretrained).lower()} source={manifest.weights_source}")
    for v in manifest.variant_list():
        fid = v.fidelity
        figures = (f"top-1 agreement {fid['top1_agreement']:.4f}, top-5 overlap {fid['top5_overlap']:.4f}, "
                   f"max |dp| {fid['max_abs_dprob']:.2g} on {fid['images']} held-out photos") if fid else \
            ("reference" if (v.precision, v.runtime) == ("fp32", "torchscript") else "fidelity not measured")
        print(f"  {v.key:<17} {v.artifact}  {figures}")
    return 0


def _csv(value: str) -> list[str]:
    return [part.strip() for part in value.split(",") if part.strip()]


def add_variant_arguments(p: argparse.ArgumentParser) -> None:
    """The variant options, shared by ``pinfer export-model`` and ``pinfer up``."""
    p.add_argument("--precision", default="fp32",
                   help="comma-separated: fp32,bf16,int8 (default fp32; fp32 is always built); "
                        "int8 needs --calibration")
    p.add_argument("--runtime", default="torchscript",
                   help="comma-separated: torchscript,onnx (default torchscript; the TorchScript fp32 reference "
                        "is always built)")
    p.add_argument("--calibration", type=Path, default=None,
                   help=f"folder of your own photos: the first {CALIBRATION_IMAGES} (sorted, seeded shuffle) "
                        f"calibrate int8, up to {HOLDOUT_IMAGES} others measure each variant's agreement with fp32")
    p.add_argument("--calibration-images", type=int, default=CALIBRATION_IMAGES, metavar="N",
                   help=f"photos that calibrate int8 (default {CALIBRATION_IMAGES})")
    p.add_argument("--holdout-images", type=int, default=HOLDOUT_IMAGES, metavar="N",
                   help=f"most photos held out to measure fidelity (default {HOLDOUT_IMAGES})")


if __name__ == "__main__":
    sys.exit(main())
