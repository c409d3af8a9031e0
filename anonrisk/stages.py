"""Fingerprinted stage directories with DONE markers and atomic writes.

Every stage writes into ``<runs_dir>/<stage>/<fingerprint>/``. The fingerprint hashes the stage's config
and the fingerprints of its inputs, so identical work lands in the same directory: a rerun of a finished
stage is free, a grid deduplicates by itself, and a killed stage resumes from what it left.

DONE records the size and SHA-256 of the stage's outputs; ``reuse`` checks them, so a finished stage whose
files were changed afterwards is an error naming the file, never silently other numbers. One process at a
time works in a stage: ``lock`` (an ``flock`` on ``<runs_dir>/.locks/<stage>/<fingerprint>.lock``) makes a
second one wait and then reuse the finished stage. A full disk while writing is a DataError naming the path.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import os
import secrets
import socket
import threading
from pathlib import Path
from typing import Any, Iterable, Iterator

DONE = "DONE"
log = logging.getLogger("anonrisk")
#: the errors of a full disk or an exhausted quota
DISK_FULL = (errno.ENOSPC, errno.EDQUOT)


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


def disk_full(path: str | os.PathLike) -> "DataError":
    from anonrisk.errors import DataError

    return DataError(f"no space left on the device writing {path}: free space and rerun (finished stages and checkpoints are kept)")


def out_of_space(path: str | os.PathLike) -> bool:
    """Whether the filesystem holding ``path`` has (almost) no space left: libraries that write through C++
    streams (torch.save) report a full disk as a bare RuntimeError."""
    p = Path(os.path.abspath(path))
    while not p.exists() and p != p.parent:
        p = p.parent
    try:
        st = os.statvfs(p)
    except OSError:
        return False
    return st.f_bavail * st.f_frsize < (1 << 16)


@contextlib.contextmanager
def names_full_disk(path: str | os.PathLike) -> Iterator[None]:
    """A full disk (or quota) inside the block becomes a DataError naming ``path``."""
    try:
        yield
    except OSError as exc:
        if exc.errno in DISK_FULL:
            raise disk_full(path) from None
        raise
    except RuntimeError:
        if out_of_space(path):
            raise disk_full(path) from None
        raise


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it into place only if the block succeeds."""
    path = Path(path)
    with names_full_disk(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp_path = _create_temp_beside(path)
        try:
            try:
                yield tmp_path
                os.replace(tmp_path, path)
            except RuntimeError:
                if out_of_space(tmp_path):  # checked before the temporary file frees its space
                    raise disk_full(path) from None
                raise
        finally:
            if tmp_path.exists():
                tmp_path.unlink()


def write_json(path: str | os.PathLike, obj: Any) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def read_json(path: str | os.PathLike) -> Any:
    return json.loads(Path(path).read_text())


def file_digest(path: str | os.PathLike) -> dict[str, Any]:
    """``{"size", "sha256"}`` of a file."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return {"size": os.path.getsize(path), "sha256": h.hexdigest()}


def changed(path: Path, recorded: dict[str, Any], full: bool = True) -> str | None:
    """Why ``path`` no longer matches its recorded digest (None: it does); ``full=False`` compares sizes only."""
    if not path.is_file():
        return "missing"
    size = path.stat().st_size
    if size != recorded.get("size"):
        return f"{size} bytes, recorded {recorded.get('size')}"
    if full and recorded.get("sha256") and file_digest(path)["sha256"] != recorded["sha256"]:
        return "content differs from the recorded SHA-256"
    return None


# ---- one writer per stage ------------------------------------------------------------------------
_held: dict[str, list] = {}  # lock path -> [open file, depth]: a process may take a lock it holds again
_held_guard = threading.Lock()


@contextlib.contextmanager
def file_lock(path: str | os.PathLike, what: str = "") -> Iterator[None]:
    """An exclusive ``flock`` on ``path`` (created), waiting for another process that holds it; re-entrant in
    one process. The kernel drops it when the holder dies, even by SIGKILL: no stale lock to clean up. On
    NFS, Linux maps flock to NFS byte-range locks (NLM on v3, the protocol's own on v4), so it holds across
    nodes unless the mount says ``nolock`` or ``local_lock=flock``; a dead node's lock lasts until its lease
    expires (about 90 s on v4)."""
    import fcntl

    key = os.path.abspath(path)
    with _held_guard:
        if key in _held:
            _held[key][1] += 1
            entry = _held[key]
        else:
            entry = None
    if entry is not None:
        try:
            yield
        finally:
            with _held_guard:
                entry[1] -= 1
        return
    with names_full_disk(key):
        Path(key).parent.mkdir(parents=True, exist_ok=True)
        f = open(key, "a+")
    try:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "another process"
            log.info("waiting for %s: %s is working on it", what or key, holder)
            fcntl.flock(f, fcntl.LOCK_EX)
        with contextlib.suppress(OSError):  # who holds it, for the next one's message (a full disk may refuse)
            f.seek(0)
            f.truncate()
            f.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
            f.flush()
        with _held_guard:
            _held[key] = [f, 1]
        try:
            yield
        finally:
            with _held_guard:
                _held.pop(key, None)
    finally:
        f.close()  # closing drops the flock


class StageDir:
    """A stage's output directory: ``is_done`` after ``mark_done``; ``config.json`` records what made it."""

    def __init__(self, root: str | os.PathLike, stage: str, *fp_parts: str):
        self.stage = stage
        self.fingerprint = "/".join(fp_parts)
        self.root = Path(root)
        self.path = Path(root, stage, *fp_parts)

    def __truediv__(self, name: str) -> Path:
        return self.path / name

    def is_done(self) -> bool:
        return (self.path / DONE).exists()

    @property
    def lock_path(self) -> Path:
        return self.root / ".locks" / self.stage / f"{self.fingerprint}.lock"

    def lock(self) -> contextlib.AbstractContextManager:
        """Hold this stage for one process: another one waits here until it is released (then finds it DONE
        and reuses it). Outside the stage directory, so a refused stage leaves no directory behind."""
        return file_lock(self.lock_path, f"{self.stage} stage {self.fingerprint}")

    def reuse(self, required: Iterable[str] = ()) -> bool:
        """Whether the stage is finished and still what it was: every output DONE recorded has its size and
        SHA-256, every ``required`` file exists. A changed stage is a DataError naming the file (nothing is
        deleted: the user decides)."""
        from anonrisk.errors import DataError

        if not self.is_done():
            return False
        try:
            done = read_json(self.path / DONE)
        except (OSError, ValueError):
            raise DataError(f"{self.path / DONE}: unreadable; delete {self.path} to redo the {self.stage} stage") from None
        outputs = done.get("outputs", {}) if isinstance(done, dict) else {}
        for name in dict.fromkeys([*outputs, *required]):
            why = changed(self.path / name, outputs[name]) if name in outputs else (None if (self.path / name).is_file() else "missing")
            if why:
                raise DataError(f"{self.path / name}: {why}, though the {self.stage} stage is DONE (changed after it finished); "
                                f"restore it or delete {self.path} to redo the stage")
        return True

    def begin(self, config: Any) -> "StageDir":
        with names_full_disk(self.path):
            self.path.mkdir(parents=True, exist_ok=True)
        write_json(self.path / "config.json", config)
        return self

    def mark_done(self, summary: Any = None, outputs: Iterable[str] = ()) -> None:
        """Write DONE: the stage's summary plus ``made_by``, the program that made it (results say how
        every reused stage was made, not only the last report), and the size and SHA-256 of each of its
        ``outputs`` (files in the stage directory), which ``reuse`` checks."""
        from anonrisk.environment import made_by

        summary = dict(summary or {})
        summary.setdefault("made_by", made_by())
        summary["outputs"] = {name: file_digest(self.path / name) for name in outputs}
        write_json(self.path / DONE, summary)

    def __repr__(self) -> str:
        return f"StageDir({self.stage}:{self.fingerprint})"
