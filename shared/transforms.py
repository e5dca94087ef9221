"""Image bytes -> the normalised float32 tensor ResNet-18 expects, without torch.

``exact`` reproduces torchvision's ImageNet evaluation pipeline on PIL images, so predictions match
what the model was trained and validated with::

    Resize(256) -> CenterCrop(224) -> ToTensor() -> Normalize(MEAN, STD)

``fast`` decodes large JPEGs at 1/2, 1/4 or 1/8 scale first (libjpeg's DCT scaling, keeping the
shorter side >= 256) and then runs the same steps; other images are processed exactly. Numbers for
the difference and the speed-up are in the README (measured by tests/unit/test_preprocess_corpus.py).

The worker pays for numpy here; the API never imports this module (it only probes, see images.py).
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
from PIL import Image

from shared.images import decode
from shared.settings import Settings

MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
STD: tuple[float, float, float] = (0.229, 0.224, 0.225)
INPUT_SIZE = 224
RESIZE = 256
RESIZE_MODES = ("exact", "fast")


def preprocess(data: bytes, settings: Settings, *, out: np.ndarray | None = None, resize: int = RESIZE,
               input_size: int = INPUT_SIZE, mean: Sequence[float] = MEAN,
               std: Sequence[float] = STD) -> np.ndarray:
    """Decode ``data`` and return its (3, input_size, input_size) float32 tensor, in the
    ``settings.resize`` mode. Raises ``shared.errors.ImageError`` subclasses for bad images.

    ``out``: a float32 (3, input_size, input_size) C-contiguous array (e.g. ``batch[i]``) to write
    into instead of allocating. ``resize``/``input_size``/``mean``/``std`` default to the ImageNet
    values and exist so a worker can take them from the model manifest.
    """
    if settings.resize not in RESIZE_MODES:
        raise ValueError(f"resize mode must be one of {', '.join(RESIZE_MODES)}, not {settings.resize!r}")
    draft_to = resize if settings.resize == "fast" else None
    img = decode(data, settings, draft_to=draft_to)
    return preprocess_image(img, out=out, resize=resize, input_size=input_size, mean=mean, std=std)


def preprocess_image(img: Image.Image, *, out: np.ndarray | None = None, resize: int = RESIZE,
                     input_size: int = INPUT_SIZE, mean: Sequence[float] = MEAN,
                     std: Sequence[float] = STD) -> np.ndarray:
    """The part after decoding: resize the shorter side, centre-crop, scale to 0..1, normalise.

    Cropping happens on the PIL image, so numpy only ever sees input_size x input_size pixels.
    """
    if img.mode != "RGB":
        img = img.convert("RGB")
    img = center_crop(resize_shorter(img, resize), input_size)
    pixels = np.asarray(img)  # (H, W, 3) uint8, one copy
    if out is None:
        out = np.empty((3, input_size, input_size), dtype=np.float32)
    elif out.shape != (3, input_size, input_size) or out.dtype != np.float32 or not out.flags.c_contiguous:
        raise ValueError(f"out must be a C-contiguous float32 array of shape (3, {input_size}, {input_size})")
    # ToTensor then Normalize, in torchvision's order and precision (float32 throughout), in place.
    np.copyto(out, pixels.transpose(2, 0, 1), casting="unsafe")
    out /= np.float32(255)
    out -= np.asarray(mean, dtype=np.float32).reshape(3, 1, 1)
    out /= np.asarray(std, dtype=np.float32).reshape(3, 1, 1)
    return out


def resize_shorter(img: Image.Image, size: int = RESIZE) -> Image.Image:
    """torchvision ``Resize(size)`` on a PIL image: the shorter side becomes ``size``, the longer
    ``int(size * long / short)`` (truncated), bilinear with Pillow's default antialiasing support
    and no ``reducing_gap`` (torchvision passes none)."""
    w, h = img.size
    short, long = (w, h) if w <= h else (h, w)
    new_short, new_long = size, int(size * long / short)
    new_w, new_h = (new_short, new_long) if w <= h else (new_long, new_short)
    if (new_w, new_h) == (w, h):
        return img
    return img.resize((new_w, new_h), Image.Resampling.BILINEAR)


def center_crop(img: Image.Image, size: int = INPUT_SIZE) -> Image.Image:
    """torchvision ``CenterCrop(size)``: offsets ``int(round((len - size) / 2))`` (Python's
    round-half-even); a side shorter than ``size`` is padded with black, ``(size - len) // 2``
    before it, as torchvision pads. PIL's crop fills outside the image with zeros."""
    w, h = img.size
    if (w, h) == (size, size):
        return img
    left, top = _crop_start(w, size), _crop_start(h, size)
    return img.crop((left, top, left + size, top + size))


def _crop_start(length: int, size: int) -> int:
    if length < size:
        return -((size - length) // 2)
    return int(round((length - size) / 2.0))


__all__ = ["MEAN", "STD", "INPUT_SIZE", "RESIZE", "RESIZE_MODES", "preprocess", "preprocess_image",
           "resize_shorter", "center_crop"]
