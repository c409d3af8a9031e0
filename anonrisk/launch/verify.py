"""``anonrisk verify``: re-hash every finished stage under a runs_dir.

Each DONE records the size and SHA-256 of its stage's outputs, each manifest those of every image it lists
(a prepare manifest: the dataset's own files, found under the ``data.root`` its config.json names). A stage
is ``ok``, ``CHANGED`` (a file differs or is missing: the numbers built on it are no longer reproducible;
restore the file or delete the stage to redo it) or ``partial`` (no DONE: a rerun resumes it).
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

from anonrisk.stages import DONE, changed, read_json

STAGES = ("prepare", "anonymize", "quality", "train", "embed", "evaluate", "cell")


def stage_dirs(runs_dir: Path) -> Iterator[Path]:
    for stage in STAGES:
        yield from sorted(p.parent for p in (runs_dir / stage).glob("**/config.json"))


def verify_stage(path: Path) -> list[str]:
    """What no longer matches in one finished stage directory (empty: all of it does)."""
    from anonrisk.data.records import verify_manifest

    try:
        done = read_json(path / DONE)
    except (OSError, ValueError):
        return [f"{path / DONE}: unreadable"]
    problems = []
    for name, digest in (done.get("outputs") or {}).items():
        why = changed(path / name, digest)
        if why:
            problems.append(f"{path / name}: {why}")
    if (path / "manifest.jsonl").is_file() and not any(p.startswith(f"{path / 'manifest.jsonl'}:") for p in problems):
        try:
            root = (read_json(path / "config.json") or {}).get("root") if path.parent.name == "prepare" else None
        except (OSError, ValueError):
            root = None
        try:
            problems += verify_manifest(path / "manifest.jsonl", root)
        except Exception as exc:  # noqa: BLE001 - an unreadable manifest is one more finding
            problems.append(f"{path / 'manifest.jsonl'}: {exc}")
    return problems


def verify(runs_dir: str) -> tuple[list[str], int]:
    """(one line per stage, how many stages changed)."""
    runs = Path(runs_dir)
    lines, bad = [], 0
    for d in stage_dirs(runs):
        rel = d.relative_to(runs)
        if not (d / DONE).exists():
            lines.append(f"partial  {rel}")
            continue
        problems = verify_stage(d)
        bad += bool(problems)
        lines.append(f"{'CHANGED' if problems else 'ok':8s} {rel}")
        lines += [f"         {p}" for p in problems[:10]] + ([f"         ... and {len(problems) - 10} more"] if len(problems) > 10 else [])
    return lines, bad
