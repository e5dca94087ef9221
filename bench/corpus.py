"""The images every benchmark sends: the photo corpus, or deterministic synthetic JPEGs without it.

Every benchmark of one run uses the same list, so their figures compare. Without the corpus the
run says so loudly (first line of output and ``meta.corpus_synthetic`` in the JSON): synthetic
figures are not comparable with corpus figures.
"""
from __future__ import annotations

import io
import os
from dataclasses import dataclass
from pathlib import Path

from pinfer_client.ingest import IMAGE_SUFFIXES  # the one list of what counts as an image file
from shared.settings import PROJECT_ROOT


# --------------------------------------------------------------------------------------- images
@dataclass(frozen=True)
class BenchImage:
    name: str
    data: bytes
    width: int = 0
    height: int = 0

    @property
    def is_jpeg(self) -> bool:
        return self.data[:3] == b"\xff\xd8\xff"


@dataclass
class Corpus:
    images: list[BenchImage]
    source: str          # folder, or "synthetic"
    synthetic: bool

    def __len__(self) -> int:
        return len(self.images)

    def describe(self) -> str:
        mb = sum(len(i.data) for i in self.images) / 1e6
        # relative to the checkout, so committed results never name this machine's paths
        kind = ("SYNTHETIC JPEGs (photo corpus absent)" if self.synthetic
                else f"photos from {os.path.relpath(self.source, PROJECT_ROOT)}")
        return f"{len(self.images)} {kind}, {mb:.1f} MB"

    def mid_jpeg(self) -> BenchImage:
        """The JPEG of median byte size (the `latency` image)."""
        jpegs = sorted((i for i in self.images if i.is_jpeg), key=lambda i: (len(i.data), i.name))
        return (jpegs or sorted(self.images, key=lambda i: len(i.data)))[len(jpegs or self.images) // 2]

    def repeated(self, n: int) -> list[BenchImage]:
        """``n`` images, the corpus cycled, each with a unique name ``copy{i}/{file}``."""
        out = []
        for k in range(n):
            img = self.images[k % len(self.images)]
            out.append(BenchImage(f"copy{k // len(self.images)}/{img.name}", img.data, img.width, img.height))
        return out


def corpus_dir() -> Path:
    return Path(os.environ.get("PINFER_CORPUS_DIR") or PROJECT_ROOT.parent / "shared" / "corpus" / "photos")


def load_corpus(folder: Path | None = None, synthetic_n: int = 141) -> Corpus:
    """The photo corpus, or ``synthetic_n`` synthetic JPEGs (deterministic) when it is absent."""
    folder = Path(folder) if folder else corpus_dir()
    if folder.is_dir():
        paths = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if paths:
            from PIL import Image

            imgs = []
            for p in paths:
                data = p.read_bytes()
                try:
                    with Image.open(io.BytesIO(data)) as im:
                        w, h = im.size
                except Exception:
                    w = h = 0
                imgs.append(BenchImage(p.name, data, w, h))
            return Corpus(imgs, str(folder), False)
    return Corpus(synthetic_images(synthetic_n), "synthetic", True)


def synthetic_images(n: int = 141, seed: int = 0) -> list[BenchImage]:
    """Photo-like JPEGs (smooth gradients + noise, q=90) in the corpus's usual sizes."""
    import numpy as np
    from PIL import Image

    sizes = [(640, 480), (500, 375), (1024, 768), (800, 600), (375, 500), (1600, 1200), (320, 240),
             (2048, 1536), (500, 333), (1280, 720)]
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        w, h = sizes[i % len(sizes)]
        yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
        base = np.stack([(xx / w) * 255, (yy / h) * 255, ((xx + yy) / (w + h)) * 255], axis=-1)
        base = base * rng.uniform(0.3, 1.0, size=3) + rng.normal(0, 18, size=(h, w, 3))
        img = Image.fromarray(np.clip(base, 0, 255).astype(np.uint8), "RGB")
        buf = io.BytesIO()
        img.save(buf, "JPEG", quality=90)
        out.append(BenchImage(f"synthetic_{i:03d}_{w}x{h}.jpg", buf.getvalue(), w, h))
    return out


def materialize(corpus: "Corpus", folder: Path) -> Path:
    """A folder holding exactly the corpus's bytes (the synthetic images written out once), for child
    processes and for int8 calibration."""
    if not corpus.synthetic:
        return Path(corpus.source)
    folder = Path(folder)
    if not folder.is_dir():
        folder.mkdir(parents=True)
        for im in corpus.images:
            (folder / im.name).write_bytes(im.data)
    return folder
