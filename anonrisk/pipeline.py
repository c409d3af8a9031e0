"""The executor of a run's plan (``anonrisk.plan``): prepare -> anonymize -> train -> evaluate -> report.

Each method is idempotent: it reuses a finished stage (DONE marker) and resumes an unfinished one, so
``anonrisk run`` twice does no work the second time, and the stage commands can be run one by one (or by
a grid launcher, one cell per job) in any order. Attacks get an ``AttackContext``, never the pipeline.
"""

from __future__ import annotations

import logging
from functools import cached_property, partial
from typing import Callable, Optional, Union

from anonrisk.config.schema import DataConfig, RunConfig, Spec
from anonrisk.data.records import FaceRecord, read_manifest
from anonrisk.errors import ConfigError, Unavailable
from anonrisk.plan import AttackPlan, RunPlan, TargetPlan, plan, plan_data
from anonrisk.stages import StageDir

log = logging.getLogger("anonrisk")
Target = Union[str, Spec, TargetPlan]


def prepare_data(cfg: DataConfig, runs_dir: str, progress: bool = True) -> tuple[StageDir, list[FaceRecord]]:
    """Run (or reuse) the prepare stage of a data config alone; its directory and the manifest's records."""
    from anonrisk.data.prepare import prepare

    dataset, stage = plan_data(cfg, runs_dir)
    return stage, prepare(cfg, dataset, stage, progress)


class Pipeline:
    def __init__(self, cfg: Union[RunConfig, RunPlan]):
        self.plan = cfg if isinstance(cfg, RunPlan) else plan(cfg)
        self.cfg = self.plan.cfg
        self.progress = self.cfg.progress
        # (attack, step, loss, lr) from a training loop, on rank 0: the MLflow live curve (tracking/steps.py)
        self.on_train_step: Optional[Callable[[str, int, float, float], None]] = None

    def target(self, which: Target) -> TargetPlan:
        return which if isinstance(which, TargetPlan) else self.plan.target(which)

    def attack(self, target: Target, name: str) -> AttackPlan:
        t = self.target(target)
        if name not in t.attacks:
            raise ConfigError(f"attack {name!r} is not in this config; in it: {', '.join(t.attacks)}")
        return t.attacks[name]

    # ---- prepare ---------------------------------------------------------------------------------
    @cached_property
    def records(self) -> list[FaceRecord]:
        from anonrisk.data.prepare import prepare

        return prepare(self.cfg.data, self.plan.dataset, self.plan.prepare, self.progress)

    def prepare(self) -> StageDir:
        self.records  # noqa: B018 - runs (or reuses) the stage
        return self.plan.prepare

    # ---- checks before any work --------------------------------------------------------------------
    def validate(self) -> None:
        """Every anonymizer and every trained attack's training plan (fp16 on the CPU, a batch the launched
        ranks cannot share, GradCache on an unsupported ZeRO stage, ...), before any stage runs."""
        from anonrisk.attack.train_plan import check_training

        for t in self.plan.targets.values():
            t.anonymizer.validate()
        for a in next(iter(self.plan.targets.values())).trained():
            check_training(a.train_config)

    def context(self, target: Optional[TargetPlan], a: AttackPlan):
        from anonrisk.attack.base import AttackContext

        anonymized = (lambda: self._anonymized(target)) if target is not None else None
        on_step = partial(self.on_train_step, a.name) if self.on_train_step else None
        return AttackContext(self.records, self.cfg.data.image_size, self.progress, a.train, a.train_config, a.caches, anonymized, on_step)

    def validate_attacks(self) -> dict[str, str]:
        """Check every configured attack before any work (needs the prepared records): a wrong setting is a
        ConfigError; a missing optional resource (weights, package) comes back as {name: reason}."""
        unavailable = {}
        for a in next(iter(self.plan.targets.values())).attacks.values():  # an attack's checks do not depend on the target
            try:
                a.attack.validate(self.context(None, a))
            except Unavailable as exc:
                unavailable[a.name] = str(exc)
        return unavailable

    # ---- anonymize -------------------------------------------------------------------------------
    def anonymize(self, target: Target) -> StageDir:
        from anonrisk.anonymize.runner import AnonymizeJob, anonymize_local

        t = self.target(target)
        if t.anonymize.is_done():
            return t.anonymize
        t.anonymizer.validate()
        job = AnonymizeJob(t.spec, t.anonymizer, self.records, t.anonymize, self.cfg.data.image_size, self.cfg.anonymize, self.progress,
                           self.cfg.data.on_bad_image)
        if self.cfg.anonymize.runner == "ray":
            from anonrisk.anonymize.ray_runner import anonymize_ray

            return anonymize_ray(job)
        return anonymize_local(job)

    def _anonymized(self, t: TargetPlan) -> list[FaceRecord]:
        """The target's anonymized manifest for an attack, anonymizing first (in one process only)."""
        from anonrisk.attack.dist import read_env

        world = read_env().world_size
        if world > 1 and not t.anonymize.is_done():
            # several ranks would write the same shards: anonymize once, then launch the training ranks
            raise ConfigError(f"{world} processes would anonymize {t.name!r} at once: run `anonrisk anonymize` first (one process)")
        return read_manifest(self.anonymize(t) / "manifest.jsonl")

    # ---- train -----------------------------------------------------------------------------------
    def train(self, target: Target, attack: str) -> StageDir:
        """Train (or reuse) the encoder of a trained attack against ``target``."""
        t = self.target(target)
        a = self.attack(t, attack)
        if a.train is None:
            raise ConfigError(f"{a.key}: a {a.spec.kind} attack trains nothing")
        if not a.train.is_done():
            a.attack.train(self.context(t, a))
        return a.train

    # ---- evaluate --------------------------------------------------------------------------------
    def quality(self, target: Target) -> dict:
        """Structure leakage and utility of the target's test images (independent of any attack)."""
        from anonrisk.evaluate.evaluate import measure_quality

        t = self.target(target)
        anon = [] if t.quality.is_done() else read_manifest(self.anonymize(t) / "manifest.jsonl")
        return measure_quality(anon, self.records, self.cfg.data.image_size, self.cfg.evaluate, t.quality)

    def attack_result(self, target: Target, attack: str) -> dict:
        """One attack against one anonymizer: protocols with intervals (raises Unavailable when it cannot run)."""
        from anonrisk.evaluate.evaluate import QUALITY_KEYS, evaluate_similarity, probes_and_gallery
        from anonrisk.stages import read_json

        t = self.target(target)
        a = self.attack(t, attack)
        if a.evaluate.is_done():
            metrics = read_json(a.evaluate / "metrics.json")
        else:
            ctx = self.context(t, a)
            a.attack.validate(ctx)
            a.attack.train(ctx)
            probes, gallery = probes_and_gallery(ctx.anonymized(), self.records)
            begin = {"attack": {**a.attack.describe(), "spec": a.spec.model_dump()},
                     "evaluate": self.cfg.evaluate.model_dump(exclude=set(QUALITY_KEYS))}
            metrics = evaluate_similarity(lambda p, g: a.attack.similarity(ctx, p, g), probes, gallery, self.cfg.evaluate, a.evaluate, begin)
        return {
            "attack": a.name,
            "kind": a.spec.kind,
            "threat": a.attack.threat,
            "fingerprints": {"data": t.data.fingerprint, "anonymize": t.anonymize.fingerprint, **a.fingerprints()},
            **metrics,
        }

    def evaluate(self, target: Target, attack: str) -> dict:
        """One attack against one anonymizer, with the anonymizer's leakage (the v1 result shape)."""
        t = self.target(target)
        result = {"anonymizer": t.spec.model_dump(), **self.attack_result(t, attack)}
        if self.cfg.evaluate.leakage:
            result["leakage"] = self.quality(t)["leakage"]
        return result

    def report_card(self, target: Target, unavailable: Optional[dict[str, str]] = None) -> dict:
        """Every configured attack against ``target`` (a skipped one with its reason), leakage and utility."""
        t = self.target(target)
        unavailable = unavailable or {}
        attacks = {}
        for a in t.attacks.values():
            if a.name in unavailable:
                attacks[a.name] = {"attack": a.name, "kind": a.spec.kind, "skipped": unavailable[a.name]}
                continue
            try:
                attacks[a.name] = self.attack_result(t, a.name)
            except Unavailable as exc:
                log.warning("attack %s skipped for %s: %s", a.name, t.name, exc)
                attacks[a.name] = {"attack": a.name, "kind": a.spec.kind, "skipped": str(exc)}
        return {
            "anonymizer": t.spec.model_dump(),
            "fingerprints": {"data": t.data.fingerprint, "anonymize": t.anonymize.fingerprint, "quality": t.quality.fingerprint},
            "attacks": attacks,
            **self.quality(t),
        }

    # ---- the whole run ---------------------------------------------------------------------------
    def run(self, only: Optional[list[str]] = None) -> dict:
        """Every stage of every anonymizer (or those in ``only``), then the report; MLflow follows the work:
        the parent run is open for the whole run, each anonymizer's child run while its stages run."""
        from anonrisk.report.report import write_report
        from anonrisk.tracking.run_log import track_run

        self.validate()
        names = [name for name in self.plan.targets if not only or name in only]
        with track_run(self.cfg, self.plan, names) as tracker:
            self.on_train_step = tracker.on_train_step
            self.prepare()
            unavailable = self.validate_attacks()
            results = {}
            for name in names:
                t = self.plan.targets[name]
                with tracker.child(t):
                    results[name] = self.report_card(t, unavailable)
                    tracker.log_card(t, results[name])
            doc = write_report(self.cfg, self.prepare(), results, {name: self.plan.targets[name].anonymize for name in names})
            doc["mlflow"] = tracker.finish(doc)
        return doc
