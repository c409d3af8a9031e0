"""Write ``results/<run>/``: metrics.json (schema-versioned), config.yaml, report.md, plots/*.png,
then log the same numbers to MLflow (a view of the JSON). No image of a face is ever written here."""

from __future__ import annotations

import datetime as dt
import logging
from pathlib import Path
from typing import Any

import yaml

from anonrisk import __version__
from anonrisk.config.schema import RunConfig
from anonrisk.stages import StageDir, atomic_path, read_json, write_json

log = logging.getLogger("anonrisk")

SCHEMA = "anonrisk.results"
SCHEMA_VERSION = 1
MAIN = "full-ref/exclude-source"


def fmt(m: dict | None, key: str = "top1") -> str:
    if not m or key not in m:
        return "-"
    v = m[key]
    lo, hi = v["ci95"]
    return f"{v['value']:.3f} [{lo:.2f}, {hi:.2f}]" if lo == lo else f"{v['value']:.3f}"


def markdown_table(results: dict[str, Any]) -> str:
    any_res = next(iter(results.values()))
    order = {"full-ref": 0, "few-ref": 1, "single-ref": 2, "exclude-source": 0, "linkage": 1}
    keys = sorted(any_res["protocols"], key=lambda k: tuple(order.get(part, 9) for part in k.split("/")))
    pool = any_res["protocols"][keys[0]]["pool"]
    head = ["anonymizer", "top-1 (full-ref, excl.)", "top-5", "MRR", "norm. top-1"]
    head += [f"top-1 {k}" for k in keys if k != MAIN] + ["edge F", "chamfer"]
    rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, r in results.items():
        p = r["protocols"]
        main = p.get(MAIN) or p[keys[0]]
        leak = r.get("leakage", {})
        cells = [name, fmt(main), fmt(main, "top5"), fmt(main, "mrr"), f"{main['top1']['normalized']:.3f}"]
        cells += [fmt(p[k]) for k in keys if k != MAIN]
        cells += [f"{leak['edge_f']:.3f}" if leak else "-", f"{leak['chamfer']:.2f}" if leak else "-"]
        rows.append("| " + " | ".join(cells) + " |")
    chance = any_res["protocols"][keys[0]]["top1"]["chance"]
    return "\n".join(rows) + f"\n\nPool: {pool} identities; chance top-1 = {chance:.3f}. Brackets: 95 % bootstrap interval by identity.\n"


def write_report(cfg: RunConfig, data_stage: StageDir, results: dict[str, Any]) -> dict:
    out = Path(cfg.results_dir) / cfg.name
    out.mkdir(parents=True, exist_ok=True)
    doc = {
        "schema": SCHEMA,
        "schema_version": SCHEMA_VERSION,
        "run": cfg.name,
        "anonrisk_version": __version__,
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "data": {"fingerprint": data_stage.fingerprint, **read_json(data_stage / "DONE")},
        "config": cfg.model_dump(mode="json"),
        "results": results,
    }
    previous = out / "metrics.json"
    if previous.exists():
        old = read_json(previous)
        if old.get("results") == doc["results"] and old.get("config") == doc["config"]:
            doc["created"] = old["created"]  # nothing changed: keep the file byte-identical
    write_json(out / "metrics.json", doc)
    with atomic_path(out / "config.yaml") as tmp:
        tmp.write_text(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
    table = markdown_table(results)
    with atomic_path(out / "report.md") as tmp:
        tmp.write_text(f"# anonrisk report: {cfg.name}\n\nAttack: contrastive ({cfg.attack.backbone}, batch {cfg.attack.batch_size}, "
                       f"{cfg.attack.steps} steps). Dataset: {cfg.data.dataset}.\n\n{table}\n"
                       "![re-identification](plots/reid.png)\n\n![leakage](plots/leakage_vs_reid.png)\n")
    from anonrisk.report.plots import plot_leakage_vs_reid, plot_reid

    plot_reid(results, out / "plots" / "reid.png")
    plot_leakage_vs_reid(results, out / "plots" / "leakage_vs_reid.png")
    if cfg.tracking.mlflow:
        from anonrisk.tracking.mlflow_log import log_results

        log_results(cfg, doc, out)
    doc["table"] = table
    doc["results_dir"] = str(out)
    return doc
