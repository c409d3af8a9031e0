"""Leakage sweeps: re-identification and edge similarity as a function of one anonymizer parameter (the
ControlNet conditioning scale of a preset, a blur sigma, the resynthesis edge scale, ...).

A sweep file lists sweeps; each point is an ordinary anonymizer spec run through the whole pipeline, so
every stage is cached and shared with ordinary runs, and the run's report card and leaderboard cover every
point. ``sweep.json`` / ``sweep.md`` / ``plots/sweep_<name>.png`` put the points side by side::

    sweeps:
      - {name: canny-scale, base: controlnet-canny-tiny, param: conditions.0.scale, values: [0.0, 0.5, 1.0]}
      - {name: blur-sigma, base: blur, param: sigma, values: [0.02, 0.04, 0.08]}
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Optional

from pydantic import Field

from anonrisk.config.schema import RunConfig, Spec
from anonrisk.config.validation import Strict, validate_model
from anonrisk.errors import ConfigError

SWEEP_SCHEMA_VERSION = 1
MAIN = "full-ref/exclude-source"
LINKAGE = "full-ref/linkage"


class Sweep(Strict):
    name: str
    base: str  # an anonymizer kind or preset name
    param: str  # dotted path into the base's params; integers index lists (conditions.0.scale)
    values: list[Any] = Field(min_length=1)


class SweepFile(Strict):
    sweeps: list[Sweep] = Field(min_length=1)


def load_sweeps(path: str | Path) -> list[Sweep]:
    from anonrisk.config.loader import load_yaml

    return validate_model(SweepFile, load_yaml(path), f"invalid sweep file {path}").sweeps


def set_param(params: dict, path: str, value: Any, key: str) -> dict:
    """A copy of ``params`` with ``path`` (dotted, list indices as integers) set to ``value``; the path must exist."""
    out = copy.deepcopy(params)
    node: Any = out
    parts = path.split(".")
    for i, part in enumerate(parts):
        last = i == len(parts) - 1
        if isinstance(node, list):
            if not part.isdigit() or int(part) >= len(node):
                raise ConfigError(f"{key}: {'.'.join(parts[: i + 1])} is not an index of a list of {len(node)}")
            part = int(part)
        elif not isinstance(node, dict) or (part not in node and not last):
            raise ConfigError(f"{key}: {'.'.join(parts[: i + 1])} does not exist in the base anonymizer's params")
        if last:
            node[part] = value
        else:
            node = node[part]
    return out


def sweep_specs(sweeps: list[Sweep], config_path: Optional[str]) -> list[tuple[Sweep, Any, Spec]]:
    """Every point as an anonymizer spec, its params checked (a bad value fails here, before any image)."""
    from anonrisk.anonymize import build_anonymizer
    from anonrisk.config.loader import preset_dirs, resolve_anonymizer

    dirs = preset_dirs(config_path)
    points = []
    for i, sw in enumerate(sweeps):
        base = resolve_anonymizer(sw.base, dirs, i)
        for v in sw.values:
            key = f"sweeps[{i}] ({sw.name})"
            spec = Spec(name=f"{sw.name}={v}", kind=base.kind, params=set_param(base.params, sw.param, v, f"{key}.param"))
            build_anonymizer(spec, f"{key}: {sw.param}={v!r}").validate()
            points.append((sw, v, spec))
    return points


def run_sweeps(cfg: RunConfig, sweeps: list[Sweep], config_path: Optional[str] = None, overwrite: bool = False) -> dict:
    """Run every sweep point through the run's plan; write the run's report and the sweep summary."""
    from anonrisk.pipeline import Pipeline
    from anonrisk.report.card import ran
    from anonrisk.stages import atomic_path, write_json

    points = sweep_specs(sweeps, config_path)
    names = [s.name for _, _, s in points]
    if len(set(names)) != len(names):
        raise ConfigError("sweeps: two points share a name (repeated sweep name and value)")
    run_cfg = cfg.model_copy(update={"anonymizers": [s for _, _, s in points]})
    doc = Pipeline(run_cfg).run(overwrite=overwrite)
    summary: dict = {"schema": "anonrisk.sweep", "schema_version": SWEEP_SCHEMA_VERSION, "run": cfg.name, "protocols": [MAIN, LINKAGE], "sweeps": []}
    for sw in sweeps:
        rows = []
        for s, v, spec in points:
            if s is not sw:
                continue
            card = doc["results"][spec.name]
            rows.append({
                "value": v, "anonymizer": spec.name,
                "attacks": {a: {k: r["protocols"][k]["top1"] for k in (MAIN, LINKAGE) if k in r["protocols"]} for a, r in ran(card).items()},
                "leakage": card.get("leakage", {}),
                "utility": {k: v2 for k, v2 in card.get("utility", {}).items() if k != "skipped"},
            })
        summary["sweeps"].append({"name": sw.name, "base": sw.base, "param": sw.param, "points": rows})
    out = Path(doc["results_dir"])
    write_json(out / "sweep.json", summary)
    with atomic_path(out / "sweep.md") as tmp:
        tmp.write_text(sweep_markdown(summary))
    from anonrisk.report.plots import plot_sweep

    for sw in summary["sweeps"]:
        plot_sweep(sw, out / "plots" / f"sweep_{sw['name']}.png")
    summary["results_dir"] = str(out)
    return summary


def sweep_markdown(summary: dict) -> str:
    from anonrisk.report.card import fmt

    parts = [f"# anonrisk leakage sweeps: {summary['run']}\n",
             "Top-1 re-identification per attack (full-ref, exclude-source; linkage in parentheses) and edge leakage "
             "(original vs anonymized) at each value of one anonymizer parameter. Brackets: 95 % bootstrap interval.\n"]
    for sw in summary["sweeps"]:
        attacks = list(dict.fromkeys(a for p in sw["points"] for a in p["attacks"]))
        head = [sw["param"]] + attacks + ["edge F", "edge SSIM", "SSIM"]
        lines = [f"## {sw['name']} ({sw['base']}: {sw['param']})\n", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for p in sw["points"]:
            cells = [str(p["value"])]
            for a in attacks:
                r = p["attacks"].get(a, {})
                cells.append(f"{fmt(r.get(MAIN))} ({r[LINKAGE]['value']:.2f})" if MAIN in r and LINKAGE in r else fmt(r.get(MAIN)))
            leak, util = p["leakage"], p["utility"]
            cells += [f"{leak['edge_f']:.3f}" if leak else "-", f"{leak['edge_ssim']:.3f}" if leak else "-", f"{util['ssim']:.3f}" if util else "-"]
            lines.append("| " + " | ".join(cells) + " |")
        chance = next((r[MAIN]["chance"] for p in sw["points"] for r in p["attacks"].values() if MAIN in r), None)
        lines.append(f"\nChance top-1 = {chance:.3f}.\n\n![{sw['name']}](plots/sweep_{sw['name']}.png)\n" if chance else "")
        parts.append("\n".join(lines))
    return "\n".join(parts)
