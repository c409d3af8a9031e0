"""Image reading and writing: RGB uint8 arrays, square centre crops, atomic PNG writes.

16-bit images (PNG ``I;16``, 32-bit integer ``I``) are scaled to 8 bits (``value / 257``), not clipped to
white; a decompression bomb (more pixels than Pillow's ``MAX_IMAGE_PIXELS`` allows) is an unreadable image."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from anonrisk.errors import DataError
from anonrisk.stages import atomic_path


#: what Pillow raises for a file it cannot decode (a decompression bomb is not an OSError)
UNREADABLE = (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError)


def to_rgb(im: Image.Image) -> Image.Image:
    """RGB with 8 bits per channel; integer modes wider than 8 bits are scaled, not clipped."""
    if im.mode.startswith("I"):  # "I;16", "I;16B", "I" (32-bit): 16-bit grey PNGs open as one of them
        a = np.asarray(im).astype(np.float64)
        peak = 65535.0 if im.mode.startswith("I;16") or a.max(initial=0) <= 65535 else float(a.max())
        im = Image.fromarray(np.clip(np.rint(a * (255.0 / peak)), 0, 255).astype(np.uint8), "L")
    return im.convert("RGB")


def load_image(path: str | os.PathLike, size: int | None = None) -> np.ndarray:
    """Read an image as RGB uint8 (H, W, 3); with ``size``, centre-crop to a square and resize."""
    try:
        with Image.open(path) as im:
            im = to_rgb(im)
            if size is not None:
                im = fit_square(im, size)
            return np.asarray(im, dtype=np.uint8).copy()
    except FileNotFoundError:
        raise DataError(f"image not found: {path}") from None
    except UNREADABLE as exc:
        raise DataError(f"unreadable image {path}: {exc}") from None


def fit_square(im: Image.Image, size: int) -> Image.Image:
    """The centre square of ``im`` resized to ``size`` (how every image is read at the working size)."""
    w, h = im.size
    side = min(w, h)
    left, top = (w - side) // 2, (h - side) // 2
    im = im.crop((left, top, left + side, top + side))
    return im.resize((size, size), Image.BICUBIC) if side != size else im


def load_batch(paths: list[str], size: int) -> np.ndarray:
    return np.stack([load_image(p, size) for p in paths]) if paths else np.zeros((0, size, size, 3), np.uint8)


def save_image(path: str | os.PathLike, image: np.ndarray) -> None:
    """Write a PNG atomically: a reader sees the whole file or none."""
    with atomic_path(path) as tmp:
        Image.fromarray(image).save(tmp, format="PNG")


def is_readable(path: str | os.PathLike) -> str | None:
    """None if ``path`` decodes fully, else the reason."""
    try:
        with Image.open(path) as im:
            im.load()
        return None
    except FileNotFoundError:
        return "file not found"
    except UNREADABLE as exc:
        return str(exc) or type(exc).__name__


def image_tree(root: str | os.PathLike, exts) -> list[tuple[str, Path]]:
    """Every file under ``root`` whose extension (any case) is in ``exts``, as (POSIX path relative to root,
    path), sorted; hidden files and folders (``.cache``, ``.ipynb_checkpoints``) skipped, folder links not followed."""
    root = Path(root)
    out = []
    for folder, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for f in files:
            if not f.startswith(".") and os.path.splitext(f)[1].lower() in exts:
                path = Path(folder, f)
                out.append((path.relative_to(root).as_posix(), path))
    return sorted(out)
