"""The stage plan of a run (or of a grid cell), computed top-down from the config before anything executes.

This module owns every stage directory and fingerprint: a stage's fingerprint hashes what decides its
output and the fingerprints of the stages it reads, so identical work lands in the same directory whoever
asks for it (a run, a stage command, a grid cell, a sweep point) and operational settings (runner, batch
size, Ray settings, devices, checkpoint interval) never make new directories. ``plan`` also checks every
kind and its params (the registries fill when their packages are imported) and builds each anonymizer and
attack once. Planning reads no image and touches no cluster; it lists a real dataset's files (one ``stat``
each) for the data fingerprint.

    prepare/<data>                          the dataset kind's manifest
    anonymize/<data>/<anonymize>            per anonymizer
    quality/<quality>                       per anonymizer: leakage and utility
    train/<train>                           per trained attack x anonymizer (shared when the inputs are)
    embed/<embed>                           an attack's own cache (a recognizer's gallery descriptors)
    evaluate/<evaluate>                     per attack x anonymizer: the protocols
    cell/<cell>                             a grid cell's report card: named by all of the above
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

import anonrisk.anonymize  # noqa: F401  (the built-in kinds register themselves)
import anonrisk.attack  # noqa: F401
import anonrisk.data  # noqa: F401
from anonrisk.anonymize.base import ANONYMIZERS, Anonymizer
from anonrisk.attack.base import ATTACKS, Attack
from anonrisk.config.loader import preset_names
from anonrisk.config.schema import DataConfig, EvaluateConfig, RunConfig, Spec, TrainConfig
from anonrisk.config.validation import fields_of
from anonrisk.data.datasets import DATASETS, Dataset
from anonrisk.errors import ConfigError
from anonrisk.stages import StageDir, fingerprint

log = logging.getLogger("anonrisk")

CELL_VERSION = 2  # 2: a cell is named by its plan's fingerprints (1: by its whole config)


# ---- fingerprints ---------------------------------------------------------------------------------------
def data_fingerprint(cfg: DataConfig, dataset: Dataset, exclude: tuple = ()) -> str:
    """The settings and, for a dataset read from ``data.root``, its files' content (``data.fingerprint``:
    names, sizes and mtimes, or their SHA-256): an edited dataset makes a new stage; the same files at
    another path (moved with their mtimes, or hashed) keep it."""
    from anonrisk.data.content import content_fingerprint
    from anonrisk.data.prepare import DATA_VERSION

    d = cfg.model_dump(exclude={"root", "fingerprint", *cfg.kind_settings()})
    settings = dataset.p.model_dump()
    if settings:
        d[cfg.dataset] = settings
    if dataset.needs_root:
        if not cfg.root:
            raise ConfigError(f"data.root: dataset {cfg.dataset!r} needs a root directory")
        if not Path(cfg.root).expanduser().is_dir():
            raise ConfigError(f"data.root {cfg.root!r} is not a directory (dataset {cfg.dataset})")
        d["content"] = content_fingerprint(cfg.root, cfg.fingerprint, exclude)
    return fingerprint("data", DATA_VERSION, d)


def anonymize_fingerprint(anonymizer: Anonymizer, image_size: int, seed: int) -> str:
    # runner, batch size, shard size and device do not change the output (per-record seeds), so they
    # stay out of the fingerprint: a Ray run and a local run share their results.
    return fingerprint("anonymize", anonymizer.describe(), image_size, seed)


def train_fingerprint(cfg: TrainConfig, data_fp: str, source_fp: str, image_size: int) -> str:
    from anonrisk.attack.train import TRAIN_VERSION

    d = cfg.model_dump(exclude={"device", "checkpoint_every"})
    d = {k: v for k, v in d.items() if k not in _inert_train_keys(cfg)}
    if cfg.pretrained:  # pretrained backbones see their own mean/std since then (earlier runs: 0.5/0.25)
        d["input_normalization"] = "pretrained"
    return fingerprint("train", TRAIN_VERSION, d, data_fp, source_fp, image_size)


#: train keys added after TRAIN_VERSION 2 (issue 18): left out of the fingerprint at their defaults, so the
#: train stages of earlier configs keep their directories
_LATER_TRAIN_KEYS = ("trust_coefficient", "lr_scaling", "lr_base_batch", "warmup_steps", "loss_tile")


def _inert_train_keys(cfg: TrainConfig) -> set[str]:
    """Keys that cannot change this training: later keys at their defaults, and settings of what is off."""
    fields = TrainConfig.model_fields
    inert = {k for k in _LATER_TRAIN_KEYS if getattr(cfg, k) == fields[k].default}
    if cfg.optimizer != "lars":
        inert.add("trust_coefficient")
    if cfg.lr_scaling == "none":
        inert.add("lr_base_batch")
    return inert


def attack_fingerprint(attack: Attack, train_fp: Optional[str], data_fp: str, anon_fp: str) -> str:
    """What decides an attack's similarity matrix against one target: its encoder (a trained attack) or its
    settings and the data (the others), and the target's probes."""
    decided_by = (train_fp,) if train_fp else (attack.settings(), data_fp)
    return fingerprint("attack", type(attack).__name__, attack.version, *decided_by, anon_fp)


def evaluate_fingerprint(cfg: EvaluateConfig, attack_fp: str) -> str:
    from anonrisk.evaluate.evaluate import EVAL_VERSION, QUALITY_KEYS
    from anonrisk.evaluate.protocols import PROTOCOL_VERSION

    return fingerprint("evaluate", EVAL_VERSION, PROTOCOL_VERSION, cfg.model_dump(exclude=set(QUALITY_KEYS)), attack_fp)


def quality_fingerprint(cfg: EvaluateConfig, data_fp: str, anon_fp: str, image_size: int) -> str:
    from anonrisk.evaluate.evaluate import QUALITY_KEYS, QUALITY_VERSION

    return fingerprint("quality", QUALITY_VERSION, cfg.model_dump(include=set(QUALITY_KEYS)), data_fp, anon_fp, image_size)


# ---- the plan ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class AttackPlan:
    """One attack against one target."""

    name: str
    key: str  # where it is in the config: "attacks[1] (edge)"
    spec: Spec
    attack: Attack  # built once per run, shared by every target
    train_config: Optional[TrainConfig]  # None: it does not train
    train: Optional[StageDir]
    caches: dict[str, StageDir]
    evaluate: StageDir

    def fingerprints(self) -> dict[str, str]:
        train = {"train": self.train.fingerprint} if self.train else {}
        return {**train, "evaluate": self.evaluate.fingerprint}


@dataclass(frozen=True)
class TargetPlan:
    """One anonymizer (a target of the attacks) and every stage that concerns it."""

    name: str
    key: str  # "anonymizers[0] (blur)"
    spec: Spec
    anonymizer: Anonymizer  # built once
    data: StageDir
    anonymize: StageDir
    quality: StageDir
    attacks: dict[str, AttackPlan]
    cell: StageDir  # where a grid cell of this one target keeps its report card: named by the fingerprints

    def fingerprints(self) -> dict[str, Any]:
        return cell_fingerprints(self.data, self.anonymize, self.quality, self.attacks)

    def trained(self) -> list[AttackPlan]:
        return [a for a in self.attacks.values() if a.train is not None]


@dataclass(frozen=True)
class RunPlan:
    cfg: RunConfig
    dataset: Dataset
    prepare: StageDir
    targets: dict[str, TargetPlan] = field(default_factory=dict)

    def target(self, which: Union[str, Spec]) -> TargetPlan:
        name = which.name if isinstance(which, Spec) else which
        if name not in self.targets:
            raise ConfigError(f"anonymizer {name!r} is not in this config; in it: {', '.join(self.targets)}")
        return self.targets[name]


def cell_fingerprints(data: StageDir, anonymize: StageDir, quality: StageDir, attacks: dict[str, AttackPlan]) -> dict[str, Any]:
    return {"data": data.fingerprint, "anonymize": anonymize.fingerprint, "quality": quality.fingerprint,
            "attacks": {name: a.fingerprints() for name, a in attacks.items()}}


def plan_dataset(cfg: DataConfig) -> Dataset:
    """The dataset kind with its settings (``data.<kind>:``). Every settings section must name a kind, and is
    checked even when another kind is used (a base config's synthetic section under a CelebA axis)."""
    for kind in cfg.kind_settings():
        if kind not in DATASETS:
            raise ConfigError(f"data.{kind}: unknown key; valid keys here: {', '.join(fields_of(DataConfig))}, "
                              f"or the settings of a dataset kind: {', '.join(DATASETS.names())}")
    dataset = DATASETS.get(cfg.dataset, "data.dataset")
    settings = {cfg.dataset: {}, **cfg.kind_settings()}
    params = {kind: DATASETS.params(kind, given, "data", prefix=f"data.{kind}.") for kind, given in settings.items()}
    return dataset(params[cfg.dataset], "data")


def plan_data(cfg: DataConfig, runs_dir: str) -> tuple[Dataset, StageDir]:
    """The dataset kind and the prepare stage of a data config alone."""
    dataset = plan_dataset(cfg)
    return dataset, StageDir(runs_dir, "prepare", data_fingerprint(cfg, dataset, (Path(runs_dir),)))


def _anonymizer(spec: Spec, key: str) -> Anonymizer:
    if spec.kind not in ANONYMIZERS:
        presets = preset_names()
        raise ConfigError(f"{key}: unknown anonymizer {spec.kind!r}; built-in kinds: {', '.join(ANONYMIZERS.names())}; "
                          f"presets: {', '.join(presets) or '(none found)'}")
    from anonrisk.weights import localize  # weights/... and fetched hub ids under $ANONRISK_WEIGHTS (anonrisk weights)

    return ANONYMIZERS.build(spec.kind, key, **localize(spec.params))


def linkage_only(cfg: RunConfig) -> RunConfig:
    """A dataset without identity labels has one image per "identity": only full-ref/linkage (is a probe
    linked to its own original?) means anything; the report says so."""
    ev = cfg.evaluate
    if ev.modes != ["linkage"] or ev.protocols != ["full-ref"]:
        log.warning("data.dataset %s has no identity labels: only the full-ref/linkage protocol runs", cfg.data.dataset)
    return cfg.model_copy(update={"evaluate": ev.model_copy(update={"modes": ["linkage"], "protocols": ["full-ref"]})})


def plan(cfg: RunConfig) -> RunPlan:
    """Every stage directory of ``cfg`` from the fingerprints upstream; ConfigError naming the key for an
    unknown kind or a bad param."""
    runs, size = cfg.runs_dir, cfg.data.image_size
    dataset, prepare = plan_data(cfg.data, runs)
    data_fp = prepare.fingerprint
    if not dataset.labeled:
        cfg = linkage_only(cfg)
    attacks = []
    for i, a in enumerate(cfg.attacks):
        key = f"attacks[{i}] ({a.name})"
        attack = ATTACKS.build(a.kind, key, **a.params)
        attacks.append((a, key, attack, attack.training(cfg.train)))
    out = RunPlan(cfg, dataset, prepare)
    built: dict[str, Anonymizer] = {}
    for i, spec in enumerate(cfg.anonymizers):
        key = f"anonymizers[{i}] ({spec.name})"
        memo = spec.model_dump_json(include={"kind", "params"})
        anonymizer = built[memo] = built.get(memo) or _anonymizer(spec, key)
        anonymize = StageDir(runs, "anonymize", data_fp, anonymize_fingerprint(anonymizer, size, cfg.anonymize.seed))
        anon_fp = anonymize.fingerprint  # "<data>/<anonymize>", as every stage downstream names it
        sources = {"target": anon_fp, "aux": f"{anon_fp}:aux", "originals": "originals-only"}
        plans = {}
        for a, akey, attack, train_cfg in attacks:
            train = None
            if train_cfg is not None:
                train = StageDir(runs, "train", train_fingerprint(train_cfg, data_fp, sources[attack.source], size))
            caches = {stage: StageDir(runs, stage, fingerprint(stage, what, data_fp, size)) for stage, what in attack.caches().items()}
            attack_fp = attack_fingerprint(attack, train.fingerprint if train else None, data_fp, anon_fp)
            evaluate = StageDir(runs, "evaluate", evaluate_fingerprint(cfg.evaluate, attack_fp))
            plans[a.name] = AttackPlan(a.name, akey, a, attack, train_cfg, train, caches, evaluate)
        quality = StageDir(runs, "quality", quality_fingerprint(cfg.evaluate, data_fp, anon_fp, size))
        cell = StageDir(runs, "cell", fingerprint("cell", CELL_VERSION, cell_fingerprints(prepare, anonymize, quality, plans)))
        out.targets[spec.name] = TargetPlan(spec.name, key, spec, anonymizer, prepare, anonymize, quality, plans, cell)
    return out


def kinds() -> dict[str, list]:
    """Every anonymizer, attack and dataset kind, built-in and from plugins (``registry.KindInfo``: its package,
    its Params, or why its plugin failed to load): what ``anonrisk ls kinds`` prints."""
    return {"anonymizer": ANONYMIZERS.kinds(), "attack": ATTACKS.kinds(), "dataset": DATASETS.kinds()}
