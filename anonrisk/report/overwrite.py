"""Results never silently replace results of other settings.

Two results documents hold the same numbers when the stages behind each anonymizer have the same
fingerprints (data, anonymize, quality, each attack's evaluate stage, which holds its train stage), so a
rerun with other operational settings (devices, batch sizes, runs_dir) may rewrite ``results/<name>/`` but
one with other settings, other data or another anonrisk version refuses unless ``--overwrite`` is given.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Optional

from anonrisk.errors import ConfigError
from anonrisk.stages import read_json

STAGE_KEYS = ("data", "anonymize", "quality")


def settings_of(cards: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """name -> the fingerprints that decide its numbers, from report cards (``results``) or from a plan's
    ``TargetPlan.fingerprints()``; a skipped attack's is None (no numbers)."""
    out = {}
    for name, card in cards.items():
        fps = card.get("fingerprints", card)
        attacks = {a: (r.get("evaluate") or (r.get("fingerprints") or {}).get("evaluate")) for a, r in (card.get("attacks") or {}).items()}
        out[name] = {**{k: fps.get(k) for k in STAGE_KEYS}, "attacks": attacks}
    return out


def differences(old: Mapping[str, Any], new: Mapping[str, Any], partial: bool = False) -> list[str]:
    """What differs between two ``settings_of``; ``partial``: names missing from ``new`` do not count (a grid
    collects its cells one by one)."""
    diffs = [f"{n}: only in the existing results" for n in old if n not in new and not partial]
    diffs += [f"{n}: not in the existing results" for n in new if n not in old and not partial]
    for n in (n for n in new if n in old):
        o, w = old[n], new[n]
        stages = [k for k in STAGE_KEYS if o[k] != w[k]]
        if stages:
            diffs.append(f"{n}: other {'/'.join(stages)} stages")
        elif set(o["attacks"]) != set(w["attacks"]):
            diffs.append(f"{n}: attacks {', '.join(sorted(o['attacks']))} vs {', '.join(sorted(w['attacks']))}")
        else:
            changed = [a for a in w["attacks"] if o["attacks"][a] and w["attacks"][a] and o["attacks"][a] != w["attacks"][a]]
            if changed:
                diffs.append(f"{n}: other settings of {', '.join(changed)}")
    return diffs


def old_settings(doc_path: Path) -> Optional[dict[str, Any]]:
    """``settings_of`` the results document at ``doc_path`` (a run's or a grid's); None if there is none."""
    if not doc_path.exists():
        return None
    try:
        doc = read_json(doc_path)
    except (OSError, ValueError):
        return {"?": {"unreadable": True}}
    if "cells" in doc:
        return settings_of({c["id"]: c["result"] for c in doc.get("cells", []) if isinstance(c, dict) and "result" in c})
    return settings_of(doc.get("results", {}))


def check_overwrite(out_dir: Path, new: Mapping[str, Any], overwrite: bool, partial: bool = False) -> None:
    """Refuse (ConfigError) to replace ``out_dir``'s results by ones of other settings, unless ``overwrite``."""
    if overwrite:
        return
    old = old_settings(out_dir / "metrics.json")
    if old is None:
        return
    diffs = ["the existing metrics.json is unreadable"] if "?" in old else differences(old, new, partial)
    if diffs:
        more = f" (and {len(diffs) - 3} more)" if len(diffs) > 3 else ""
        raise ConfigError(f"{out_dir}/ holds results of other settings ({'; '.join(diffs[:3])}{more}): pass --overwrite to "
                          f"replace them, or give the run another name (name=...)")
