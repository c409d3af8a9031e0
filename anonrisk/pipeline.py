"""The stage chain of one run: prepare -> anonymize -> train -> evaluate -> report.

Each method is idempotent: it reuses a finished stage (DONE marker) and resumes an unfinished one, so
``anonrisk run`` twice does no work the second time, and the stage commands can be run one by one (or by
a grid launcher, one cell per job) in any order.
"""

from __future__ import annotations

import logging
from functools import cached_property
from typing import Optional

from anonrisk.config.schema import AnonymizerSpec, RunConfig
from anonrisk.data.records import FaceRecord, read_manifest
from anonrisk.devices import resolve_device
from anonrisk.stages import StageDir

log = logging.getLogger("anonrisk")


class Pipeline:
    def __init__(self, cfg: RunConfig):
        self.cfg = cfg
        self.progress = cfg.progress

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

    # ---- train -----------------------------------------------------------------------------------
    def train_stage(self, spec: AnonymizerSpec) -> StageDir:
        from anonrisk.attack.train import train_fingerprint

        _, anon_stage = self.anonymizer_stage(spec)
        fp = train_fingerprint(self.cfg.attack, self.data_fp, anon_stage.fingerprint, self.cfg.data.image_size)
        return StageDir(self.cfg.runs_dir, "train", fp)

    def train(self, spec: AnonymizerSpec) -> StageDir:
        from anonrisk.attack.train import train_attack

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
    def evaluate_stage(self, spec: AnonymizerSpec) -> StageDir:
        from anonrisk.evaluate.evaluate import eval_fingerprint

        return StageDir(self.cfg.runs_dir, "evaluate", eval_fingerprint(self.cfg.evaluate, self.train_stage(spec).fingerprint))

    def evaluate(self, spec: AnonymizerSpec) -> dict:
        from anonrisk.attack.train import load_encoder
        from anonrisk.evaluate.evaluate import evaluate_attack
        from anonrisk.stages import read_json

        stage = self.evaluate_stage(spec)
        if stage.is_done():
            metrics = read_json(stage / "metrics.json")
        else:
            train_stage = self.train(spec)
            device = resolve_device(self.cfg.attack.device)
            model = load_encoder(self.cfg.attack, train_stage / "encoder.safetensors", device)
            anon = read_manifest(self.anonymize(spec) / "manifest.jsonl")
            metrics = evaluate_attack(model, anon, self.records, self.cfg.data.image_size, self.cfg.evaluate, stage, device)
        _, anon_stage = self.anonymizer_stage(spec)
        return {
            "anonymizer": spec.model_dump(),
            "attack": "contrastive",
            "fingerprints": {"data": self.data_fp, "anonymize": anon_stage.fingerprint,
                             "train": self.train_stage(spec).fingerprint, "evaluate": stage.fingerprint},
            **metrics,
        }

    # ---- the whole run ---------------------------------------------------------------------------
    def run(self, only: Optional[list[str]] = None) -> dict:
        from anonrisk.report.report import write_report

        self.validate()
        self.prepare()
        results = {}
        for spec in self.cfg.anonymizers:
            if only and spec.name not in only:
                continue
            results[spec.name] = self.evaluate(spec)
        return write_report(self.cfg, self.prepare(), results)
