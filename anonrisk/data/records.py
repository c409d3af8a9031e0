"""``FaceRecord``: one image of one identity; a manifest is a JSONL file of records.

On disk a record's ``path`` is relative, with ``root`` saying to what: ``stage`` (the manifest's own folder:
anonymized outputs, rendered images) or ``data`` (the dataset root, ``data.root``), so a copied or moved
runs_dir or dataset reads its own files. Each line also holds the file's ``size`` and ``sha256``: reading a
manifest checks every size (a ``stat``), ``verify_manifest`` re-hashes every file (``anonrisk verify``).
In memory, paths are absolute."""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Optional
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from anonrisk.errors import DataError
from anonrisk.stages import atomic_path, changed, file_digest

SPLITS = ("train", "test", "aux")


@dataclass(frozen=True)
class FaceRecord:
    """One image. ``id`` is unique and stable across runs (it seeds the record's randomness);
    ``split`` is ``train`` (attacker training identities), ``test`` (target identities) or ``aux``
    (the black-box attacker's own identities); splits never share an identity."""

    id: str
    identity: str
    path: str
    split: str = "train"
    meta: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> "FaceRecord":
        return cls(**obj)


def _relative(path: str, base: Path) -> Optional[str]:
    rel = os.path.relpath(os.path.abspath(path), base)
    return None if rel == os.pardir or rel.startswith(os.pardir + os.sep) or os.path.isabs(rel) else Path(rel).as_posix()


def write_manifest(path: str | os.PathLike, records: Iterable[FaceRecord], data_root: str | os.PathLike | None = None,
                   digests: bool = True) -> None:
    """Write ``records``: each path relative to the manifest's folder or else to ``data_root``, with the
    file's size and SHA-256 (``digests``); a path under neither stays absolute."""
    path = Path(path)
    stage = Path(os.path.abspath(path.parent))
    data = Path(os.path.abspath(data_root)) if data_root is not None else None
    with atomic_path(path) as tmp:
        with open(tmp, "w") as f:
            for r in records:
                line = r.to_json()
                for root, base in (("stage", stage), ("data", data)):
                    rel = _relative(r.path, base) if base is not None else None
                    if rel is not None:
                        line.update(path=rel, root=root)
                        break
                if digests:
                    line.update(file_digest(r.path))
                f.write(json.dumps(line, sort_keys=True) + "\n")


def _resolve(obj: dict, stage: Path, data: Optional[Path], where: str) -> dict:
    root = obj.pop("root", None)
    if root is None:
        return obj  # an absolute path (a manifest from before relative paths)
    if root == "data" and data is None:
        raise DataError(f"{where}: a path relative to the dataset root, but no data.root was given")
    from anonrisk.data.paths import join_under

    obj["path"] = str(join_under(stage if root == "stage" else data, obj["path"], where))
    return obj


def read_manifest(path: str | os.PathLike, data_root: str | os.PathLike | None = None, check: bool = True) -> list[FaceRecord]:
    """The records of a manifest, paths made absolute; with ``check``, every file must have the size the
    manifest recorded (a DataError names the file: the stage was changed after it was written)."""
    return [r for r, _ in _read(path, data_root, check)]


def _read(path, data_root, check: bool) -> list[tuple[FaceRecord, dict]]:
    path = Path(path)
    if not path.exists():
        raise DataError(f"manifest not found: {path}")
    stage = Path(os.path.abspath(path.parent))
    data = Path(os.path.abspath(Path(data_root).expanduser())) if data_root is not None else None
    out = []
    with open(path) as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                obj = json.loads(line)
                digest = {k: obj.pop(k) for k in ("size", "sha256") if k in obj}
                record = FaceRecord.from_json(_resolve(obj, stage, data, where))
            except (json.JSONDecodeError, TypeError, AttributeError, KeyError) as exc:
                raise DataError(f"{where}: not a FaceRecord ({exc})") from None
            if check and digest:
                why = changed(Path(record.path), digest, full=False)
                if why:
                    raise DataError(f"{record.path} (record {record.id} of {path}): {why}; the files changed after the stage "
                                    "finished: restore them or delete the stage directory to redo it")
            out.append((record, digest))
    return out


def verify_manifest(path: str | os.PathLike, data_root: str | os.PathLike | None = None) -> list[str]:
    """Every file of a manifest re-hashed: one line per file that is missing or differs (empty: all fine)."""
    problems = []
    for record, digest in _read(path, data_root, check=False):
        why = changed(Path(record.path), digest) if digest else None
        if why:
            problems.append(f"{record.path} (record {record.id}): {why}")
    return problems
