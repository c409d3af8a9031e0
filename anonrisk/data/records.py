"""``FaceRecord``: one image of one identity; a manifest is a JSONL file of records."""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from anonrisk.errors import DataError
from anonrisk.stages import atomic_path

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


def write_manifest(path: str | os.PathLike, records: Iterable[FaceRecord]) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "w") as f:
            for r in records:
                f.write(json.dumps(r.to_json(), sort_keys=True) + "\n")


def read_manifest(path: str | os.PathLike) -> list[FaceRecord]:
    path = Path(path)
    if not path.exists():
        raise DataError(f"manifest not found: {path}")
    records = []
    with open(path) as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                records.append(FaceRecord.from_json(json.loads(line)))
            except (json.JSONDecodeError, TypeError) as exc:
                raise DataError(f"{path}:{lineno}: not a FaceRecord ({exc})") from None
    return records
