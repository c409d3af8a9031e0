"""MLflow for a grid: the submitter creates the experiment (once: parallel creation races) and one parent
run per grid with one child run per cell, and keeps their ids in ``<grid_dir>/mlflow.json``. Jobs only
log into those runs, so a requeued job continues the run its first attempt started.

Names are stable across grids: params ``grid.<axis>`` (the cell's label on each axis), ``data.*``,
``train.*``, ``evaluate.*``, ``anonymizer.*``; metrics as in a run's child runs,
``<attack>.<protocol>.<mode>.<top1|top5|mrr>`` with ``_lo``/``_hi``/``_norm``, ``worst.*`` (the strongest
attack), ``leakage.*``, ``utility.*``, and per step ``train.loss`` (``train.<attack>.loss`` in a cell that trains
several attacks).
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any, Optional

from anonrisk.stages import read_json, write_json
from anonrisk.tracking.mlflow_log import flatten, result_metrics, tracking_uri

log = logging.getLogger("anonrisk")
STATE = "mlflow.json"


def _client(uri: str):
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    from anonrisk.tracking.store import ready_client

    return ready_client(uri)


def _uri(cfg) -> str:
    uri = tracking_uri(cfg)
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        uri = "sqlite:///" + str(Path(uri[len("sqlite:///"):]).resolve())  # jobs may start elsewhere
    return uri


def start_grid_runs(plan) -> dict[str, Any]:
    """Create (or reuse) the experiment, the grid's parent run and a child run per cell."""
    grid_dir = plan.grid_dir
    cfg = plan.cells[0].config
    state_path = grid_dir / STATE
    if not cfg.tracking.mlflow:
        state = {"enabled": False}
        write_json(state_path, state)
        return state
    uri = _uri(cfg)
    state = read_json(state_path) if state_path.exists() else {}
    if state.get("tracking_uri") != uri or not state.get("enabled", True):
        state = {}
    client = _client(uri)
    if not state:
        exp = client.get_experiment_by_name(cfg.tracking.experiment)
        exp_id = exp.experiment_id if exp else client.create_experiment(cfg.tracking.experiment)
        parent = client.create_run(exp_id, run_name=plan.spec.name, tags={"anonrisk.grid": plan.spec.name})
        state = {"enabled": True, "tracking_uri": uri, "experiment_id": exp_id, "parent_run_id": parent.info.run_id, "children": {}}
        client.log_batch(parent.info.run_id, params=_params({f"grid.axes.{k}": ",".join(map(str, _labels(v))) for k, v in plan.spec.axes.items()}))
    for cell in plan.cells:
        if cell.id in state["children"]:
            continue
        child = client.create_run(state["experiment_id"], run_name=f"{plan.spec.name}/{cell.id}", tags={
            "mlflow.parentRunId": state["parent_run_id"], "anonrisk.grid": plan.spec.name, "anonrisk.cell": cell.id})
        c = cell.config
        params = {f"grid.{k}": v for k, v in cell.axes.items()}
        params.update(flatten("", {"data": c.data.model_dump(mode="json"), "train": c.train.model_dump(mode="json"),
                                   "evaluate": c.evaluate.model_dump(mode="json")}, {}))
        params.update(flatten("anonymizer", cell.spec.model_dump(mode="json"), {}))
        client.log_batch(child.info.run_id, params=_params(params))
        state["children"][cell.id] = child.info.run_id
        write_json(state_path, state)  # after each child: a failed submit never orphans a run id
    write_json(state_path, state)
    return state


def _labels(values) -> list:
    return list(values) if isinstance(values, dict) else [v.get("name", v) if isinstance(v, dict) else v for v in values]


def _params(params: dict[str, Any]):
    from mlflow.entities import Param

    return [Param(k, json.dumps(v) if isinstance(v, (list, dict)) else str(v)[:6000]) for k, v in params.items()]


def _state(grid_dir: Path) -> Optional[dict[str, Any]]:
    p = Path(grid_dir) / STATE
    if not p.exists():
        return None
    state = read_json(p)
    return state if state.get("enabled") else None


def _log_batch(client, run_id: str, metrics: list) -> None:
    for i in range(0, len(metrics), 900):  # log_batch caps metrics per call at 1000
        client.log_batch(run_id, metrics=metrics[i : i + 900])


def log_training(grid_dir: Path, cell_id: str, train_dir: Path, metric: str = "train.loss") -> None:
    """The loss curve of a finished training as ``metric``, once (a requeued job finds it logged and skips)."""
    state = _state(grid_dir)
    if state is None or cell_id not in state["children"]:
        return
    from mlflow.entities import Metric

    client = _client(state["tracking_uri"])
    run_id = state["children"][cell_id]
    if client.get_metric_history(run_id, metric):
        return
    lines = (Path(train_dir) / "log.jsonl").read_text().splitlines()
    entries = [json.loads(line) for line in lines]
    _log_batch(client, run_id, [Metric(metric, e["loss"], 0, e["step"]) for e in entries])


def log_cell(grid_dir: Path, cell_id: str, result: dict[str, Any]) -> None:
    """A cell's evaluation metrics into its child run, which then ends FINISHED (idempotent)."""
    state = _state(grid_dir)
    if state is None or cell_id not in state["children"]:
        return
    from mlflow.entities import Metric

    client = _client(state["tracking_uri"])
    run_id = state["children"][cell_id]
    run = client.get_run(run_id)
    metrics = result_metrics(result)
    if run.info.status == "FINISHED" and set(metrics) <= set(run.data.metrics):
        return
    _log_batch(client, run_id, [Metric(k, v, 0, 0) for k, v in metrics.items()])
    client.set_tag(run_id, "anonrisk.anonymize_fp", result["fingerprints"]["anonymize"])
    client.set_terminated(run_id, "FINISHED")


def finish_grid(grid_dir: Path, out_dir: Path, results: dict[str, dict], missing: list[str]) -> Optional[dict]:
    """Make sure every finished cell is in MLflow, attach the grid's tables and plots to the parent run."""
    state = _state(grid_dir)
    if state is None:
        return None
    from mlflow.entities import Metric

    client = _client(state["tracking_uri"])
    for cell_id, result in results.items():
        log_cell(grid_dir, cell_id, result)
    pid = state["parent_run_id"]
    for f in ("metrics.json", "comparison.md"):
        if (out_dir / f).exists():
            client.log_artifact(pid, str(out_dir / f))
    if (out_dir / "plots").is_dir():
        client.log_artifacts(pid, str(out_dir / "plots"), "plots")
    client.log_batch(pid, metrics=[Metric("grid.cells_finished", len(results), 0, 0)])
    client.set_tag(pid, "anonrisk.missing_cells", ",".join(missing) or "none")
    client.set_terminated(pid, "FAILED" if missing else "FINISHED")
    return state
