"""``anonrisk grid collect``: every finished cell's metrics into ``results/<grid>/`` (metrics.json with a
versioned schema, comparison.md, plots/comparison.png) and into MLflow. Safe to run at any time: cells
without a finished evaluation are listed as missing; with nothing new, the files stay byte-identical."""

from __future__ import annotations

import datetime as dt
import logging
from typing import Any

from anonrisk import __version__
from anonrisk.errors import AnonriskError
from anonrisk.launch.compare import DEFAULT_METRIC, comparison_plot, comparison_table, rows_from_json
from anonrisk.stages import atomic_path, read_json, write_json

log = logging.getLogger("anonrisk")

GRID_SCHEMA = "anonrisk.grid"
GRID_SCHEMA_VERSION = 1


def cell_results(plan) -> tuple[dict[str, dict[str, Any]], list[str]]:
    """Report cards of the finished cells (schema of a run's results: attacks, leakage, utility)."""
    results, missing = {}, []
    for cell in plan.cells:
        node = plan.nodes[plan.cell_nodes[cell.id]["evaluate"]]
        if plan.is_done(node):
            results[cell.id] = read_json(plan.runs_dir / node.key / "result.json")
        else:
            missing.append(cell.id)
    return results, missing


def collect(plan, strict: bool = False) -> dict[str, Any]:
    from anonrisk.tracking.grid_mlflow import finish_grid

    results, missing = cell_results(plan)
    out = plan.results_dir
    out.mkdir(parents=True, exist_ok=True)
    doc = {
        "schema": GRID_SCHEMA,
        "schema_version": GRID_SCHEMA_VERSION,
        "grid": plan.spec.name,
        "anonrisk_version": __version__,
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "axes": {k: list(v) if isinstance(v, dict) else v for k, v in plan.spec.axes.items()},
        "cells": [{"id": c.id, "axes": c.axes, "result": results[c.id]} for c in plan.cells if c.id in results],
        "missing": missing,
    }
    previous = out / "metrics.json"
    if previous.exists():
        old = read_json(previous)
        if {k: v for k, v in old.items() if k != "created"} == {k: v for k, v in doc.items() if k != "created"}:
            doc["created"] = old["created"]
    write_json(out / "metrics.json", doc)
    if results:
        rows = rows_from_json(out / "metrics.json")
        table = comparison_table(rows, DEFAULT_METRIC)
        comparison_plot(rows, out / "plots" / "comparison.png", DEFAULT_METRIC)
    else:
        table = "(no finished cell yet)\n"
    with atomic_path(out / "comparison.md") as tmp:
        lost = f"\n\nMissing cells ({len(missing)}): {', '.join(missing)}\n" if missing else ""
        tmp.write_text(f"# anonrisk grid: {plan.spec.name}\n\n{len(results)} of {len(plan.cells)} cells finished.\n\n{table}{lost}"
                       + ("\n![comparison](plots/comparison.png)\n" if results else ""))
    mlflow_state = finish_grid(plan.grid_dir, out, results, missing)
    summary = {"results_dir": str(out), "finished": len(results), "missing": missing, "table": table,
               "mlflow_parent_run_id": (mlflow_state or {}).get("parent_run_id")}
    if strict and missing:
        raise AnonriskError(f"grid {plan.spec.name}: {len(missing)} cell(s) did not finish: {', '.join(missing)}; "
                            f"`anonrisk grid status` shows why, `anonrisk grid submit` resubmits them")
    return summary
