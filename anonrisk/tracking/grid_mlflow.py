"""MLflow for a grid: the submitter creates the experiment (once: parallel creation races), one parent run per
grid and one child run per cell, and keeps their ids in ``<grid_dir>/mlflow.json``. Jobs only log into those
runs, so a requeued job continues the run its first attempt started.

Child runs are keyed by the cell's fingerprint (its evaluate stage), not its label: a resubmitted grid whose
settings changed (``train.seed=1``) gets a new child run, and the old one is renamed "(superseded)" and tagged
``anonrisk.superseded_by``, so a run always describes the numbers it holds. A child shows what a run's child
shows (``mlflow_log.py``): headline metrics, the live ``train/loss`` and ``train/lr``, the protocol table and
``result.json``, which ``anonrisk compare --mlflow`` reads. Params: ``grid.<axis>`` (the cell's label on each
axis), ``data.*``, ``train.*``, ``evaluate.*``, ``anonymizer.*``.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Callable, Optional

from anonrisk.stages import fingerprint, read_json, write_json
from anonrisk.tracking import mlflow_log as ml

log = logging.getLogger("anonrisk")
STATE = "mlflow.json"


def start_grid_runs(plan) -> dict[str, Any]:
    """Create (or reuse) the experiment, the grid's parent run and a child run per cell fingerprint."""
    grid_dir = plan.grid_dir
    cfg = plan.cells[0].config
    state_path = grid_dir / STATE
    if not cfg.tracking.mlflow:
        state = {"enabled": False}
        write_json(state_path, state)
        return state
    uri = ml.resolved_uri(cfg)
    state = read_json(state_path) if state_path.exists() else {}
    if state.get("tracking_uri") != uri or not state.get("enabled", True):
        state = {}
    client = ml.client(uri)
    if not state:
        exp_id = ml.experiment_id(client, cfg.tracking.experiment, uri)
        parent = client.create_run(exp_id, run_name=plan.spec.name, start_time=ml.now_ms(), tags={"anonrisk.grid": plan.spec.name})
        state = {"enabled": True, "tracking_uri": uri, "experiment_id": exp_id, "parent_run_id": parent.info.run_id, "children": {}}
        ml.log_batch(client, parent.info.run_id, params=ml.params_of({f"grid.axes.{k}": ",".join(map(str, _labels(v)))
                                                                      for k, v in plan.spec.axes.items()}))
    else:
        client.update_run(state["parent_run_id"], "RUNNING")  # resubmitted: more work under this grid
    for cell in plan.cells:
        fp = cell.target.cell.fingerprint
        old = state["children"].get(cell.id)
        old_id, old_fp = (old.get("run_id"), old.get("fingerprint")) if isinstance(old, dict) else (old, None)
        if old_id and old_fp == fp:
            continue
        child = client.create_run(state["experiment_id"], run_name=f"{plan.spec.name}/{cell.id}", start_time=ml.now_ms(), tags={
            "mlflow.parentRunId": state["parent_run_id"], "anonrisk.grid": plan.spec.name, "anonrisk.cell": cell.id,
            "anonrisk.fingerprint": fp, "anonrisk.headline_protocol": ml.HEADLINE})
        c = cell.config
        params = {f"grid.{k}": v for k, v in cell.axes.items()}
        params.update(ml.flatten("", {"data": c.data.model_dump(mode="json"), "train": c.train.model_dump(mode="json"),
                                      "evaluate": c.evaluate.model_dump(mode="json")}, {}))
        params.update(ml.flatten("anonymizer", cell.spec.model_dump(mode="json"), {}))
        ml.log_batch(client, child.info.run_id, params=ml.params_of(params))
        if old_id:
            ml.supersede(client, old_id, child.info.run_id)
        state["children"][cell.id] = {"run_id": child.info.run_id, "fingerprint": fp}
        write_json(state_path, state)  # after each child: a failed submit never orphans a run id
    write_json(state_path, state)
    return state


def _labels(values) -> list:
    return list(values) if isinstance(values, dict) else [v.get("name", v) if isinstance(v, dict) else v for v in values]


def _state(grid_dir: Path) -> Optional[dict[str, Any]]:
    p = Path(grid_dir) / STATE
    if not p.exists():
        return None
    state = read_json(p)
    return state if state.get("enabled") else None


def _run_id(state: dict[str, Any], cell_id: str) -> Optional[str]:
    child = state["children"].get(cell_id)
    return child.get("run_id") if isinstance(child, dict) else child


def training_loggers(grid_dir: Path, cells: list[str], names: tuple[str, str]) -> list:
    """A live step logger (``steps.StepLogger``) per cell run that a train job serves; none without MLflow."""
    from anonrisk.tracking.steps import StepLogger

    state = _state(grid_dir)
    if state is None:
        return []
    try:
        client = ml.client(state["tracking_uri"])
        return [StepLogger(client, rid, names) for rid in (_run_id(state, c) for c in cells) if rid]
    except Exception as exc:  # noqa: BLE001 - MLflow is a view: training goes on
        log.warning("MLflow: no live training metrics (%s: %s)", type(exc).__name__, exc)
        return []


def on_step(loggers: list) -> Optional[Callable[[str, int, float, float], None]]:
    """The pipeline's ``on_train_step`` for these loggers (the attack name is the job's own)."""
    if not loggers:
        return None
    from anonrisk.tracking.steps import fan_out

    send = fan_out(loggers)
    return lambda attack, step, loss, lr: send(step, loss, lr)


def log_cell(grid_dir: Path, cell_id: str, result: dict[str, Any]) -> None:
    """A cell's report card into its child run, which then ends FINISHED (idempotent: the card's fingerprint
    is a tag, so a requeued job or a collect logs it once)."""
    state = _state(grid_dir)
    run_id = _run_id(state, cell_id) if state else None
    if run_id is None:
        return
    client = ml.client(state["tracking_uri"])
    digest = fingerprint(result)
    run = client.get_run(run_id)
    if run.info.status == "FINISHED" and run.data.tags.get("anonrisk.results_fp") == digest:
        return
    ml.log_card(client, run_id, result)
    client.set_tag(run_id, "anonrisk.results_fp", digest)
    client.set_tag(run_id, "anonrisk.anonymize_fp", result["fingerprints"]["anonymize"])
    client.set_terminated(run_id, "FINISHED", end_time=ml.now_ms())


def finish_grid(grid_dir: Path, out_dir: Path, results: dict[str, dict], missing: list[str]) -> Optional[dict]:
    """Make sure every finished cell is in MLflow, attach the grid's tables and plots to the parent run."""
    state = _state(grid_dir)
    if state is None:
        return None
    client = ml.client(state["tracking_uri"])
    for cell_id, result in results.items():
        log_cell(grid_dir, cell_id, result)
    pid = state["parent_run_id"]
    for f in ("metrics.json", "comparison.md"):
        if (out_dir / f).exists():
            client.log_artifact(pid, str(out_dir / f))
    if (out_dir / "plots").is_dir():
        client.log_artifacts(pid, str(out_dir / "plots"), "plots")
    ml.log_metrics(client, pid, {"grid/cells_finished": len(results), "grid/cells_missing": len(missing)})
    client.set_tag(pid, "anonrisk.missing_cells", ",".join(missing) or "none")
    client.set_terminated(pid, "FAILED" if missing else "FINISHED", end_time=ml.now_ms())
    return state
