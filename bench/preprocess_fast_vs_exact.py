"""Time and compare PINFER_RESIZE=exact and =fast over a folder of photos.

    python -m bench.preprocess_fast_vs_exact [FOLDER] [--repeat N] [--by-photo]

FOLDER defaults to $PINFER_CORPUS_DIR or ../shared/corpus/photos. Prints per-image time of each
mode (best of N, single thread) and the mean |fast - exact| of the normalised tensors, the figures
quoted in the README.
"""
from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import numpy as np

from shared.settings import PROJECT_ROOT, Settings
from shared.transforms import preprocess

SUFFIXES = {".jpg", ".jpeg", ".png", ".tif", ".tiff", ".webp", ".gif", ".bmp"}


def _best(fn, repeat: int) -> tuple[np.ndarray, float]:
    best, out = float("inf"), None
    for _ in range(repeat):
        t = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t)
    return out, best


def main(argv: list[str] | None = None) -> None:
    default = os.environ.get("PINFER_CORPUS_DIR") or str(PROJECT_ROOT.parent / "shared" / "corpus" / "photos")
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", nargs="?", default=default)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--by-photo", action="store_true", help="one line per photo")
    args = parser.parse_args(argv)

    photos = sorted(p for p in Path(args.folder).iterdir() if p.suffix.lower() in SUFFIXES)
    if not photos:
        raise SystemExit(f"no photos in {args.folder}")
    exact_s, fast_s = Settings(), Settings().replace(resize="fast")
    preprocess(photos[0].read_bytes(), exact_s)  # warm-up (plugin imports)
    t_exact = t_fast = 0.0
    diffs, touched = [], 0
    for path in photos:
        data = path.read_bytes()
        exact, te = _best(lambda: preprocess(data, exact_s), args.repeat)
        fast, tf = _best(lambda: preprocess(data, fast_s), args.repeat)
        diff = float(np.abs(fast - exact).mean())
        t_exact, t_fast = t_exact + te, t_fast + tf
        diffs.append(diff)
        touched += diff > 0
        if args.by_photo:
            print(f"{path.name:48s} exact {te * 1e3:7.1f} ms  fast {tf * 1e3:7.1f} ms  mean|diff| {diff:.4f}")
    n = len(photos)
    print(f"{n} photos, {touched} decoded at reduced scale in fast mode")
    print(f"exact: {t_exact / n * 1e3:.1f} ms/image   fast: {t_fast / n * 1e3:.1f} ms/image   "
          f"speed-up {t_exact / t_fast:.2f}x")
    print(f"mean |fast - exact| (normalised tensor): corpus mean {np.mean(diffs):.4f}, "
          f"worst photo {np.max(diffs):.4f}")


if __name__ == "__main__":
    main()
