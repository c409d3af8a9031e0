"""``anonrisk ls``: what each stage directory under runs_dir is (its anonymizer, attack, backbone), its state,
size and age, with a hint when there is none; the anonymizer presets for ``anonrisk ls kinds``."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Iterator

STAGES = ("prepare", "anonymize", "train", "evaluate", "quality", "embed", "cell")


def _read(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def _who(results: Path, runs: Path) -> dict[str, dict[str, str]]:
    """Stage path (``train/<fp>``) -> {anonymizer, attack}, from the report cards that used it (a stage's own
    config says what it computes, not for which anonymizer)."""
    cards = []
    for m in sorted(results.glob("*/metrics.json")):
        doc = _read(m)
        cards += list((doc.get("results") or {}).values()) + [c.get("result", {}) for c in doc.get("cells") or []]
    cards += [_read(p) for p in sorted(runs.glob("cell/**/result.json"))]
    who: dict[str, dict[str, str]] = {}
    for card in cards:
        name = (card.get("anonymizer") or {}).get("name", "?")
        fps = card.get("fingerprints") or {}
        for stage in ("anonymize", "quality"):
            if fps.get(stage):
                who.setdefault(f"{stage}/{fps[stage]}", {"anonymizer": name})
        for attack, a in (card.get("attacks") or {}).items():
            for stage in ("train", "evaluate"):
                if (a.get("fingerprints") or {}).get(stage):
                    who.setdefault(f"{stage}/{a['fingerprints'][stage]}", {"anonymizer": name, "attack": attack})
    return who


def _what(stage: str, config: dict[str, Any]) -> dict[str, str]:
    if stage == "prepare":
        return {"dataset": str(config.get("dataset", "?"))}
    if stage == "anonymize":
        return {"anonymizer": (config.get("anonymizer") or {}).get("name", "?")}
    if stage == "train":
        return {"backbone": str((config.get("train") or {}).get("backbone", "?"))}
    if stage == "evaluate" and config.get("attack"):
        spec = config["attack"].get("spec") or {}
        return {"attack": spec.get("name", config["attack"].get("class", "?"))}
    if stage == "cell":
        return {"anonymizer": ((config.get("config") or {}).get("anonymizers") or [{}])[0].get("name", "?")}
    return {}


def _size(d: Path) -> int:
    return sum(f.stat().st_size for f in d.rglob("*") if f.is_file())


def human(n: float, units=("B", "KB", "MB", "GB", "TB")) -> str:
    for u in units:
        if n < 1024 or u == units[-1]:
            return f"{n:.0f} {u}" if u == "B" else f"{n:.1f} {u}"
        n /= 1024
    return ""


def age(seconds: float) -> str:
    for unit, s in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= s:
            return f"{seconds / s:.0f} {unit} ago"
    return f"{seconds:.0f} s ago"


def stage_rows(runs_dir: str, results_dir: str) -> Iterator[dict[str, str]]:
    runs, now = Path(runs_dir), time.time()
    who = _who(Path(results_dir), runs)
    for stage in STAGES:
        for marker in sorted((runs / stage).glob("**/config.json")):
            d = marker.parent
            if (d / "config.json") != marker or any(p.name == "config.json" for p in d.parents):
                continue
            rel = str(d.relative_to(runs))
            about = {**who.get(rel, {}), **_what(stage, _read(marker))}
            state = "done" if (d / "DONE").exists() else "partial"
            mtime = max((f.stat().st_mtime for f in d.iterdir()), default=marker.stat().st_mtime)
            yield {"stage": stage, "state": state, "what": " ".join(f"{k}={v}" for k, v in about.items()) or "-",
                   "size": human(_size(d)), "age": age(now - mtime), "path": rel}


def list_stages(runs_dir: str, results_dir: str) -> str:
    rows = list(stage_rows(runs_dir, results_dir))
    lines = []
    if not rows:
        lines.append(f"no stages under {runs_dir}/ yet: `anonrisk run` (the quickstart: `anonrisk run configs/quickstart.yaml`) "
                     f"makes them; `anonrisk ls kinds` lists what can run")
    else:
        w = max(len(r["what"]) for r in rows)
        lines.append(f"{'stage':10s} {'state':8s} {'what':{w}s} {'size':>9s} {'age':>12s}  path")
        lines += [f"{r['stage']:10s} {r['state']:8s} {r['what']:{w}s} {r['size']:>9s} {r['age']:>12s}  {r['path']}" for r in rows]
    for m in sorted(Path(results_dir).glob("*/metrics.json")):
        lines.append(f"{'results':10s} {'':8s} {m.parent}")
    return "\n".join(lines)


def list_presets() -> str:
    """The anonymizer presets (``configs/anonymizers/*.yaml``) with their kinds (``cli.print_kinds`` lists the
    kinds themselves)."""
    import yaml

    from anonrisk.config.loader import preset_dirs, preset_names

    lines = ["anonymizer presets (configs/anonymizers/*.yaml: a kind with its params):"]
    for name in preset_names(preset_dirs(None)):
        path = next((d / f"{name}.yaml" for d in preset_dirs(None) if (d / f"{name}.yaml").exists()), None)
        kind = (yaml.safe_load(path.read_text()) or {}).get("kind", "") if path is not None else ""
        lines.append(f"  {name:28s} kind={kind}")
    return "\n".join(lines)
