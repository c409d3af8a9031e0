"""Image reading and writing: RGB uint8 arrays, square centre crops, atomic PNG writes."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from anonrisk.errors import DataError
from anonrisk.stages import atomic_path


def load_image(path: str | os.PathLike, size: int | None = None) -> np.ndarray:
    """Read an image as RGB uint8 (H, W, 3); with ``size``, centre-crop to a square and resize."""
    try:
        with Image.open(path) as im:
            im = im.convert("RGB")
            if size is not None:
                im = fit_square(im, size)
            return np.asarray(im, dtype=np.uint8).copy()
    except FileNotFoundError:
        raise DataError(f"image not found: {path}") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
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
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
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
