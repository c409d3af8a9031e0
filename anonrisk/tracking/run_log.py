"""MLflow runs of one ``anonrisk run``, opened when their work starts and closed when it ends.

The parent run opens before the data is prepared and closes after the report is written: the run's params,
a summary per anonymizer (``worst_top1/<anonymizer>``, ``worst_top1_norm/<anonymizer>``), an overview table
and the report's files (metrics.json, report.md, the leaderboard, the plots). Each anonymizer is a child run,
open while its stages run (anonymize, train, evaluate), with the live training curve, system metrics, the
headline metrics, the protocol table and its report card (``mlflow_log.py``). Nothing is logged when
``tracking.mlflow`` is off.

Runs are keyed by fingerprint: the parent by the run's plan (the stage directories of every anonymizer),
each child by its anonymizer's stages. ``results/<run>/mlflow.json`` keeps the ids. A rerun of the same plan
whose parent finished logs nothing; a changed plan makes new runs and marks the previous ones superseded (tag
``anonrisk.superseded_by`` and "(superseded)" after their name), so a run always describes the numbers it
holds. An MLflow that cannot be reached is reported once and the run goes on (the JSON results are the truth).
"""

from __future__ import annotations

import contextlib
import logging
import tempfile
from pathlib import Path
from typing import Any, Iterator, Optional

from anonrisk.stages import fingerprint, read_json, write_json
from anonrisk.tracking import mlflow_log as ml
from anonrisk.tracking.steps import StepLogger, stop_monitor, system_monitor, train_metric_names

log = logging.getLogger("anonrisk")
STATE = "mlflow.json"


def run_fingerprint(plan, names: list[str]) -> str:
    return fingerprint("mlflow-run", plan.cfg.name, {n: plan.targets[n].fingerprints() for n in names})


def _status(exc: Optional[BaseException]) -> str:
    from anonrisk.attack.train import Preempted

    return "FINISHED" if exc is None else "KILLED" if isinstance(exc, (KeyboardInterrupt, Preempted)) else "FAILED"


class RunTracker:
    """``with track_run(cfg, plan, names) as tracker``: ``tracker.child(target)`` around each anonymizer's
    work, ``tracker.on_train_step`` for the trainer, ``tracker.finish(doc)`` once the report is written."""

    def __init__(self, cfg, plan, names: list[str]):
        self.cfg, self.plan, self.names = cfg, plan, names
        self.out = Path(cfg.results_dir) / cfg.name
        self.state: dict[str, Any] = {}
        self.client = None
        self.current: Optional[dict[str, Any]] = None  # the open child: run id, target, step loggers
        self.monitor = None  # the parent's system metrics
        self.run_fp = run_fingerprint(plan, names)

    # ---- opening -------------------------------------------------------------------------------------
    def open(self, force: bool = False) -> "RunTracker":
        if not self.cfg.tracking.mlflow:
            return self
        uri = ml.resolved_uri(self.cfg)
        old = read_json(self.out / STATE) if (self.out / STATE).exists() else {}
        try:
            self.client = ml.client(uri)
            if old.get("tracking_uri") == uri and old.get("run_fp") == self.run_fp and old.get("finished") and not force:
                self.state = old  # this plan is logged: log nothing unless its numbers turn out to differ
                return self
            exp = ml.experiment_id(self.client, self.cfg.tracking.experiment, uri)
            parent = self.client.create_run(exp, run_name=self.cfg.name, start_time=ml.now_ms(), tags={
                "anonrisk.run": self.cfg.name, "anonrisk.fingerprint": self.run_fp,
                "anonrisk.data_fp": self.plan.prepare.fingerprint, "anonrisk.headline_protocol": ml.HEADLINE})
            ml.log_batch(self.client, parent.info.run_id, params=ml.params_of(ml.run_params(self.cfg.model_dump(mode="json"))))
            self.state = {"tracking_uri": uri, "experiment_id": exp, "parent_run_id": parent.info.run_id, "run_fp": self.run_fp,
                          "children": {}, "finished": False}
            self._save()
            if old.get("tracking_uri") == uri and old.get("parent_run_id"):
                self._supersede(old)
            self.monitor = system_monitor(uri, parent.info.run_id)
        except Exception as exc:  # noqa: BLE001 - MLflow is a view of the JSON results
            self._lost(exc)
        return self

    @property
    def active(self) -> bool:
        return self.client is not None and bool(self.state.get("parent_run_id")) and not self.state.get("finished")

    def _lost(self, exc: BaseException) -> None:
        log.warning("MLflow at %s: %s: %s; the run goes on without it (`anonrisk report` with the same config logs it later)",
                    ml.resolved_uri(self.cfg), type(exc).__name__, str(exc).splitlines()[0] if str(exc) else "")
        self.client, self.state = None, {}

    def _save(self) -> None:
        write_json(self.out / STATE, self.state)

    def _supersede(self, old: dict[str, Any]) -> None:
        """The previous runs of results/<run>/ now describe numbers it no longer holds: say so in their names."""
        new = self.state["parent_run_id"]
        for run_id in [old["parent_run_id"], *[c["run_id"] if isinstance(c, dict) else c for c in old.get("children", {}).values()]]:
            ml.supersede(self.client, run_id, new)

    # ---- one anonymizer --------------------------------------------------------------------------------
    def _open_child(self, target) -> dict[str, Any]:
        done = [s for s, d in [("anonymize", target.anonymize), *[(f"train:{a.name}", a.train) for a in target.trained()],
                                *[(f"evaluate:{a.name}", a.evaluate) for a in target.attacks.values()]] if d.is_done()]
        run = self.client.create_run(self.state["experiment_id"], run_name=f"{self.cfg.name}/{target.name}", start_time=ml.now_ms(), tags={
            "mlflow.parentRunId": self.state["parent_run_id"], "anonrisk.run": self.cfg.name, "anonrisk.anonymizer": target.name,
            "anonrisk.fingerprint": target.cell.fingerprint, "anonrisk.anonymize_fp": target.anonymize.fingerprint,
            "anonrisk.headline_protocol": ml.HEADLINE, "anonrisk.reused_stages": ",".join(done) or "none"})
        params = {**ml.run_params(self.cfg.model_dump(mode="json")), **ml.flatten("anonymizer", target.spec.model_dump(mode="json"), {})}
        ml.log_batch(self.client, run.info.run_id, params=ml.params_of(params))
        self.state["children"][target.name] = {"run_id": run.info.run_id, "fingerprint": target.cell.fingerprint}
        self._save()
        return {"run_id": run.info.run_id, "target": target, "steps": {}, "monitor": system_monitor(self.state["tracking_uri"], run.info.run_id)}

    @contextlib.contextmanager
    def child(self, target) -> Iterator[None]:
        """Around one anonymizer's work; ``log_card`` inside it records the card before the run closes."""
        if not self.active:
            yield
            return
        try:
            self.current = self._open_child(target)
        except Exception as exc:  # noqa: BLE001
            self._lost(exc)
            yield
            return
        error: Optional[BaseException] = None
        try:
            yield
        except BaseException as exc:
            error = exc
            raise
        finally:
            self._close_child(error)

    def on_train_step(self, attack: str, step: int, loss: float, lr: float) -> None:
        cur = self.current
        if cur is None or self.client is None:
            return
        if attack not in cur["steps"]:
            names = train_metric_names(attack, len(cur["target"].trained()) > 1)
            cur["steps"][attack] = StepLogger(self.client, cur["run_id"], names)
        cur["steps"][attack](step, loss, lr)

    def log_card(self, target, card: dict[str, Any]) -> None:
        cur = self.current
        if cur is None or self.client is None or cur["target"] is not target:
            return
        try:
            ml.log_card(self.client, cur["run_id"], card)
            self.state["children"][target.name]["results_fp"] = fingerprint(card)
        except Exception as exc:  # noqa: BLE001
            self._lost(exc)

    def _close_child(self, error: Optional[BaseException]) -> None:
        cur, self.current = self.current, None
        if cur is None or self.client is None:
            return
        try:
            target = cur["target"]
            for a in target.trained():  # the whole curve of the encoder it used, live or (reused) from the log
                logger = cur["steps"].get(a.name) or StepLogger(self.client, cur["run_id"], train_metric_names(a.name, len(target.trained()) > 1))
                logger.close(a.train / "log.jsonl")
            stop_monitor(cur["monitor"])
            self.client.set_terminated(cur["run_id"], _status(error), end_time=ml.now_ms())
            self._save()
        except Exception as exc:  # noqa: BLE001
            self._lost(exc)

    # ---- the end ---------------------------------------------------------------------------------------
    def finish(self, doc: dict[str, Any]) -> Optional[dict[str, Any]]:
        """Log the report's files into the runs and close the parent; the state (for ``ui_hint``) or None."""
        if self.client is None or not self.state:
            return None
        digest = fingerprint(doc["results"], doc["config"])
        if self.state.get("finished"):
            if self.state.get("results_fp") == digest:
                return self.state
            self.open(force=True)  # the same plan, other numbers (a stage recomputed): log them afresh
            if not self.active:
                return None
        try:
            for name, card in doc["results"].items():
                if name not in self.state["children"]:  # logged after the fact
                    with self.child(self.plan.targets[name]):
                        self.log_card(self.plan.targets[name], card)
            self._artifacts(doc)
            self.state.update(results_fp=digest, finished=True)
            stop_monitor(self.monitor)
            self.client.set_terminated(self.state["parent_run_id"], "FINISHED", end_time=ml.now_ms())
            self._save()
            return self.state
        except Exception as exc:  # noqa: BLE001
            self._lost(exc)
            return None

    def _artifacts(self, doc: dict[str, Any]) -> None:
        from anonrisk.report.report import card_plot_name

        pid = self.state["parent_run_id"]
        summary = {}
        for name, card in doc["results"].items():
            head = ml.headline_metrics(card)
            for k in ("worst/top1", "worst/top1_norm"):
                if k in head:
                    summary[ml.metric_name(k.replace("worst/", "worst_"), name)] = head[k]
        summary["run/anonymizers"] = len(doc["results"])
        ml.log_metrics(self.client, pid, summary)
        board = read_json(self.out / "leaderboard.json")["rows"] if (self.out / "leaderboard.json").exists() else []
        if board:
            cols = ("rank", "anonymizer", "worst_attack", "worst_top1", "worst_top1_normalized", "chance", "edge_ssim", "ssim", "psnr")
            self.client.log_table(pid, {c: [r.get(c) for r in board] for c in cols}, "overview.json")
        for f in ("metrics.json", "report.md", "leaderboard.md", "leaderboard.json"):
            if (self.out / f).exists():
                self.client.log_artifact(pid, str(self.out / f))
        plots = self.out / "plots"
        for p in sorted(plots.glob("*.png")) if plots.is_dir() else []:
            if not p.name.startswith("samples"):  # pictures of faces go to MLflow only through tracking.log_images
                self.client.log_artifact(pid, str(p), "plots")
        for name in doc["results"]:
            child = self.state["children"].get(name, {}).get("run_id")
            if child and (plots / card_plot_name(name)).exists():
                self.client.log_artifact(child, str(plots / card_plot_name(name)))
            if child and self.cfg.tracking.log_images:
                self._log_samples(child, name, doc)

    def _log_samples(self, run_id: str, name: str, doc: dict[str, Any]) -> None:
        """``tracking.log_images``: the anonymized samples of one anonymizer, never an original."""
        from anonrisk.report.report import sample_plot_name, write_samples

        target = self.plan.targets[name]
        with tempfile.TemporaryDirectory() as d:
            path = Path(d) / sample_plot_name(name)
            if write_samples(self.cfg, self.plan.prepare, name, target.anonymize, path, originals=False):
                self.client.log_artifact(run_id, str(path), "samples")


@contextlib.contextmanager
def track_run(cfg, plan, names: list[str]) -> Iterator[RunTracker]:
    """The MLflow runs of one run (a no-op tracker when ``tracking.mlflow`` is off): every run left open by an
    error ends FAILED (KILLED on a signal or Ctrl-C)."""
    tracker = RunTracker(cfg, plan, names).open()
    try:
        yield tracker
    except BaseException as exc:
        if tracker.active:
            with contextlib.suppress(Exception):
                stop_monitor(tracker.monitor)
                tracker.client.set_terminated(tracker.state["parent_run_id"], _status(exc), end_time=ml.now_ms())
        raise
