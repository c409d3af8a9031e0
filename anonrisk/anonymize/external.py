"""What the anonymizers whose outputs are made outside anonrisk share (``precomputed``, ``command``):

- outputs found by a record's relative path with any common image extension (an index of a folder, built by
  walking it, so a record id can never point outside it);
- record ids as flat, safe file names and back (ids are relative paths: ``person/img.jpg``);
- an output whose size differs from what was expected, resized with a warning or refused;
- a content digest of a folder of outputs (sha256 of every image file), cached by file status so that
  planning a run again costs one ``stat`` per file, not a read.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Optional
from urllib.parse import unquote

from PIL import Image

from anonrisk.data.io import image_tree
from anonrisk.errors import DataError
from anonrisk.stages import atomic_path

log = logging.getLogger("anonrisk")

#: extensions an output may have (any case)
OUTPUT_EXTS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff", ".ppm", ".pgm")
_SAFE = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_")
MAX_NAME = 200  # longer escaped ids become a hash (file systems allow 255 bytes per name)


def strip_image_ext(rel: str) -> str:
    """``person/img.jpg`` -> ``person/img``; a name without an image extension is returned as it is."""
    stem, ext = os.path.splitext(rel)
    return stem if ext.lower() in OUTPUT_EXTS else rel


def image_files(root: Path) -> list[tuple[str, Path]]:
    """Every output image under ``root`` as (POSIX path relative to root, path), sorted (``io.image_tree``)."""
    return image_tree(root, OUTPUT_EXTS)


def output_index(root: Path) -> dict[str, list[Path]]:
    """Relative path without extension -> the image files there (more than one: ambiguous)."""
    index: dict[str, list[Path]] = {}
    for rel, path in image_files(root):
        index.setdefault(strip_image_ext(rel), []).append(path)
    return index


def flat_name(record_id: str) -> str:
    """A record id as one safe file name without dots: every character but letters, digits, ``-`` and ``_``
    becomes ``%XX`` (its UTF-8 bytes), so ``person/img.jpg`` is ``person%2Fimg%2Ejpg``; ``record_id`` undoes
    it. An escaped id longer than ``MAX_NAME`` is replaced by ``id-<sha256 of the id>`` (only the index file
    maps it back)."""
    out = "".join(c if c in _SAFE else "".join(f"%{b:02X}" for b in c.encode()) for c in record_id)
    return out if len(out) <= MAX_NAME else "id-" + hashlib.sha256(record_id.encode()).hexdigest()[:40]


def record_id(name: str) -> str:
    """The record id of an escaped name (``flat_name``'s inverse, except for hashed long ids)."""
    return unquote(name)


def fit_output(im: Image.Image, want: tuple[int, int], policy: str, what: str) -> tuple[Image.Image, bool]:
    """``im`` at size ``want`` (width, height): as it is, resized (``policy`` "resize"; returns True), or a
    DataError naming ``what`` (``policy`` "fail")."""
    if im.size == tuple(want):
        return im, False
    if policy == "fail":
        raise DataError(f"{what}: size {im.size[0]}x{im.size[1]}, expected {want[0]}x{want[1]} "
                        "(params.size_mismatch: resize accepts it, resized)")
    return im.resize(tuple(want), Image.BICUBIC), True


# ---- content digest -------------------------------------------------------------------------------------
def cache_dir() -> Path:
    """Where anonrisk keeps small caches: ``$ANONRISK_CACHE_DIR``, else ``$XDG_CACHE_HOME/anonrisk``, else
    ``~/.cache/anonrisk``."""
    if os.environ.get("ANONRISK_CACHE_DIR"):
        return Path(os.environ["ANONRISK_CACHE_DIR"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "anonrisk"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def folder_digest(root: Path, threads: int = 8) -> tuple[str, int]:
    """(digest of every image file's relative path and sha256 under ``root``, number of files). A file whose
    size, mtime, ctime and inode are those of the cache's entry is not read again (ctime changes on every
    write and cannot be set back, so a file rewritten with its old mtime is still read)."""
    root = Path(root).resolve()
    cache = cache_dir() / "content" / (hashlib.sha256(str(root).encode()).hexdigest()[:24] + ".json")
    try:
        old = json.loads(cache.read_text()) if cache.exists() else {}
    except (OSError, ValueError):
        old = {}
    files = image_files(root)
    status = {}
    for rel, path in files:
        st = path.stat()
        status[rel] = [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino]
    known = {rel: old[rel][4] for rel in status if isinstance(old.get(rel), list) and old[rel][:4] == status[rel]}
    todo = [(rel, path) for rel, path in files if rel not in known]
    with ThreadPoolExecutor(max(1, min(threads, len(todo)))) as pool:
        known.update(zip([rel for rel, _ in todo], pool.map(_sha256, [p for _, p in todo])))
    new = {rel: status[rel] + [known[rel]] for rel in status}
    if new != old:
        try:
            cache.parent.mkdir(parents=True, exist_ok=True)
            with atomic_path(cache) as tmp:
                tmp.write_text(json.dumps(new))
        except OSError as exc:  # a read-only home: the digest is still right, only slower next time
            log.debug("content cache %s not written: %s", cache, exc)
    h = hashlib.sha256()
    for rel, _ in files:
        h.update(f"{rel}\0{known[rel]}\n".encode())
    return h.hexdigest()[:16], len(files)


def find_output(index: dict[str, list[Path]], rel: str) -> tuple[Optional[Path], Optional[str]]:
    """(the output of relative path ``rel``, None) or (None, why there is none)."""
    found = index.get(strip_image_ext(rel), [])
    if not found:
        return None, "no output file"
    if len(found) > 1:
        return None, f"ambiguous: {', '.join(p.name for p in found)}"
    return found[0], None
