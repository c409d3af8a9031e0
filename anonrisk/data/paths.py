"""Record ids and path safety, for every dataset kind (built-in or a plugin's).

A record id is the POSIX path of the image relative to its dataset root, extension included
(``img_align_celeba/000001.jpg``, ``Ada_Lovelace/Ada_Lovelace_0001.jpg``): unique by construction, where file
stems are not (``000001.jpg`` and ``000001.png`` are two records). The id seeds the record's randomness and
names its outputs (``anonymize/.../images/<id>.png``), so it must never climb out of a directory: paths read
from a dataset's index files go through ``join_under``, and the prepare stage checks every id with
``check_record_id`` and their uniqueness with ``check_unique_ids``.
"""

from __future__ import annotations

import os
import posixpath
from pathlib import Path, PurePosixPath
from typing import Iterable

from anonrisk.errors import DataError


def record_id(path: str | os.PathLike, root: str | os.PathLike) -> str:
    """The id of the image at ``path``: its POSIX path relative to ``root`` (lexically: symlinks inside a
    dataset are its owner's choice). DataError if ``path`` is not under ``root``."""
    rel = os.path.relpath(os.path.abspath(path), os.path.abspath(root))
    if rel == os.curdir or rel == os.pardir or rel.startswith(os.pardir + os.sep) or os.path.isabs(rel):
        raise DataError(f"{path}: not inside the dataset root {root}")
    return PurePosixPath(Path(rel)).as_posix()


def join_under(root: str | os.PathLike, relative: str, where: str = "") -> Path:
    """``root / relative`` for a path read from a dataset's index file; DataError (naming ``where``, e.g.
    ``identity_CelebA.txt:12``) when it is absolute or its ``..`` lead out of ``root``."""
    norm = posixpath.normpath(relative.replace("\\", "/"))
    if not relative or os.path.isabs(relative) or PurePosixPath(relative).is_absolute() or norm == ".." or norm.startswith("../") \
            or norm == ".":
        prefix = f"{where}: " if where else ""
        raise DataError(f"{prefix}path {relative!r} leads outside the dataset root {root}")
    return Path(root, *PurePosixPath(norm).parts)


def check_record_id(record_id: str, where: str = "") -> str:
    """``record_id`` if it is a clean relative POSIX path (no ``..``, ``.``, empty part, leading ``/`` or
    backslash), else a DataError: outputs are named after ids, so an id must never climb out."""
    parts = record_id.split("/")
    if not record_id or "\\" in record_id or record_id.startswith("/") or any(p in ("", ".", "..") for p in parts) or "\0" in record_id:
        prefix = f"{where}: " if where else ""
        raise DataError(f"{prefix}record id {record_id!r} is not a relative path inside the dataset "
                        "(ids are the image's POSIX path relative to the dataset root)")
    return record_id


def check_unique_ids(items: Iterable, where: str = "") -> None:
    """Items (anything with ``id`` and ``path``) must have distinct ids; a clash names both files."""
    seen: dict[str, str] = {}
    prefix = f"{where}: " if where else ""
    for it in items:
        if it.id in seen:
            raise DataError(f"{prefix}two images have the record id {it.id!r}: {seen[it.id]} and {it.path}")
        seen[it.id] = it.path
