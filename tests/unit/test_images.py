"""shared.images: every supported format and mode decodes to upright RGB, and every hostile or
unsupported input is refused with the right ImageError, cheaply, before pixels are allocated.

All images are made here (no corpus), so these tests run on a fresh clone.
"""
from __future__ import annotations

import io
import random
import struct
import subprocess
import sys
import time
import warnings
import zlib

import pytest
from PIL import Image

from shared.errors import (
    BadAspectRatio,
    CorruptImage,
    ImageError,
    ImageTooLarge,
    TooManyPixels,
    UnsupportedFormat,
)
from shared.images import SUPPORTED_FORMATS, ImageInfo, decode, probe
from shared.settings import Settings

S = Settings()
SUPPORTED_TEXT = "JPEG, PNG, WebP, GIF, BMP, TIFF"


# --- builders ----------------------------------------------------------------------------------
def encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def scene(size=(64, 48), mode="RGB") -> Image.Image:
    """A picture with structure (gradient + blocks), so decode mistakes show in the pixels."""
    w, h = size
    img = Image.linear_gradient("L").resize(size).convert("RGB")
    img.paste((255, 0, 0), (0, 0, w // 4, h // 4))
    img.paste((0, 0, 255), (w - w // 4, h - h // 4, w, h))
    return img.convert(mode) if mode != "RGB" else img


def png_header_only(width: int, height: int) -> bytes:
    """A tiny PNG whose IHDR declares width x height (valid CRCs), with an empty IDAT."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)  # 8-bit grey
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")


def webp_vp8x_header(width: int, height: int) -> bytes:
    """A WebP that is only a VP8X header declaring a width x height canvas."""
    body = b"\x00\x00\x00\x00" + (width - 1).to_bytes(3, "little") + (height - 1).to_bytes(3, "little")
    chunk = b"VP8X" + struct.pack("<I", len(body)) + body
    return b"RIFF" + struct.pack("<I", 4 + len(chunk)) + b"WEBP" + chunk


def minimal_psd(width=4, height=4) -> bytes:
    """A raw 8-bit RGB Photoshop file (Pillow reads PSD; pinfer must not)."""
    header = b"8BPS" + struct.pack(">H6xHIIHH", 1, 3, height, width, 8, 3)
    sections = struct.pack(">III", 0, 0, 0)  # colour mode data, image resources, layers: empty
    return header + sections + struct.pack(">H", 0) + bytes(3 * width * height)


def minimal_eps() -> bytes:
    return (b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n%%EndComments\n"
            b"newpath 0 0 moveto 10 10 lineto stroke\nshowpage\n%%EOF\n")


def rgb_pixels(img: Image.Image) -> bytes:
    assert img.mode == "RGB"
    return img.tobytes()


# --- formats -----------------------------------------------------------------------------------
@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF"])
def test_each_supported_format_decodes(fmt):
    data = encode(scene(), fmt)
    info = probe(data, S)
    assert info == ImageInfo(format=fmt, width=64, height=48, mode=info.mode)
    out = decode(data, S)
    assert out.mode == "RGB" and out.size == (64, 48)
    r, g, b = out.getpixel((2, 2))
    assert r > 200 and g < 60 and b < 60  # the red block survived (lossy formats allowed)


@pytest.mark.parametrize("mode,kw", [("RGB", {}), ("RGBA", {}), ("RGB", {"lossless": True}),
                                     ("RGBA", {"lossless": True}), ("RGBA", {"exif": b"Exif\x00\x00"}),
                                     ("RGB", {"icc_profile": b"x" * 10})])
def test_webp_probe_reads_the_riff_header_like_pillow(mode, kw):
    """probe reads WebP headers itself (no libwebp): same answer as Pillow's, for each first chunk."""
    img = scene((123, 45), mode)
    if mode == "RGBA":
        img.putalpha(128)
    data = encode(img, "WEBP", **kw)
    pillow = Image.open(io.BytesIO(data))
    assert probe(data, S) == ImageInfo("WEBP", pillow.width, pillow.height, pillow.mode)
    assert decode(data, S).size == (123, 45)


def test_mpo_is_reported_as_jpeg():
    img = scene()
    data = encode(img, "MPO", save_all=True, append_images=[img.transpose(Image.Transpose.ROTATE_180)])
    assert Image.open(io.BytesIO(data)).format == "MPO"
    assert probe(data, S).format == "JPEG"
    assert decode(data, S).size == (64, 48)


def test_supported_formats_constant():
    assert SUPPORTED_FORMATS == {"JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF"}


# --- modes -------------------------------------------------------------------------------------
def _p_with_transparency() -> Image.Image:
    img = scene().convert("P")
    img.info["transparency"] = 0
    return img


MODE_CASES = {
    "L-png": lambda: encode(scene(mode="L"), "PNG"),
    "LA-png": lambda: encode(scene(mode="LA"), "PNG"),
    "P-png": lambda: encode(scene().convert("P"), "PNG"),
    "P-transparency-png": lambda: encode(_p_with_transparency(), "PNG", transparency=0),
    "P-transparency-gif": lambda: encode(_p_with_transparency(), "GIF", transparency=0),
    # A tRNS alpha table (bytes): plain convert("RGB") would warn "should be converted to RGBA".
    "P-alpha-table-png": lambda: encode(scene().convert("P"), "PNG", transparency=bytes(range(0, 256, 2))),
    "RGBA-png": lambda: encode(scene(mode="RGBA"), "PNG"),
    "RGBA-webp": lambda: encode(scene(mode="RGBA"), "WEBP", lossless=True),
    "RGBA-tiff": lambda: encode(scene(mode="RGBA"), "TIFF"),
    "CMYK-jpeg": lambda: encode(scene(mode="CMYK"), "JPEG"),
    "CMYK-tiff": lambda: encode(scene(mode="CMYK"), "TIFF"),
    "1-png": lambda: encode(scene(mode="1"), "PNG"),
    "1-bmp": lambda: encode(scene(mode="1"), "BMP"),
    "1-tiff": lambda: encode(scene(mode="1"), "TIFF", compression="group4"),
    "L-jpeg": lambda: encode(scene(mode="L"), "JPEG"),
    "YCbCr-tiff-jpeg": lambda: encode(scene(), "TIFF", compression="jpeg"),
}


@pytest.mark.parametrize("case", sorted(MODE_CASES))
def test_every_mode_converts_like_torchvision(case):
    """Same pixels as torchvision's loader, ``Image.open(f).convert("RGB")``, and no warning."""
    data = MODE_CASES[case]()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        expected = Image.open(io.BytesIO(data)).convert("RGB")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # e.g. Pillow's "Palette images with Transparency" warning
        out = decode(data, S)
    assert out.mode == "RGB" and out.size == expected.size
    assert rgb_pixels(out) == rgb_pixels(expected)


def _i16(values: list[int], size=(4, 1)) -> Image.Image:
    img = Image.new("I;16", size)
    for x, v in enumerate(values):
        img.putpixel((x, 0), v)
    return img


@pytest.mark.parametrize("fmt", ["PNG", "TIFF"])
def test_16_bit_grey_is_scaled_not_clipped(fmt):
    data = encode(_i16([0, 0x80FF, 0xFFFF, 300]), fmt)
    assert Image.open(io.BytesIO(data)).mode.startswith("I;16")
    out = decode(data, S)
    assert [out.getpixel((x, 0)) for x in range(4)] == [(0, 0, 0), (0x80,) * 3, (255,) * 3, (1,) * 3]


def test_16_bit_rgb_png_keeps_high_byte():
    # Pillow reads 16-bit RGB PNGs as 8-bit RGB (libpng's high byte); the grey path above agrees.
    raw = struct.pack(">3H", 0x80FF, 0x0100, 0xFFFF)
    ihdr = struct.pack(">IIBBBBB", 1, 1, 16, 2, 0, 0, 0)

    def chunk(kind, body):
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
    data = (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" + raw))
            + chunk(b"IEND", b""))
    assert decode(data, S).getpixel((0, 0)) == (0x80, 0x01, 0xFF)


def test_32_bit_int_and_float_tiffs_are_scaled():
    i32 = Image.new("I", (3, 1))
    for x, v in enumerate([0, 32768, 65535]):
        i32.putpixel((x, 0), v)
    out = decode(encode(i32, "TIFF"), S)
    assert [out.getpixel((x, 0))[0] for x in range(3)] == [0, 128, 255]
    f = Image.new("F", (3, 1))
    for x, v in enumerate([0.0, 0.5, 1.0]):
        f.putpixel((x, 0), v)
    out = decode(encode(f, "TIFF"), S)
    assert [out.getpixel((x, 0))[0] for x in range(3)] == [0, 127, 255]


# --- frames and orientation ------------------------------------------------------------------------
def _frames():
    return [Image.new("RGB", (32, 24), c) for c in ((255, 0, 0), (0, 255, 0), (0, 0, 255))]


@pytest.mark.parametrize("fmt,kw", [("GIF", {"duration": 50, "loop": 0}),
                                    ("WEBP", {"duration": 50, "lossless": True}),
                                    ("TIFF", {}),
                                    ("PNG", {"duration": 50})])  # APNG
def test_animated_or_multipage_decodes_first_frame(fmt, kw):
    first, *rest = _frames()
    data = encode(first, fmt, save_all=True, append_images=rest, **kw)
    assert getattr(Image.open(io.BytesIO(data)), "n_frames", 1) == 3
    out = decode(data, S)
    assert out.size == (32, 24)
    r, g, b = out.getpixel((16, 12))
    assert r > 240 and g < 15 and b < 15


def _oriented(fmt: str, orientation: int) -> bytes:
    img = Image.new("RGB", (40, 20), (0, 0, 255))
    img.paste((255, 0, 0), (0, 0, 8, 8))  # marker at the stored top-left
    exif = Image.Exif()
    exif[0x0112] = orientation
    return encode(img, fmt, exif=exif)


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP", "TIFF"])
def test_exif_orientation_6_rotates_clockwise(fmt):
    out = decode(_oriented(fmt, 6), S)
    assert out.size == (20, 40)
    r, _, b = out.getpixel((17, 2))  # stored top-left ends at the top-right
    assert r > 200 and b < 60
    r, _, b = out.getpixel((2, 2))
    assert b > 200 and r < 60


def test_exif_orientation_3_rotates_half_turn():
    out = decode(_oriented("JPEG", 3), S)
    assert out.size == (40, 20)
    assert out.getpixel((37, 17))[0] > 200


def test_damaged_exif_keeps_the_image():
    data = bytearray(_oriented("JPEG", 6))
    at = data.find(b"Exif\x00\x00")
    data[at + 6:at + 14] = b"XX\x00\x2a\xff\xff\xff\xff"  # broken TIFF header inside the APP1
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = decode(bytes(data), S)
    assert out.mode == "RGB" and out.size in ((40, 20), (20, 40))


# --- limits ------------------------------------------------------------------------------------
def _fastest(fn, repeat=30) -> float:
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def test_png_declaring_80_million_pixels_fails_in_probe_without_decoding():
    data = png_header_only(1, 80_000_000)
    assert len(data) < 100
    with pytest.raises(TooManyPixels) as exc:
        probe(data, S)
    assert "80000000" in exc.value.message and "50000000" in exc.value.message
    assert exc.value.details["pixels"] == 80_000_000
    with pytest.raises(TooManyPixels):
        decode(data, S)

    def attempt():
        with pytest.raises(TooManyPixels):
            probe(data, S)
    best = _fastest(attempt)
    print(f"\nprobe of an 80M-pixel PNG header: {best * 1e6:.0f} us")
    assert best < 0.005  # a decode of 80M pixels would take seconds


@pytest.mark.parametrize("width,height", [(10_000, 10_000), (20_000, 20_000), (65_535, 65_535)])
def test_pillow_bomb_limits_never_preempt_ours(width, height):
    """Over Pillow's 89M warning and 179M error thresholds: still our TooManyPixels, no warning."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for fn in (probe, decode):
            with pytest.raises(TooManyPixels):
                fn(png_header_only(width, height), S)


def test_raising_max_pixels_above_pillows_limit_is_honoured():
    """With PINFER_MAX_PIXELS above Pillow's own 179M error threshold, only our limit applies."""
    big = S.replace(max_pixels=500_000_000)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert probe(png_header_only(20_000, 20_000), big).pixels == 400_000_000


def test_webp_canvas_size_is_checked_before_libwebp_allocates_it(monkeypatch):
    opened = []
    monkeypatch.setattr(Image, "open", lambda *a, **k: opened.append(a) or pytest.fail("Image.open called"))
    with pytest.raises(TooManyPixels):
        probe(webp_vp8x_header(16_383, 16_383), S)
    with pytest.raises(BadAspectRatio):
        probe(webp_vp8x_header(16_000, 10), S)
    assert opened == []


def test_gif_screen_size_is_checked():
    data = bytearray(encode(Image.new("P", (1, 1)), "GIF"))
    data[6:10] = struct.pack("<HH", 65_535, 65_535)
    with pytest.raises(TooManyPixels):
        probe(bytes(data), S)


@pytest.mark.parametrize("width,height", [(20_000, 1), (1, 20_000), (2_600, 100)])
def test_extreme_strips_fail_cheaply_with_bad_aspect_ratio(width, height):
    data = encode(Image.new("L", (width, height)), "PNG")
    with pytest.raises(BadAspectRatio) as exc:
        probe(data, S)
    assert exc.value.details["max_aspect_ratio"] == 25.0
    with pytest.raises(BadAspectRatio):
        decode(data, S)
    with pytest.raises(BadAspectRatio):
        decode(png_header_only(width, height), S)  # no IDAT to decode: refused from the header


def test_aspect_ratio_at_the_limit_is_accepted():
    assert decode(encode(Image.new("RGB", (1000, 40)), "PNG"), S).size == (1000, 40)


def test_upload_over_max_upload_bytes_is_too_large_before_parsing():
    small = S.replace(max_upload_bytes=1000)
    data = encode(Image.frombytes("L", (40, 40), random.Random(5).randbytes(1600)), "PNG")
    assert len(data) > 1000
    for fn in (probe, decode):
        with pytest.raises(ImageTooLarge) as exc:
            fn(data, small)
        assert exc.value.details == {"bytes": len(data), "max_bytes": 1000}
        with pytest.raises(ImageTooLarge):
            fn(b"\x00" * 1001, small)  # not even an image: size is checked first
    assert probe(encode(Image.new("L", (8, 8)), "PNG"), small).width == 8  # small uploads still pass


def test_probe_of_a_20_mb_file_reads_only_the_header():
    rng = random.Random(3)
    noise = Image.frombytes("RGB", (1200, 900), rng.randbytes(1200 * 900 * 3))
    for fmt in ("JPEG", "PNG", "TIFF", "BMP", "GIF", "WEBP"):
        data = encode(noise, fmt)
        data += bytes(20 * 1024 * 1024 - 4096 - len(data))  # pad to ~20 MB (ignored trailing data)
        assert probe(data, S).width == 1200
        best = _fastest(lambda: probe(data, S), repeat=20)
        print(f"\nprobe {fmt} {len(data) / 2**20:.0f} MB: {best * 1e6:.0f} us")
        assert best < 0.003, fmt


# --- corrupt and unsupported input -------------------------------------------------------------------
@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP", "GIF", "TIFF"])
def test_truncated_file_is_corrupt(fmt):
    rng = random.Random(7)
    noise = Image.frombytes("RGB", (160, 120), rng.randbytes(160 * 120 * 3))
    data = encode(noise, fmt)
    half = data[: len(data) // 2]
    probe(half, S)  # the header is intact: the submit-time check cannot know
    with pytest.raises(CorruptImage) as exc:
        decode(half, S)
    assert exc.value.code == "corrupt_image"


def test_truncated_header_is_corrupt_not_unsupported():
    data = encode(scene(), "PNG")[:20]
    with pytest.raises(CorruptImage):
        probe(data, S)


@pytest.mark.parametrize("data", [
    b"",
    b"hello, this is a text file, not an image\n" * 10,
    random.Random(11).randbytes(4096).replace(b"BM", b"bm"),
    b'<svg xmlns="http://www.w3.org/2000/svg" width="10" height="10"/>',
    b"%PDF-1.7\n%\xe2\xe3\xcf\xd3\n1 0 obj\n<<>>\nendobj\n",
], ids=["empty", "text", "random", "svg", "pdf"])
def test_not_an_image_is_unsupported(data):
    for fn in (probe, decode):
        with pytest.raises(UnsupportedFormat) as exc:
            fn(data, S)
        assert SUPPORTED_TEXT in exc.value.message
        assert exc.value.status == 415


def test_eps_is_unsupported_and_ghostscript_never_runs(monkeypatch):
    data = minimal_eps()
    assert Image.open(io.BytesIO(data)).format == "EPS"  # Pillow alone would take it...
    calls = []

    def spy(*args, **kwargs):
        calls.append(args)
        raise AssertionError("an external program was started")
    for name in ("Popen", "run", "call", "check_call", "check_output"):
        monkeypatch.setattr(subprocess, name, spy)
    from PIL import EpsImagePlugin
    monkeypatch.setattr(EpsImagePlugin, "Ghostscript", spy)
    for fn in (probe, decode):
        with pytest.raises(UnsupportedFormat) as exc:
            fn(data, S)
        assert exc.value.details["detected"] == "PostScript/EPS"
    assert calls == []


def _pillow_only_formats():
    small = scene((32, 32))
    return {
        "ICO": encode(small, "ICO"),
        "PSD": minimal_psd(),
        "PPM": encode(small, "PPM"),
        "PCX": encode(small, "PCX"),
        "SGI": encode(small, "SGI"),
        "DDS": encode(small.convert("RGBA"), "DDS"),
        "QOI": encode(small, "QOI"),
    }


@pytest.mark.parametrize("fmt", sorted(_pillow_only_formats()))
def test_formats_pillow_reads_but_pinfer_refuses(fmt):
    data = _pillow_only_formats()[fmt]
    assert Image.open(io.BytesIO(data)).format == fmt  # ...so only our restriction refuses it
    for fn in (probe, decode):
        with pytest.raises(UnsupportedFormat):
            fn(data, S)


def test_bmp_magic_without_a_bmp_is_corrupt():
    with pytest.raises(CorruptImage):
        probe(b"BM" + bytes(100), S)


# --- fuzz --------------------------------------------------------------------------------------
def _mutate(rng: random.Random, data: bytes) -> bytes:
    b = bytearray(data)
    kind = rng.randrange(5)
    if kind == 0:  # flip a few bytes
        for _ in range(rng.randint(1, 8)):
            b[rng.randrange(len(b))] = rng.randrange(256)
    elif kind == 1:  # truncate
        del b[rng.randrange(1, len(b)):]
    elif kind == 2:  # insert junk
        at = rng.randrange(len(b))
        b[at:at] = rng.randbytes(rng.randint(1, 64))
    elif kind == 3:  # smash the header region (sizes, tables)
        for _ in range(rng.randint(1, 4)):
            b[rng.randrange(min(len(b), 64))] = rng.choice((0, 0xFF, rng.randrange(256)))
    else:  # duplicate a slice
        i = rng.randrange(len(b))
        j = min(len(b), i + rng.randint(1, 256))
        b[j:j] = b[i:j]
    return bytes(b)


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "GIF", "WEBP", "TIFF", "BMP"])
def test_fuzzed_bytes_only_ever_raise_image_errors(fmt):
    rng = random.Random(20240601)
    base = encode(scene((48, 32)), fmt, **({"quality": 80} if fmt == "JPEG" else {}))
    limits = S.replace(max_pixels=2_000_000)  # a mutated header may declare up to this: keep it quick
    outcomes: dict[str, int] = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Pillow warns about odd metadata; only exceptions matter
        for _ in range(200):
            data = _mutate(rng, base)
            try:
                out = decode(data, limits)
            except ImageError as exc:
                outcomes[exc.code] = outcomes.get(exc.code, 0) + 1
                continue
            assert out.mode == "RGB" and out.width * out.height <= 2_000_000
            outcomes["ok"] = outcomes.get("ok", 0) + 1
    print(f"\nfuzz {fmt}: {outcomes}")


# --- process hygiene ---------------------------------------------------------------------------
def test_module_needs_neither_numpy_nor_torch():
    code = "import sys, shared.images; print(sorted(m for m in ('numpy', 'torch') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_pillow_bomb_check_is_disabled_in_favour_of_ours():
    assert Image.MAX_IMAGE_PIXELS is None
