"""Log a run's results to MLflow: one parent run per anonrisk run, one child run per anonymizer.

Stable names: params ``anonymizer.*``, ``train.*``, ``data.*``; metrics ``<protocol>.<mode>.<metric>``
with ``_lo``/``_hi`` for the 95 % interval, and ``leakage.<name>``. Artifacts: metrics.json, report.md and
plots (no face images). Run ids are kept in ``results/<run>/mlflow.json``; a rerun with unchanged results
logs nothing new.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from anonrisk.config.schema import RunConfig
from anonrisk.stages import fingerprint, read_json, write_json


def tracking_uri(cfg: RunConfig) -> str:
    if cfg.tracking.tracking_uri:
        return cfg.tracking.tracking_uri
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path(cfg.runs_dir).resolve()}/mlflow.db"


def flatten(prefix: str, obj: Any, out: dict[str, Any]) -> dict[str, Any]:
    if isinstance(obj, dict):
        for k, v in obj.items():
            flatten(f"{prefix}.{k}" if prefix else str(k), v, out)
    else:
        out[prefix] = obj
    return out


def result_metrics(result: dict[str, Any]) -> dict[str, float]:
    """One anonymizer's report card as flat metrics: ``<attack>.<protocol>.<mode>.<metric>``, the worst case
    over attacks as ``worst.<protocol>.<mode>.top1``, ``leakage.*`` and ``utility.*``."""
    from anonrisk.report.card import ran, worst_case

    metrics = {}
    for attack, r in ran(result).items():
        for key, m in r["protocols"].items():
            base = f"{attack}.{key.replace('/', '.')}"
            for name in ("top1", "top5", "mrr"):
                metrics[f"{base}.{name}"] = m[name]["value"]
                metrics[f"{base}.{name}_lo"], metrics[f"{base}.{name}_hi"] = m[name]["ci95"]
                metrics[f"{base}.{name}_norm"] = m[name]["normalized"]
            metrics[f"{base}.chance_top1"] = m["top1"]["chance"]
    keys = {k for r in ran(result).values() for k in r["protocols"]}
    for key in keys:
        w = worst_case(result, key)
        metrics[f"worst.{key.replace('/', '.')}.top1"] = w["metric"]["value"]
        metrics[f"worst.{key.replace('/', '.')}.top1_lo"], metrics[f"worst.{key.replace('/', '.')}.top1_hi"] = w["metric"]["ci95"]
        metrics[f"worst.{key.replace('/', '.')}.top1_norm"] = w["metric"]["normalized"]
    for k, v in result.get("leakage", {}).items():
        metrics[f"leakage.{k}"] = v
    for k, v in result.get("utility", {}).items():
        if isinstance(v, (int, float)):
            metrics[f"utility.{k}"] = v
    return {k: float(v) for k, v in metrics.items() if v == v}  # MLflow rejects NaN in some stores


def log_results(cfg: RunConfig, doc: dict[str, Any], out_dir: Path) -> dict[str, Any]:
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    import mlflow

    uri = tracking_uri(cfg)
    state_path = out_dir / "mlflow.json"
    digest = fingerprint(doc["results"], doc["config"])
    if state_path.exists():
        state = read_json(state_path)
        if state.get("tracking_uri") == uri and state.get("results_fp") == digest:
            return state
    from anonrisk.tracking.store import ready_client

    client = ready_client(uri)  # a new sqlite store is created by one process at a time
    exp = client.get_experiment_by_name(cfg.tracking.experiment)
    exp_id = exp.experiment_id if exp else client.create_experiment(cfg.tracking.experiment)
    params = flatten("", {"data": doc["config"]["data"], "train": doc["config"]["train"], "evaluate": doc["config"]["evaluate"]}, {})
    params["attacks"] = ",".join(a["name"] for a in doc["config"].get("attacks", []))
    parent = client.create_run(exp_id, run_name=cfg.name, tags={"anonrisk.run": cfg.name, "anonrisk.data_fp": doc["data"]["fingerprint"]})
    pid = parent.info.run_id
    children = {}
    for name, result in doc["results"].items():
        child = client.create_run(exp_id, run_name=f"{cfg.name}/{name}", tags={
            "mlflow.parentRunId": pid, "anonrisk.anonymizer": name, "anonrisk.anonymize_fp": result["fingerprints"]["anonymize"]})
        cid = child.info.run_id
        child_params = {**params, **flatten("anonymizer", result["anonymizer"], {})}
        batch_params = [mlflow.entities.Param(k, str(v)[:6000]) for k, v in child_params.items()]
        batch_metrics = [mlflow.entities.Metric(k, v, 0, 0) for k, v in result_metrics(result).items()]
        for i in range(0, max(len(batch_params), 1), 100):  # log_batch caps params per call
            client.log_batch(cid, params=batch_params[i : i + 100], metrics=batch_metrics if i == 0 else [])
        client.set_terminated(cid)
        children[name] = cid
    for f in ("metrics.json", "report.md", "leaderboard.md", "leaderboard.json"):
        client.log_artifact(pid, str(out_dir / f))
    client.log_artifacts(pid, str(out_dir / "plots"), "plots")
    client.set_terminated(pid)
    state = {"tracking_uri": uri, "experiment_id": exp_id, "parent_run_id": pid, "children": children, "results_fp": digest}
    write_json(state_path, state)
    return state
