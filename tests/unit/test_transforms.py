"""shared.transforms: torchvision's Resize(256) -> CenterCrop(224) -> ToTensor -> Normalize
geometry and arithmetic, and the `fast` JPEG reduced-scale decode. Images are made here."""
from __future__ import annotations

import io
import random

import numpy as np
import pytest
from PIL import Image

from shared.errors import ImageError, UnsupportedFormat
from shared.images import decode
from shared.settings import Settings
from shared.transforms import (
    INPUT_SIZE,
    MEAN,
    RESIZE,
    STD,
    center_crop,
    preprocess,
    preprocess_image,
    resize_shorter,
)

EXACT = Settings(resize="exact")
FAST = Settings(resize="fast")
# One 8-bit level of the normalised tensor in the channel with the smallest std: how far fast may be
# from exact when it decodes at full scale (documented in shared.transforms).
ONE_LEVEL = 1 / (255 * min(STD)) + 1e-5


def encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def photo_like(size: tuple[int, int], seed: int = 1) -> Image.Image:
    """Smooth gradients plus mid-frequency texture and hard edges: roughly what cameras produce."""
    w, h = size
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    base = np.stack([x / w, y / h, 0.5 + 0.5 * np.sin(x / 37.0) * np.cos(y / 23.0)], axis=-1) * 200
    texture = rng.normal(0, 1, (h // 8 + 1, w // 8 + 1, 3)).repeat(8, 0).repeat(8, 1)[:h, :w] * 12
    img = np.clip(base + texture + 20, 0, 255).astype(np.uint8)
    img[h // 3: h // 2, w // 3: w // 2] = (250, 30, 30)
    return Image.fromarray(img, "RGB")


def column_ramp(width: int, height: int) -> Image.Image:
    """Pixel value = column index (mod 256): crop offsets can be read back from the output."""
    row = (np.arange(width) % 256).astype(np.uint8)
    return Image.fromarray(np.repeat(np.tile(row, (height, 1))[..., None], 3, axis=2), "RGB")


# --- constants and arithmetic ---------------------------------------------------------------------
def test_constants():
    assert (INPUT_SIZE, RESIZE) == (224, 256)
    assert MEAN == (0.485, 0.456, 0.406) and STD == (0.229, 0.224, 0.225)


def test_solid_colour_gives_torchvision_values():
    colour = (10, 128, 250)
    out = preprocess(encode(Image.new("RGB", (300, 400), colour), "PNG"), EXACT)
    assert out.shape == (3, 224, 224) and out.dtype == np.float32 and out.flags.c_contiguous
    for c in range(3):
        expected = (np.float32(colour[c]) / np.float32(255) - np.float32(MEAN[c])) / np.float32(STD[c])
        assert np.all(out[c] == expected)


def test_channel_order_is_rgb_chw():
    img = Image.new("RGB", (256, 256), (255, 0, 0))
    out = preprocess_image(img)
    assert out[0].min() > 2.0 and out[1].max() < -1.9 and out[2].max() < -1.7


def test_out_writes_into_a_batch():
    batch = np.zeros((2, 3, 224, 224), dtype=np.float32)
    data = encode(photo_like((320, 240)), "PNG")
    result = preprocess(data, EXACT, out=batch[1])
    assert np.shares_memory(result, batch[1])
    np.testing.assert_array_equal(batch[1], preprocess(data, EXACT))
    assert not batch[0].any()
    for bad in (np.zeros((3, 224, 224), np.float64), np.zeros((3, 225, 224), np.float32),
                np.zeros((3, 224, 448), np.float32)[:, :, ::2]):
        with pytest.raises(ValueError):
            preprocess(data, EXACT, out=bad)


def test_manifest_parameters_are_honoured():
    img = Image.new("RGB", (300, 200), (128, 128, 128))
    out = preprocess_image(img, resize=160, input_size=128, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    assert out.shape == (3, 128, 128)
    np.testing.assert_allclose(out, (128 / 255 - 0.5) / 0.5, rtol=0, atol=1e-6)


def test_non_rgb_image_is_converted():
    img = Image.new("L", (256, 256), 128)
    np.testing.assert_array_equal(preprocess_image(img), preprocess_image(img.convert("RGB")))


def test_unknown_resize_mode_is_refused():
    with pytest.raises(ValueError, match="exact, fast"):
        preprocess(encode(Image.new("RGB", (8, 8)), "PNG"), Settings().replace(resize="bogus"))


def test_bad_bytes_raise_image_errors():
    with pytest.raises(UnsupportedFormat):
        preprocess(b"not an image", EXACT)
    with pytest.raises(ImageError):
        preprocess(encode(photo_like((300, 200)), "JPEG")[:500], FAST)


# --- geometry ------------------------------------------------------------------------------------
@pytest.mark.parametrize("size,expected", [
    ((1000, 500), (512, 256)),
    ((500, 1000), (256, 512)),
    ((333, 500), (256, 384)),      # int(256 * 500 / 333) = 384.38 -> 384 (truncated)
    ((640, 427), (383, 256)),      # int(256 * 640 / 427) = 383.70 -> 383
    ((100, 100), (256, 256)),      # small images are scaled up
    ((256, 300), (256, 300)),      # already there: untouched
])
def test_resize_shorter_matches_torchvision_sizes(size, expected):
    img = Image.new("RGB", size)
    out = resize_shorter(img, 256)
    assert out.size == expected
    if size == expected:
        assert out is img


def test_resize_is_plain_pillow_bilinear():
    img = photo_like((777, 555))
    expected = img.resize((358, 256), Image.Resampling.BILINEAR)
    assert resize_shorter(img).tobytes() == expected.tobytes()


@pytest.mark.parametrize("width,left", [
    (224, 0), (225, 0), (226, 1), (227, 2), (229, 2), (231, 4), (256, 16), (383, 80),
])
def test_center_crop_offset_uses_round_half_even(width, left):
    # (227-224)/2 = 1.5 -> 2, (229-224)/2 = 2.5 -> 2, (225-224)/2 = 0.5 -> 0: Python's round().
    assert left == int(round((width - 224) / 2.0))
    out = center_crop(column_ramp(width, 230), 224)
    assert out.size == (224, 224)
    assert out.getpixel((0, 0))[0] == left and out.getpixel((223, 0))[0] == (left + 223) % 256


@pytest.mark.parametrize("width,pad", [(200, 12), (221, 1), (223, 0)])
def test_center_crop_pads_small_images_like_torchvision(width, pad):
    """torchvision pads (224 - w) // 2 on the left (rest on the right) with zeros, then crops."""
    img = column_ramp(width, 300)
    img.paste((200, 200, 200), (0, 0, width, 1))
    out = np.asarray(center_crop(img, 224))
    assert out.shape == (224, 224, 3)
    assert not out[:, :pad].any()                         # left padding
    assert not out[:, pad + width:].any()                 # right padding
    top = int(round((300 - 224) / 2.0))                   # 38: the tall side is cropped normally
    np.testing.assert_array_equal(out[0, pad:pad + width], np.asarray(img)[top, :])


# --- fast mode ------------------------------------------------------------------------------------
@pytest.mark.parametrize("size,expected", [
    ((2000, 1500), (500, 375)),   # 1500 // 256 = 5 -> 1/4
    ((6000, 4000), (750, 500)),   # 4000 // 256 = 15 -> 1/8
    ((1024, 700), (512, 350)),    # 700 // 256 = 2 -> 1/2
    ((2047, 1023), (1024, 512)),  # 1023 // 256 = 3 -> 1/2; libjpeg rounds sizes up
    ((600, 511), (600, 511)),     # shorter side < 2 x 256: decoded at full size
    ((300, 2000), (300, 2000)),
])
def test_draft_keeps_the_shorter_side_at_least_the_target(size, expected):
    data = encode(Image.new("RGB", size, (90, 120, 150)), "JPEG", quality=70)
    img = decode(data, EXACT, draft_to=256)
    assert img.size == expected and img.mode == "RGB"
    assert min(img.size) >= 256 or img.size == size


def test_fast_mode_decodes_a_large_jpeg_at_reduced_scale_and_stays_close():
    data = encode(photo_like((2000, 1500)), "JPEG", quality=90)
    full = decode(data, EXACT)
    reduced = decode(data, FAST, draft_to=RESIZE)
    assert full.size == (2000, 1500)
    assert reduced.size == (500, 375)
    exact, fast = preprocess(data, EXACT), preprocess(data, FAST)
    diff = np.abs(exact - fast)
    print(f"\nfast vs exact on a synthetic 2000x1500 JPEG: mean {diff.mean():.4f}, max {diff.max():.3f}")
    assert 0 < diff.mean() < 0.05
    assert np.abs(exact.mean() - fast.mean()) < 0.01


def test_fast_mode_respects_exif_orientation():
    img = photo_like((2400, 1200))
    exif = Image.Exif()
    exif[0x0112] = 6
    data = encode(img, "JPEG", exif=exif)
    assert decode(data, FAST, draft_to=RESIZE).size == (300, 600)  # 1200 // 256 = 4 -> 1/4, then turned
    assert decode(data, EXACT).size == (1200, 2400)
    diff = np.abs(preprocess(data, EXACT) - preprocess(data, FAST))
    assert diff.mean() < 0.05


@pytest.mark.parametrize("fmt,size", [
    ("PNG", (1200, 900)), ("WEBP", (1200, 900)), ("TIFF", (1200, 900)),  # resampled from the full image
    ("JPEG", (500, 400)), ("JPEG", (640, 427)),  # too small for reduced-scale decoding
    ("PNG", (256, 300)), ("PNG", (100, 80)),     # integer crop only; scaled up
])
def test_fast_without_reduced_decoding_is_within_one_level_of_exact(fmt, size):
    """Resampling the window straight from the source may round a pixel the other way, no more."""
    data = encode(photo_like(size), fmt, **({"lossless": True} if fmt == "WEBP" else {}))
    diff = np.abs(preprocess(data, FAST) - preprocess(data, EXACT))
    assert diff.max() <= ONE_LEVEL
    assert diff.mean() < 1e-3


@pytest.mark.parametrize("mode", ["RGB", "L", "RGBA", "LA", "P", "PA", "1", "I;16", "I", "F", "CMYK"])
def test_fast_output_contract_and_tolerance_for_every_mode(mode):
    """Same float32 (3, 224, 224) C-contiguous tensor as exact, within one level, whatever the mode
    (modes other than RGB and L are cropped, then converted like decode converts them)."""
    img = photo_like((700, 530))
    if mode in ("I;16", "I"):
        img = Image.fromarray(np.asarray(img.convert("L"), dtype=np.uint16) * 257)  # mode I;16
        img = img if mode == "I;16" else img.convert("I")
    elif mode == "F":
        img = Image.fromarray(np.asarray(img.convert("L"), dtype=np.float32) / 255, "F")
    else:
        img = img.convert(mode)
    fmt = "TIFF" if mode in ("I", "F", "CMYK", "I;16", "PA") else "PNG"
    data = encode(img, fmt)
    fast = preprocess(data, FAST)
    assert fast.shape == (3, INPUT_SIZE, INPUT_SIZE) and fast.dtype == np.float32 and fast.flags.c_contiguous
    assert np.abs(fast - preprocess(data, EXACT)).max() <= ONE_LEVEL


def test_fast_keeps_the_colour_under_transparent_pixels_as_exact_does():
    """convert("RGB") drops alpha; resizing RGBA would premultiply and turn transparent red black."""
    img = photo_like((900, 700)).convert("RGBA")
    alpha = np.full((700, 900), 255, np.uint8)
    alpha[:, ::2] = 0
    img.putalpha(Image.fromarray(alpha, "L"))
    data = encode(img, "PNG")
    assert np.abs(preprocess(data, FAST) - preprocess(data, EXACT)).max() <= ONE_LEVEL


def test_fast_writes_into_a_batch_and_checks_out():
    batch = np.zeros((2, 3, 224, 224), dtype=np.float32)
    data = encode(photo_like((1600, 1200)), "JPEG")
    result = preprocess(data, FAST, out=batch[1])
    assert np.shares_memory(result, batch[1])
    np.testing.assert_array_equal(batch[1], preprocess(data, FAST))
    assert not batch[0].any()
    with pytest.raises(ValueError):
        preprocess(data, FAST, out=np.zeros((3, 224, 224), np.float64))


def test_fast_honours_manifest_parameters_including_a_padded_crop():
    data = encode(photo_like((300, 200)), "PNG")
    for resize, size in ((160, 128), (160, 224)):  # the second pads: resize < input size
        kw = dict(resize=resize, input_size=size, mean=(0.5, 0.4, 0.3), std=(0.2, 0.25, 0.3))
        fast = preprocess(data, FAST, **kw)
        assert fast.shape == (3, size, size)
        assert np.abs(fast - preprocess(data, EXACT, **kw)).max() <= 1 / (255 * 0.2) + 1e-5


def test_fast_decodes_a_large_jpeg_at_reduced_scale(monkeypatch):
    """The resampler gets libjpeg's 1/4-scale decode in fast mode and the full image in exact mode."""
    import shared.transforms as transforms

    seen = []
    for name in ("preprocess_image", "preprocess_image_fast"):
        real = getattr(transforms, name)
        monkeypatch.setattr(transforms, name, lambda img, _real=real, **kw: seen.append(img.size) or _real(img, **kw))
    data = encode(photo_like((2000, 1500)), "JPEG", quality=90)
    preprocess(data, FAST)
    preprocess(data, EXACT)
    assert seen == [(500, 375), (2000, 1500)]


def test_fast_shrinks_a_large_png_close_to_exact():
    """Beyond 2 x REDUCING_GAP, Pillow box-averages before the filter: close, not identical."""
    data = encode(photo_like((3200, 2400)), "PNG")
    diff = np.abs(preprocess(data, FAST) - preprocess(data, EXACT))
    assert diff.mean() < 0.01


def test_cmyk_and_grey_jpegs_take_the_draft_path():
    rng = random.Random(4)
    for mode in ("CMYK", "L"):
        data = encode(photo_like((1600, 1200), seed=rng.randrange(100)).convert(mode), "JPEG")
        img = decode(data, FAST, draft_to=RESIZE)
        assert img.mode == "RGB" and img.size == (400, 300)
        assert np.abs(preprocess(data, EXACT) - preprocess(data, FAST)).mean() < 0.05


@pytest.mark.parametrize("fmt,mode,size", [
    ("JPEG", "RGB", (640, 520)), ("JPEG", "L", (640, 520)), ("GIF", "P", (120, 90)),
    ("PNG", "RGBA", (120, 90)), ("TIFF", "CMYK", (120, 90)),
])
def test_fuzzed_bytes_in_fast_mode_only_ever_raise_image_errors(fmt, mode, size):
    """fast crops, converts and resamples after decode: hostile input must still fail as an ImageError
    (and what decodes must still give a finite tensor of the right shape)."""
    import warnings

    from tests.unit.test_images import _mutate

    rng = random.Random(7)
    base = encode(photo_like(size).convert(mode), fmt)
    limits = FAST.replace(max_pixels=2_000_000)
    outcomes: dict[str, int] = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for _ in range(60):
            try:
                out = preprocess(_mutate(rng, base), limits)
            except ImageError as exc:
                outcomes[exc.code] = outcomes.get(exc.code, 0) + 1
                continue
            assert out.shape == (3, INPUT_SIZE, INPUT_SIZE) and np.isfinite(out).all()
            outcomes["ok"] = outcomes.get("ok", 0) + 1
    assert outcomes.get("ok")
    print(f"\nfuzz fast {fmt} {mode}: {outcomes}")
