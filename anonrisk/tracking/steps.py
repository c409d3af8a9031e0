"""Metrics that arrive while work runs: the training loss and learning rate per step, and MLflow's system
metrics. The training loop only appends to a list; a thread sends a batch every few seconds, so MLflow never
slows a step, and an MLflow that cannot be reached is reported once and never stops training (the stage's
``log.jsonl`` holds the whole curve)."""

from __future__ import annotations

import json
import logging
import threading
from pathlib import Path
from typing import Optional

from anonrisk.tracking.mlflow_log import log_batch, now_ms

log = logging.getLogger("anonrisk")
SYSTEM_INTERVAL_S = 5.0  # MLflow's default is 10 s; MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL overrides both


def train_metric_names(attack: str, several: bool) -> tuple[str, str]:
    """``train/loss`` and ``train/lr``; ``train/<attack>/loss`` when one run trains several attacks."""
    from anonrisk.tracking.mlflow_log import metric_name

    return (metric_name("train", attack, "loss"), metric_name("train", attack, "lr")) if several else ("train/loss", "train/lr")


def read_log(path: Path) -> list[dict]:
    """A training log (``log.jsonl``), a torn last line (a kill mid-write) left out."""
    out = []
    for line in Path(path).read_text().splitlines() if Path(path).exists() else []:
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out


class StepLogger:
    """``logger(step, loss, lr)`` from the training loop; ``close(log_path)`` sends the rest and fills in any
    step of the stage's log that this run has no point for (a reused or resumed training), so each step has
    exactly one point. Steps the run already holds (a requeued job that resumes) are skipped."""

    def __init__(self, mlflow_client, run_id: str, names: tuple[str, str] = ("train/loss", "train/lr"), interval_s: float = 2.0):
        self.client, self.run_id, self.names = mlflow_client, run_id, names
        self._seen = {m.step for m in mlflow_client.get_metric_history(run_id, names[0])}
        self._buffer: list = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._failed = False
        self._interval = interval_s
        self._thread: Optional[threading.Thread] = None

    def __call__(self, step: int, loss: float, lr: float) -> None:
        if step in self._seen:
            return
        self._seen.add(step)
        with self._lock:
            self._buffer.append((step, loss, lr, now_ms()))
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="anonrisk-mlflow-steps", daemon=True)
            self._thread.start()

    def _loop(self) -> None:
        while not self._stop.wait(self._interval):
            self._flush()

    def _flush(self, final: bool = False) -> None:
        from mlflow.entities import Metric

        with self._lock:
            batch, self._buffer = self._buffer, []
        if not batch or (self._failed and not final):
            with self._lock:
                self._buffer[:0] = batch
            return
        loss, lr = self.names
        metrics = [Metric(loss, float(v), t, s) for s, v, _, t in batch] + [Metric(lr, float(r), t, s) for s, _, r, t in batch if r == r]
        try:
            log_batch(self.client, self.run_id, metrics)
        except Exception as exc:  # noqa: BLE001 - MLflow is a view: training goes on, log.jsonl has the curve
            with self._lock:
                self._buffer[:0] = batch  # kept for one more try at close
            if not self._failed:
                log.warning("MLflow: live training metrics paused (%s: %s); the curve stays in the stage's log.jsonl",
                            type(exc).__name__, str(exc).splitlines()[0] if str(exc) else "")
            self._failed = True

    def close(self, log_path: Optional[Path] = None) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        for e in read_log(log_path) if log_path else []:
            if e["step"] not in self._seen:  # trained before this run opened (reused, or resumed)
                self._seen.add(e["step"])
                self._buffer.append((e["step"], e["loss"], e.get("lr", float("nan")), now_ms()))
        self._flush(final=True)


def fan_out(loggers: list[StepLogger]):
    """One training serving several runs (a grid's train node shared by cells): each gets every step."""
    def on_step(step: int, loss: float, lr: float) -> None:
        for logger in loggers:
            logger(step, loss, lr)

    return on_step


def system_monitor(uri: str, run_id: str):
    """MLflow's system metrics (``system/*``: CPU, memory, disk, network; GPUs with nvidia-ml-py) for a run
    while it is open; None where they are unavailable (MLflow needs psutil)."""
    try:
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

        monitor = SystemMetricsMonitor(run_id, sampling_interval=SYSTEM_INTERVAL_S, resume_logging=True, tracking_uri=uri)
        monitor.start()
        return monitor
    except Exception as exc:  # noqa: BLE001 - optional: psutil missing, an old MLflow
        log.debug("MLflow system metrics unavailable: %s", exc)
        return None


def stop_monitor(monitor) -> None:
    if monitor is not None:
        try:
            monitor.finish()
        except Exception as exc:  # noqa: BLE001
            log.debug("MLflow system metrics: %s", exc)
