"""``anonrisk compare``: one comparison table and plot from grid results, run results or MLflow.

Every source becomes the same rows: ``{"source", "cell", <axis>: <label>, ..., <metric>: value}`` with
metric names as in MLflow (``contrastive.full-ref.exclude-source.top1``, ``..._lo``, ``..._hi``,
``worst.full-ref.exclude-source.top1``: the strongest attack, ``leakage.edge_f``, ``utility.ssim``).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Optional, Sequence

from anonrisk.errors import ConfigError
from anonrisk.stages import read_json
from anonrisk.tracking.mlflow_log import result_metrics

DEFAULT_METRIC = "worst.full-ref.exclude-source.top1"  # the strongest attack of each report card


def trainer(config: dict[str, Any]) -> dict[str, Any]:
    """The training settings of a results document's config (``attack`` in results written before ``train``)."""
    return config.get("train") or config.get("attack") or {}


def rows_from_json(path: str | Path) -> list[dict[str, Any]]:
    """A grid's or a run's ``metrics.json`` (or the folder holding it)."""
    p = Path(path)
    if p.is_dir():
        p = p / "metrics.json"
    if not p.exists():
        raise ConfigError(f"compare: no results at {p}")
    doc = read_json(p)
    schema = doc.get("schema")
    rows = []
    if schema == "anonrisk.grid":
        for cell in doc["cells"]:
            rows.append({"source": doc["grid"], "cell": cell["id"], **cell["axes"], **result_metrics(cell["result"])})
    elif schema == "anonrisk.results":
        for name, result in doc["results"].items():
            rows.append({"source": doc["run"], "cell": f"anonymizer={name}", "anonymizer": name,
                         "backbone": trainer(doc["config"])["backbone"], **result_metrics(result)})
    else:
        raise ConfigError(f"compare: {p} is not an anonrisk results file (schema {schema!r})")
    return rows


def rows_from_mlflow(tracking_uri: str, experiment: str, grid: Optional[str] = None) -> list[dict[str, Any]]:
    """Child runs of grids (tag ``anonrisk.cell``) in one experiment; ``grid`` selects one grid."""
    from anonrisk.tracking.mlflow_log import client as mlflow_client

    client = mlflow_client(tracking_uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        raise ConfigError(f"compare: no MLflow experiment {experiment!r} at {tracking_uri}")
    query = "tags.`anonrisk.cell` != ''" + (f" and tags.`anonrisk.grid` = '{grid}'" if grid else "")
    rows, unfinished = [], []
    for run in client.search_runs([exp.experiment_id], query, max_results=50_000):
        tags, params = run.data.tags, run.data.params
        if "anonrisk.superseded_by" in tags:  # describes numbers the grid no longer holds (issue 15.4)
            continue
        result = _mlflow_result(client, run)
        if result is None:
            unfinished.append(tags["anonrisk.cell"])
            continue
        axes = {k[len("grid."):]: v for k, v in params.items() if k.startswith("grid.") and not k.startswith("grid.axes.")}
        # the cell's own report card, as ``rows_from_json`` reads it: the two never disagree
        rows.append({"source": tags.get("anonrisk.grid", ""), "cell": tags["anonrisk.cell"], **axes, **result_metrics(result)})
    if unfinished:
        import logging

        logging.getLogger("anonrisk").warning("compare: %d MLflow cell run(s) hold no results yet, left out: %s",
                                              len(unfinished), ", ".join(sorted(unfinished)))
    return rows


def _mlflow_result(client, run) -> Optional[dict[str, Any]]:
    """A child run's ``result.json`` (the report card it holds), None before its cell is evaluated."""
    import json
    import tempfile

    if run.info.status != "FINISHED":
        return None
    with tempfile.TemporaryDirectory() as d:
        try:
            return json.loads(Path(client.download_artifacts(run.info.run_id, "result.json", d)).read_text())
        except Exception:  # noqa: BLE001 - an old run (metrics only) or a missing artifact
            return None


def _axes(rows: Sequence[dict[str, Any]]) -> list[str]:
    metric_like = {k for r in rows for k, v in r.items() if isinstance(v, float)}
    return [k for k in dict.fromkeys(k for r in rows for k in r) if k not in metric_like and k not in ("source", "cell")]


def _fmt(row: dict[str, Any], metric: str) -> str:
    v = row.get(metric)
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    lo, hi = row.get(f"{metric}_lo"), row.get(f"{metric}_hi")
    return f"{v:.3f} [{lo:.2f}, {hi:.2f}]" if lo is not None and hi is not None and lo == lo else f"{v:.3f}"


def pick_axes(rows: Sequence[dict[str, Any]], row_axis: Optional[str], col_axis: Optional[str]) -> tuple[str, Optional[str]]:
    axes = _axes(rows)
    if not axes:
        raise ConfigError("compare: the results carry no axes to compare along")
    row_axis = row_axis or ("anonymizer" if "anonymizer" in axes else axes[0])
    for a in (row_axis, col_axis):
        if a is not None and a not in axes:
            raise ConfigError(f"compare: unknown axis {a!r}; axes here: {', '.join(axes)}")
    if col_axis is None:
        varying = [a for a in axes if a != row_axis and len({r.get(a) for r in rows}) > 1]
        col_axis = varying[0] if varying else None
    return row_axis, col_axis


def comparison_table(rows: Sequence[dict[str, Any]], metric: str = DEFAULT_METRIC, row_axis: Optional[str] = None,
                     col_axis: Optional[str] = None) -> str:
    """Markdown: ``row_axis`` down, ``col_axis`` across, ``metric`` [95 % interval] in the cells. Rows that
    share (row, col) labels but differ on other axes (seeds) are listed side by side, separated by ' / '."""
    if not rows:
        raise ConfigError("compare: no results to compare")
    if not any(metric in r for r in rows):
        known = sorted({k for r in rows for k, v in r.items() if isinstance(v, float) and not k.endswith(("_lo", "_hi"))})
        raise ConfigError(f"compare: no result has metric {metric!r}; metrics: {', '.join(known[:40])}")
    row_axis, col_axis = pick_axes(rows, row_axis, col_axis)
    row_labels = list(dict.fromkeys(r.get(row_axis, "-") for r in rows))
    col_labels = list(dict.fromkeys(r.get(col_axis, "-") for r in rows)) if col_axis else [metric]
    head = [row_axis] + [f"{col_axis}={c}" if col_axis else c for c in col_labels]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for rl in row_labels:
        cells = [str(rl)]
        for cl in col_labels:
            hits = [r for r in rows if r.get(row_axis, "-") == rl and (col_axis is None or r.get(col_axis, "-") == cl)]
            cells.append(" / ".join(_fmt(h, metric) for h in hits) or "-")
        lines.append("| " + " | ".join(cells) + " |")
    return f"Metric: `{metric}` (brackets: 95 % bootstrap interval by identity)\n\n" + "\n".join(lines) + "\n"


def comparison_plot(rows: Sequence[dict[str, Any]], path: str | Path, metric: str = DEFAULT_METRIC,
                    row_axis: Optional[str] = None, col_axis: Optional[str] = None) -> Path:
    """Grouped bars (one group per row label, one bar per column label), whiskers = 95 % interval."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    row_axis, col_axis = pick_axes(rows, row_axis, col_axis)
    row_labels = list(dict.fromkeys(r.get(row_axis, "-") for r in rows))
    col_labels = list(dict.fromkeys(r.get(col_axis, "-") for r in rows)) if col_axis else [None]
    width = 0.8 / len(col_labels)
    fig, ax = plt.subplots(figsize=(max(5, 1.2 * len(row_labels) * max(1, len(col_labels) / 2)), 3.6))
    for j, cl in enumerate(col_labels):
        vals, lo, hi = [], [], []
        for rl in row_labels:
            hits = [r for r in rows if r.get(row_axis, "-") == rl and (cl is None or r.get(col_axis, "-") == cl) and metric in r]
            v = float(np.mean([h[metric] for h in hits])) if hits else float("nan")
            vals.append(v)
            lo.append(v - min((h.get(f"{metric}_lo", v) for h in hits), default=v))
            hi.append(max((h.get(f"{metric}_hi", v) for h in hits), default=v) - v)
        x = np.arange(len(row_labels)) + (j - (len(col_labels) - 1) / 2) * width
        ax.bar(x, vals, width, yerr=[np.maximum(lo, 0), np.maximum(hi, 0)], capsize=2, label=None if cl is None else f"{col_axis}={cl}")
    ax.set_xticks(np.arange(len(row_labels)), [str(r) for r in row_labels], rotation=30, ha="right")
    ax.set_ylabel(metric)
    if col_axis:
        ax.legend(fontsize=7)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
