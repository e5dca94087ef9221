"""Finding the images to classify: which files count, and the name each gets in the job and in ``--out``."""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from pinfer_client.ingest.summary import UsageError
from pinfer_client.sdk import wire_name

#: What counts as an image (by suffix, case-insensitive); everything else is skipped and counted.
IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff"})


@dataclass(frozen=True)
class ImageFile:
    """One image to classify: ``name`` is the name it has in the job and in ``--out``."""

    name: str
    path: Path


def scan_paths(paths: Sequence[str | os.PathLike]) -> tuple[list[ImageFile], int]:
    """Images under ``paths`` (folders walked recursively, sorted) and the count of skipped
    non-image files. Names are relative to the PATH they were found under, prefixed by that
    PATH's basename when several PATHs are given, so they stay unique."""
    if not paths:
        raise UsageError("no PATH given")
    unique: dict[Path, str | os.PathLike] = {}
    for raw in paths:  # the same PATH given twice counts once
        unique.setdefault(Path(raw).resolve(), raw)
    several = len(unique) > 1
    images: dict[str, ImageFile] = {}
    skipped = 0
    for raw in unique.values():
        root = Path(raw)
        if not root.exists():
            raise UsageError(f"{raw}: no such file or folder")
        found: list[tuple[str, Path]] = []
        if root.is_dir():
            prefix = (root.resolve().name + "/") if several else ""
            for folder, dirs, files in os.walk(root):
                dirs.sort()
                for fname in files:
                    path = Path(folder) / fname
                    if path.suffix.lower() in IMAGE_SUFFIXES:
                        found.append((prefix + path.relative_to(root).as_posix(), path))
                    else:
                        skipped += 1
        elif root.suffix.lower() in IMAGE_SUFFIXES:
            found.append((root.name, root))
        else:
            skipped += 1
        for rel, path in sorted(found):
            name = wire_name(rel)
            other = images.get(name)
            if other is not None:
                if other.path.resolve() == path.resolve():
                    continue  # the same file given twice
                raise UsageError(f"two files would get the same name {name!r}: {other.path} and {path}; "
                                 "ingest them separately or rename a folder")
            images[name] = ImageFile(name, path)
    return list(images.values()), skipped
