"""The stage chain of one run: prepare -> anonymize -> train -> evaluate -> report.

Each method is idempotent: it reuses a finished stage (DONE marker) and resumes an unfinished one, so
``anonrisk run`` twice does no work the second time, and the stage commands can be run one by one (or by
a grid launcher, one cell per job) in any order.
"""

from __future__ import annotations

import logging
from functools import cached_property
from typing import Optional

from anonrisk.config.schema import AnonymizerSpec, AttackSpec, RunConfig
from anonrisk.data.records import FaceRecord, read_manifest
from anonrisk.devices import resolve_device
from anonrisk.errors import Unavailable
from anonrisk.stages import StageDir

log = logging.getLogger("anonrisk")


class Pipeline:
    def __init__(self, cfg: RunConfig):
        self.cfg = cfg
        self.progress = cfg.progress
        self._attacks: dict[str, object] = {}

    # ---- prepare ---------------------------------------------------------------------------------
    @cached_property
    def _prepared(self) -> tuple[StageDir, list[FaceRecord]]:
        from anonrisk.data.datasets import prepare

        return prepare(self.cfg.data, self.cfg.runs_dir, self.progress)

    def prepare(self) -> StageDir:
        return self._prepared[0]

    @property
    def records(self) -> list[FaceRecord]:
        return self._prepared[1]

    @property
    def data_fp(self) -> str:
        # from the config alone, so a grid can plan every downstream stage before any data is prepared
        from anonrisk.data.datasets import data_fingerprint

        return data_fingerprint(self.cfg.data)

    def prepare_stage(self) -> StageDir:
        return StageDir(self.cfg.runs_dir, "prepare", self.data_fp)

    def spec(self, name: str) -> AnonymizerSpec:
        for s in self.cfg.anonymizers:
            if s.name == name:
                return s
        raise KeyError(name)

    # ---- anonymize -------------------------------------------------------------------------------
    def anonymizer_stage(self, spec: AnonymizerSpec):
        from anonrisk.anonymize import build_anonymizer
        from anonrisk.anonymize.runner import anonymize_stage

        anonymizer = build_anonymizer(spec)
        return anonymizer, anonymize_stage(self.cfg.runs_dir, self.data_fp, anonymizer, self.cfg.data.image_size, self.cfg.anonymize)

    def validate_anonymizers(self) -> None:
        """Build and validate every anonymizer before any image is processed."""
        from anonrisk.anonymize import build_anonymizer

        for spec in self.cfg.anonymizers:
            build_anonymizer(spec).validate()

    def validate_training(self) -> None:
        """Refuse an impossible training plan (fp16 on the CPU, a batch the launched ranks cannot share,
        GradCache on an unsupported ZeRO stage, ...) before any stage runs."""
        from anonrisk.attack.dist import read_env
        from anonrisk.attack.engine import validate_plan

        validate_plan(self.cfg.attack, resolve_device(self.cfg.attack.device), read_env().world_size)

    def validate(self) -> None:
        self.validate_anonymizers()
        self.validate_training()

    def anonymize(self, spec: AnonymizerSpec) -> StageDir:
        anonymizer, stage = self.anonymizer_stage(spec)
        if stage.is_done():
            return stage
        anonymizer.validate()
        if self.cfg.anonymize.runner == "ray":
            from anonrisk.anonymize.ray_runner import anonymize_ray

            return anonymize_ray(spec, anonymizer, self.records, stage, self.cfg.data.image_size, self.cfg.anonymize, self.progress)
        from anonrisk.anonymize.runner import anonymize_local

        device = resolve_device(self.cfg.anonymize.device)
        return anonymize_local(spec, anonymizer, self.records, stage, self.cfg.data.image_size, self.cfg.anonymize, device, self.progress)

    # ---- attacks --------------------------------------------------------------------------------
    def attack_spec(self, attack: str | AttackSpec) -> AttackSpec:
        """An attack of this config by name; a registered kind not in the config runs with its defaults."""
        if isinstance(attack, AttackSpec):
            return attack
        for a in self.cfg.attacks:
            if a.name == attack:
                return a
        return AttackSpec(name=attack, kind=attack)

    def build_attack(self, attack: str | AttackSpec = "contrastive"):
        from anonrisk.attack.suite import build_attack

        spec = self.attack_spec(attack)
        if spec.name not in self._attacks or self._attacks[spec.name].spec != spec:
            index = next((i for i, a in enumerate(self.cfg.attacks) if a.name == spec.name), None)
            key = f"attacks[{index}] ({spec.name})" if index is not None else f"attack {spec.name}"
            self._attacks[spec.name] = build_attack(spec, key)
        return self._attacks[spec.name]

    def validate_attacks(self) -> dict[str, str]:
        """Check every configured attack before any work (needs the prepared records): a wrong setting is a
        ConfigError; a missing optional resource (weights, package) comes back as {name: reason}."""
        unavailable = {}
        for a in self.cfg.attacks:
            try:
                self.build_attack(a).validate(self)
            except Unavailable as exc:
                unavailable[a.name] = str(exc)
        return unavailable

    # ---- train -----------------------------------------------------------------------------------
    def train_stage(self, spec: AnonymizerSpec, attack: str | AttackSpec = "contrastive") -> StageDir:
        from anonrisk.attack.train import train_fingerprint

        if self.attack_spec(attack) != AttackSpec(name="contrastive", kind="contrastive"):
            return self.build_attack(attack).train_stage(self, spec)
        _, anon_stage = self.anonymizer_stage(spec)
        fp = train_fingerprint(self.cfg.attack, self.data_fp, anon_stage.fingerprint, self.cfg.data.image_size)
        return StageDir(self.cfg.runs_dir, "train", fp)

    def train(self, spec: AnonymizerSpec, attack: str | AttackSpec = "contrastive") -> StageDir:
        """Train (or reuse) the encoder of a trained attack (contrastive, surrogate, edge-encoder) against ``spec``."""
        from anonrisk.attack.train import train_attack

        if self.attack_spec(attack) != AttackSpec(name="contrastive", kind="contrastive"):
            atk = self.build_attack(attack)
            atk.prepare(self, spec)
            return atk.train_stage(self, spec)
        stage = self.train_stage(spec)
        if stage.is_done():
            return stage
        from anonrisk.attack.dist import read_env

        if read_env().world_size > 1 and not self.anonymizer_stage(spec)[1].is_done():
            from anonrisk.errors import ConfigError

            # several ranks would write the same shards: anonymize once, then launch the training ranks
            raise ConfigError(f"multi-process training of {spec.name!r}: run `anonrisk anonymize` first (one process)")
        anon_stage = self.anonymize(spec)
        train_attack(
            self.cfg.attack,
            read_manifest(anon_stage / "manifest.jsonl"),
            self.records,
            self.cfg.data.image_size,
            stage,
            resolve_device(self.cfg.attack.device),
            self.progress,
        )
        return stage

    # ---- evaluate --------------------------------------------------------------------------------
    def evaluate_stage(self, spec: AnonymizerSpec, attack: str | AttackSpec = "contrastive") -> StageDir:
        from anonrisk.evaluate.evaluate import eval_fingerprint

        return StageDir(self.cfg.runs_dir, "evaluate", eval_fingerprint(self.cfg.evaluate, self.build_attack(attack).fingerprint(self, spec)))

    def quality_stage(self, spec: AnonymizerSpec) -> StageDir:
        from anonrisk.evaluate.evaluate import quality_fingerprint

        _, anon_stage = self.anonymizer_stage(spec)
        return StageDir(self.cfg.runs_dir, "quality", quality_fingerprint(self.cfg.evaluate, self.data_fp, anon_stage.fingerprint, self.cfg.data.image_size))

    def quality(self, spec: AnonymizerSpec) -> dict:
        """Structure leakage and utility of ``spec``'s test images (independent of any attack)."""
        from anonrisk.evaluate.evaluate import measure_quality

        stage = self.quality_stage(spec)
        anon = [] if stage.is_done() else read_manifest(self.anonymize(spec) / "manifest.jsonl")
        return measure_quality(anon, self.records, self.cfg.data.image_size, self.cfg.evaluate, stage)

    def attack_result(self, spec: AnonymizerSpec, attack: str | AttackSpec = "contrastive") -> dict:
        """One attack against one anonymizer: protocols with intervals (raises Unavailable when it cannot run)."""
        from anonrisk.evaluate.evaluate import QUALITY_KEYS, evaluate_similarity, probes_and_gallery
        from anonrisk.stages import read_json

        atk = self.build_attack(attack)
        stage = self.evaluate_stage(spec, attack)
        if stage.is_done():
            metrics = read_json(stage / "metrics.json")
        else:
            atk.validate(self)
            atk.prepare(self, spec)
            probes, gallery = probes_and_gallery(read_manifest(self.anonymize(spec) / "manifest.jsonl"), self.records)
            metrics = evaluate_similarity(lambda p, g: atk.similarity(self, spec, p, g), probes, gallery, self.cfg.evaluate, stage,
                                          {"attack": atk.describe(), "evaluate": self.cfg.evaluate.model_dump(exclude=set(QUALITY_KEYS))})
        _, anon_stage = self.anonymizer_stage(spec)
        return {
            "attack": atk.spec.name,
            "kind": atk.spec.kind,
            "threat": atk.threat,
            "fingerprints": {"data": self.data_fp, "anonymize": anon_stage.fingerprint, **atk.upstream(self, spec), "evaluate": stage.fingerprint},
            **metrics,
        }

    def evaluate(self, spec: AnonymizerSpec, attack: str | AttackSpec = "contrastive") -> dict:
        """One attack against one anonymizer, with the anonymizer's leakage (the v1 result shape)."""
        result = {"anonymizer": spec.model_dump(), **self.attack_result(spec, attack)}
        if self.cfg.evaluate.leakage:
            result["leakage"] = self.quality(spec)["leakage"]
        return result

    def report_card(self, spec: AnonymizerSpec, unavailable: Optional[dict[str, str]] = None) -> dict:
        """Every configured attack against ``spec`` (a skipped one with its reason), leakage and utility."""
        unavailable = unavailable or {}
        attacks = {}
        for a in self.cfg.attacks:
            if a.name in unavailable:
                attacks[a.name] = {"attack": a.name, "kind": a.kind, "skipped": unavailable[a.name]}
                continue
            try:
                attacks[a.name] = self.attack_result(spec, a)
            except Unavailable as exc:
                log.warning("attack %s skipped for %s: %s", a.name, spec.name, exc)
                attacks[a.name] = {"attack": a.name, "kind": a.kind, "skipped": str(exc)}
        _, anon_stage = self.anonymizer_stage(spec)
        return {
            "anonymizer": spec.model_dump(),
            "fingerprints": {"data": self.data_fp, "anonymize": anon_stage.fingerprint, "quality": self.quality_stage(spec).fingerprint},
            "attacks": attacks,
            **self.quality(spec),
        }

    # ---- the whole run ---------------------------------------------------------------------------
    def run(self, only: Optional[list[str]] = None) -> dict:
        from anonrisk.report.report import write_report

        self.validate()
        self.prepare()
        unavailable = self.validate_attacks()
        results = {}
        for spec in self.cfg.anonymizers:
            if only and spec.name not in only:
                continue
            results[spec.name] = self.report_card(spec, unavailable)
        return write_report(self.cfg, self.prepare(), results)
