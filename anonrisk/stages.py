"""Fingerprinted stage directories with DONE markers and atomic writes.

Every stage writes into ``<runs_dir>/<stage>/<fingerprint>/``. The fingerprint hashes the stage's config
and the fingerprints of its inputs, so identical work lands in the same directory: a rerun of a finished
stage is free, a grid deduplicates by itself, and a killed stage resumes from what it left.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import secrets
from pathlib import Path
from typing import Any, Iterator

DONE = "DONE"


def fingerprint(*parts: Any, length: int = 12) -> str:
    """Stable short hash of JSON-serialisable parts (key order does not matter)."""
    blob = json.dumps(parts, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:length]


def record_seed(global_seed: int, record_id: str) -> int:
    """The seed of one record's randomness: depends only on (global seed, record id), never on batching,
    sharding or worker, so a sharded run reproduces a single-process run image for image."""
    digest = hashlib.sha256(f"{global_seed}:{record_id}".encode()).digest()
    return int.from_bytes(digest[:4], "little")


def _create_temp_beside(path: Path) -> Path:
    """A new empty file beside ``path``, created with mode 0666 so the user's umask decides its final mode
    (``tempfile.mkstemp`` makes every file 0600: colleagues on a shared cluster could not read results)."""
    for _ in range(100):
        tmp = path.parent / f".{path.name}.{secrets.token_hex(6)}.tmp"
        try:
            os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
            return tmp
        except FileExistsError:
            continue
    raise FileExistsError(f"cannot create a temporary file beside {path}")


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it into place only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp_path = _create_temp_beside(path)
    try:
        yield tmp_path
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def write_json(path: str | os.PathLike, obj: Any) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def read_json(path: str | os.PathLike) -> Any:
    return json.loads(Path(path).read_text())


class StageDir:
    """A stage's output directory: ``is_done`` after ``mark_done``; ``config.json`` records what made it."""

    def __init__(self, root: str | os.PathLike, stage: str, *fp_parts: str):
        self.stage = stage
        self.fingerprint = "/".join(fp_parts)
        self.path = Path(root, stage, *fp_parts)

    def __truediv__(self, name: str) -> Path:
        return self.path / name

    def is_done(self) -> bool:
        return (self.path / DONE).exists()

    def begin(self, config: Any) -> "StageDir":
        self.path.mkdir(parents=True, exist_ok=True)
        write_json(self.path / "config.json", config)
        return self

    def mark_done(self, summary: Any = None) -> None:
        """Write DONE: the stage's summary plus ``made_by``, the program that made it (results say how
        every reused stage was made, not only the last report)."""
        from anonrisk.environment import made_by

        summary = dict(summary or {})
        summary.setdefault("made_by", made_by())
        write_json(self.path / DONE, summary)

    def __repr__(self) -> str:
        return f"StageDir({self.stage}:{self.fingerprint})"
