"""What anonrisk puts in MLflow, shared by runs (``run_log.py``) and grids (``grid_mlflow.py``).

A child run (one anonymizer of a run, one cell of a grid) shows a short set of headline metrics, grouped by
MLflow's sections (the part before ``/``), all at the headline protocol ``full-ref/exclude-source``:

    worst/top1, worst/top1_lo, worst/top1_hi, worst/top1_norm, worst/chance, worst/linkage_top1
    <attack>/top1, <attack>/top1_lo, <attack>/top1_hi, <attack>/top1_norm     (each attack that ran)
    leakage/edge_ssim, leakage/edge_f, leakage/chamfer, utility/ssim, utility/psnr, utility/lpips, ...
    train/loss, train/lr (per step, live; train/<attack>/loss when a cell trains several attacks)
    system/* (MLflow's system metrics: CPU, memory, disk, network; GPU with nvidia-ml-py)

Every protocol x mode of every attack is in the logged table ``protocols.json`` (MLflow's Evaluation view)
and in ``result.json`` (the report card itself, which ``anonrisk compare --mlflow`` reads). The full flat
names of ``result_metrics`` (``contrastive.full-ref.exclude-source.top1``) are those of ``anonrisk compare``.
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
from pathlib import Path
from typing import Any, Optional

from anonrisk.config.schema import RunConfig

log = logging.getLogger("anonrisk")
HEADLINE = "full-ref/exclude-source"
MAX_HEADLINE = 40  # an MLflow run page stays readable


def tracking_uri(cfg: RunConfig) -> str:
    if cfg.tracking.tracking_uri:
        return cfg.tracking.tracking_uri
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path(cfg.runs_dir).resolve()}/mlflow.db"


def resolved_uri(cfg: RunConfig) -> str:
    """The tracking URI with a relative sqlite path made absolute (jobs may start in another directory)."""
    uri = tracking_uri(cfg)
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        uri = "sqlite:///" + str(Path(uri[len("sqlite:///"):]).resolve())
    return uri


def client(uri: str):
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # a bar per downloaded result.json
    from mlflow import MlflowClient

    if not log.isEnabledFor(logging.DEBUG):  # -v keeps them; else "Creating initial MLflow database tables..." etc.
        for name in ("mlflow", "alembic"):
            logging.getLogger(name).setLevel(logging.WARNING)
    return MlflowClient(uri)


def artifact_root(uri: str) -> Optional[str]:
    """Where a new experiment keeps its artifacts: beside a sqlite database (``<runs_dir>/mlartifacts`` by
    default, not ``./mlruns`` in whatever directory the run started); a server decides for itself."""
    if uri.startswith("sqlite:///"):
        return (Path(uri[len("sqlite:///"):]).parent / "mlartifacts").as_uri()
    return None


def experiment_id(mlflow_client, name: str, uri: str) -> str:
    exp = mlflow_client.get_experiment_by_name(name)
    return exp.experiment_id if exp else mlflow_client.create_experiment(name, artifact_location=artifact_root(uri))


def now_ms() -> int:
    return int(time.time() * 1000)


def flatten(prefix: str, obj: Any, out: dict[str, Any]) -> dict[str, Any]:
    if isinstance(obj, dict):
        for k, v in obj.items():
            flatten(f"{prefix}.{k}" if prefix else str(k), v, out)
    else:
        out[prefix] = obj
    return out


def result_metrics(result: dict[str, Any]) -> dict[str, float]:
    """One anonymizer's report card as flat metrics: ``<attack>.<protocol>.<mode>.<metric>``, the worst case
    over attacks as ``worst.<protocol>.<mode>.top1``, ``leakage.*`` and ``utility.*`` (``anonrisk compare``)."""
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


def metric_name(*parts: str) -> str:
    """A metric name MLflow accepts (letters, digits, ``_ - . /`` and spaces)."""
    return "/".join(re.sub(r"[^\w\-. ]", "_", p) for p in parts)


def headline_metrics(card: dict[str, Any]) -> dict[str, float]:
    """At most ``MAX_HEADLINE`` metrics that say at a glance how private one anonymizer is (see the module doc)."""
    from anonrisk.report.card import protocol_keys, ran, worst_case

    keys = protocol_keys({"card": card})
    key = HEADLINE if HEADLINE in keys else (keys[0] if keys else None)
    out: dict[str, Any] = {}
    w = worst_case(card, key) if key else None
    if w:
        m = w["metric"]
        out.update({"worst/top1": m["value"], "worst/top1_lo": m["ci95"][0], "worst/top1_hi": m["ci95"][1],
                    "worst/top1_norm": m["normalized"], "worst/chance": m["chance"]})
    linkage = worst_case(card, "full-ref/linkage") if "full-ref/linkage" in keys else None
    if linkage:
        out["worst/linkage_top1"] = linkage["metric"]["value"]
    attacks = {a: r["protocols"][key]["top1"] for a, r in ran(card).items() if key in r["protocols"]}
    for k, v in card.get("leakage", {}).items():
        if isinstance(v, (int, float)) and k != "n_pairs":
            out[metric_name("leakage", k)] = v
    for k, v in card.get("utility", {}).items():
        if isinstance(v, (int, float)) and k not in ("n_pairs", "identical_pairs"):
            out[metric_name("utility", k)] = v
    room = MAX_HEADLINE - len(out)
    with_interval = len(attacks) * 4 <= room  # else top-1 and its normalized value only
    for a, m in attacks.items():
        if room < 2:
            break
        out[metric_name(a, "top1")], out[metric_name(a, "top1_norm")] = m["value"], m["normalized"]
        if with_interval:
            out[metric_name(a, "top1_lo")], out[metric_name(a, "top1_hi")] = m["ci95"]
        room -= 4 if with_interval else 2
    return {k: float(v) for k, v in out.items() if v is not None and v == v}


def protocol_table(card: dict[str, Any]) -> dict[str, list]:
    """Every attack x protocol x mode of one report card as columns (``MlflowClient.log_table``)."""
    from anonrisk.report.card import protocol_keys, ran

    cols: dict[str, list] = {c: [] for c in ("attack", "protocol", "mode", "top1", "top1_lo", "top1_hi", "top1_norm", "chance",
                                              "top5", "top5_norm", "mrr", "probes", "identities", "pool")}
    for attack, r in ran(card).items():
        for key in protocol_keys({"card": {"attacks": {attack: r}}}):
            m = r["protocols"][key]
            protocol, _, mode = key.partition("/")
            row = {"attack": attack, "protocol": protocol, "mode": mode, "top1": m["top1"]["value"], "top1_lo": m["top1"]["ci95"][0],
                   "top1_hi": m["top1"]["ci95"][1], "top1_norm": m["top1"]["normalized"], "chance": m["top1"]["chance"],
                   "top5": m["top5"]["value"], "top5_norm": m["top5"]["normalized"], "mrr": m["mrr"]["value"], "probes": m.get("n_probes"),
                   "identities": m.get("n_identities"), "pool": m.get("pool")}
            for c in cols:
                cols[c].append(row[c])
    return cols


def params_of(flat: dict[str, Any]):
    from mlflow.entities import Param

    return [Param(k, json.dumps(v) if isinstance(v, (list, dict)) else str(v)[:6000]) for k, v in flat.items()]


def run_params(config: dict[str, Any]) -> dict[str, Any]:
    """A run config as MLflow params: ``data.*``, ``train.*``, ``evaluate.*``, the attacks and anonymizers."""
    params = flatten("", {k: config[k] for k in ("data", "train", "evaluate") if k in config}, {})
    params["attacks"] = ",".join(a["name"] if isinstance(a, dict) else str(a) for a in config.get("attacks", []))
    params["anonymizers"] = ",".join(a["name"] if isinstance(a, dict) else str(a) for a in config.get("anonymizers", []))
    params["anonymize.seed"] = config.get("anonymize", {}).get("seed")
    return params


def log_batch(mlflow_client, run_id: str, metrics: list = (), params: list = ()) -> None:
    """Within MLflow's limits per call (1000 metrics, 100 params)."""
    metrics, params = list(metrics), list(params)
    for i in range(0, len(params), 100):
        mlflow_client.log_batch(run_id, params=params[i : i + 100])
    for i in range(0, len(metrics), 900):
        mlflow_client.log_batch(run_id, metrics=metrics[i : i + 900])


def log_metrics(mlflow_client, run_id: str, values: dict[str, float], step: int = 0) -> None:
    from mlflow.entities import Metric

    t = now_ms()
    log_batch(mlflow_client, run_id, [Metric(k, float(v), t, step) for k, v in values.items()])


def log_card(mlflow_client, run_id: str, card: dict[str, Any]) -> None:
    """A report card into a child run: headline metrics, the protocol table and the card itself."""
    import tempfile

    log_metrics(mlflow_client, run_id, headline_metrics(card))
    table = protocol_table(card)
    if table["attack"]:
        mlflow_client.log_table(run_id, table, "protocols.json")
    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / "result.json"
        p.write_text(json.dumps(card, indent=1, sort_keys=True, default=str))
        mlflow_client.log_artifact(run_id, str(p))


def ui_hint(uri: str, exp_id: str, run_id: str) -> str:
    """How to look at a run: the ``mlflow ui`` command for a local store, the page for a server."""
    page = f"#/experiments/{exp_id}/runs/{run_id}"
    if uri.startswith(("http://", "https://")):
        return f"MLflow: {uri.rstrip('/')}/{page}"
    return f"MLflow: mlflow ui --backend-store-uri {uri} --port 5000, then http://127.0.0.1:5000/{page}"


def supersede(client, run_id: str, by: str) -> None:
    """An old run (a run's or a grid cell's) that no longer describes the numbers says so in its name and tags
    (a run killed without a word, still RUNNING, ends KILLED)."""
    try:
        run = client.get_run(run_id)
        client.set_tag(run_id, "anonrisk.superseded_by", by)
        if not run.info.run_name.endswith("(superseded)"):
            client.update_run(run_id, name=f"{run.info.run_name} (superseded)")
        if run.info.status == "RUNNING":
            client.set_terminated(run_id, "KILLED")
    except Exception as exc:  # noqa: BLE001 - deleted by hand
        log.debug("MLflow: cannot mark run %s superseded: %s", run_id, exc)
