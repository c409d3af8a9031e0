"""The attack suite: every threat model behind one contract.

An ``Attack`` turns a target anonymizer's test probes (anonymized images) and the gallery (the test
identities' originals) into a probes x gallery similarity matrix; ``evaluate.score_similarity`` scores every
protocol x mode of it the same way for every attack. What differs is what the attacker had:

- ``contrastive``: (anonymized, original) pairs of the anonymizer's own training split (the paper's attack).
- ``surrogate``: query access only; it anonymizes its own identity-disjoint ``aux`` identities through the
  anonymizer and trains the contrastive attack on those pairs alone.
- ``edge``: no access: a training-free match of edge maps (``anonrisk.attack.edge``).
- ``edge-encoder``: no access: an encoder that sees only edge maps, trained on originals with augmentations.
- ``recognizer``: an off-the-shelf face recognizer (dlib, ArcFace, FaceNet from local weights).

Heavy imports stay inside methods: ``anonrisk.config`` imports this module to check attack kinds.
"""

from __future__ import annotations

import abc
import logging
from typing import TYPE_CHECKING, Any, ClassVar, Sequence

from anonrisk.config.schema import AnonymizerSpec, AttackConfig, AttackSpec
from anonrisk.errors import ConfigError
from anonrisk.registry import Registry
from anonrisk.stages import StageDir, fingerprint

if TYPE_CHECKING:
    import torch

    from anonrisk.data.records import FaceRecord
    from anonrisk.pipeline import Pipeline

log = logging.getLogger("anonrisk")

ATTACKS: Registry[type["Attack"]] = Registry("attack")


class Attack(abc.ABC):
    #: bump when the similarity for the same inputs changes, so evaluate fingerprints change with it
    version: ClassVar[int] = 1
    #: one line for the report: what the attacker has
    threat: ClassVar[str] = ""

    def __init__(self, spec: AttackSpec, key: str = ""):
        self.spec = spec
        self.key = key or f"attacks ({spec.name})"

    def validate(self, pipe: "Pipeline") -> None:
        """Raise ConfigError for a wrong setting, Unavailable for a missing optional resource, before work."""

    @abc.abstractmethod
    def fingerprint(self, pipe: "Pipeline", target: AnonymizerSpec) -> str:
        """What decides this attack's similarity matrix against ``target`` (its upstream stages)."""

    def upstream(self, pipe: "Pipeline", target: AnonymizerSpec) -> dict[str, str]:
        """Stage fingerprints to record beside the result."""
        return {}

    def prepare(self, pipe: "Pipeline", target: AnonymizerSpec) -> None:
        """Train (or reuse) whatever the attack needs against ``target``."""

    @abc.abstractmethod
    def similarity(self, pipe: "Pipeline", target: AnonymizerSpec, probes: Sequence["FaceRecord"], gallery: Sequence["FaceRecord"]) -> "torch.Tensor":
        """probes x gallery similarity (larger = more alike)."""

    def describe(self) -> dict[str, Any]:
        return {"class": type(self).__name__, "version": self.version, "spec": self.spec.model_dump()}


def build_attack(spec: AttackSpec, key: str = "") -> Attack:
    return ATTACKS.get(spec.kind, key or f"attacks ({spec.name})")(spec, key)


# ---- attacks that train the contrastive encoder -------------------------------------------------------
class TrainedAttack(Attack):
    """An attack whose similarity is the cosine between embeddings of a trained contrastive encoder."""

    def attack_config(self, pipe: "Pipeline") -> AttackConfig:
        """``run.attack`` with this attack's ``params`` on top (any AttackConfig key)."""
        merged = {**pipe.cfg.attack.model_dump(), **self.fixed(), **self.spec.params}
        unknown = sorted(set(self.spec.params) - set(AttackConfig.model_fields))
        if unknown:
            raise ConfigError(f"{self.key}.params: unknown key(s) {', '.join(unknown)}; valid: {', '.join(AttackConfig.model_fields)}")
        try:
            return AttackConfig.model_validate(merged)
        except Exception as exc:  # pydantic's message names the field
            raise ConfigError(f"{self.key}.params: {exc}") from None

    def fixed(self) -> dict[str, Any]:
        """Settings this threat model implies (overridable by params)."""
        return {}

    def validate(self, pipe: "Pipeline") -> None:
        self.attack_config(pipe)

    @abc.abstractmethod
    def train_stage(self, pipe: "Pipeline", target: AnonymizerSpec) -> StageDir: ...

    def fingerprint(self, pipe: "Pipeline", target: AnonymizerSpec) -> str:
        # the probes come from the target even when the encoder does not (edge-encoder)
        _, anon_stage = pipe.anonymizer_stage(target)
        return fingerprint("attack", type(self).__name__, self.version, self.train_stage(pipe, target).fingerprint, anon_stage.fingerprint)

    def upstream(self, pipe: "Pipeline", target: AnonymizerSpec) -> dict[str, str]:
        return {"train": self.train_stage(pipe, target).fingerprint}

    def similarity(self, pipe, target, probes, gallery):
        from anonrisk.attack.train import load_encoder
        from anonrisk.devices import resolve_device
        from anonrisk.evaluate.embed import embed_records

        cfg = self.attack_config(pipe)
        device = resolve_device(cfg.device)
        model = load_encoder(cfg, self.train_stage(pipe, target) / "encoder.safetensors", device)
        size = pipe.cfg.data.image_size
        return embed_records(model, probes, size, device) @ embed_records(model, gallery, size, device).t()


@ATTACKS.register("contrastive")
class ContrastiveAttack(TrainedAttack):
    threat = "(anonymized, original) pairs of the anonymizer's training split: the paper's attack"

    def attack_config(self, pipe):
        return pipe.cfg.attack if not self.spec.params else super().attack_config(pipe)

    def train_stage(self, pipe, target):
        if not self.spec.params:
            return pipe.train_stage(target)  # the pipeline's own train stage: shared with `anonrisk train`
        from anonrisk.attack.train import train_fingerprint

        _, anon_stage = pipe.anonymizer_stage(target)
        fp = train_fingerprint(self.attack_config(pipe), pipe.data_fp, anon_stage.fingerprint, pipe.cfg.data.image_size)
        return StageDir(pipe.cfg.runs_dir, "train", fp)

    def prepare(self, pipe, target):
        if not self.spec.params:
            pipe.train(target)
            return
        from anonrisk.attack.train import train_attack
        from anonrisk.data.records import read_manifest
        from anonrisk.devices import resolve_device

        stage = self.train_stage(pipe, target)
        if stage.is_done():
            return
        cfg = self.attack_config(pipe)
        anon = read_manifest(pipe.anonymize(target) / "manifest.jsonl")
        train_attack(cfg, anon, pipe.records, pipe.cfg.data.image_size, stage, resolve_device(cfg.device), pipe.progress)


def as_training(records: Sequence["FaceRecord"]) -> list["FaceRecord"]:
    """The same records relabelled as the training split (what ``train_attack`` learns from)."""
    import dataclasses

    return [dataclasses.replace(r, split="train") for r in records]


@ATTACKS.register("surrogate")
class SurrogateAttack(TrainedAttack):
    threat = "query access: anonymizes its own identity-disjoint aux identities and trains on those pairs only"

    def aux_identities(self, pipe) -> int:
        return len({r.identity for r in pipe.records if r.split == "aux"})

    def validate(self, pipe):
        super().validate(pipe)
        if self.aux_identities(pipe) < 2:
            raise ConfigError(
                f"{self.key}: the surrogate attacker needs its own auxiliary identities but the data has "
                f"{self.aux_identities(pipe)}: set data.split.aux_fraction (e.g. 0.2)"
            )

    def attack_config(self, pipe):
        cfg = super().attack_config(pipe)
        # the attacker's own set is small: a batch cannot ask for more distinct identities than it has
        per = cfg.per_identity if cfg.positives == "identity" else 1
        cap = self.aux_identities(pipe) * per
        if cfg.batch_size > cap and "batch_size" not in self.spec.params and cap >= 2:
            cfg = cfg.model_copy(update={"batch_size": cap})
        return cfg

    def train_stage(self, pipe, target):
        from anonrisk.attack.train import train_fingerprint

        _, anon_stage = pipe.anonymizer_stage(target)
        fp = train_fingerprint(self.attack_config(pipe), pipe.data_fp, f"{anon_stage.fingerprint}:aux", pipe.cfg.data.image_size)
        return StageDir(pipe.cfg.runs_dir, "train", fp)

    def prepare(self, pipe, target):
        from anonrisk.attack.train import train_attack
        from anonrisk.data.records import read_manifest
        from anonrisk.devices import resolve_device

        stage = self.train_stage(pipe, target)
        if stage.is_done():
            return
        self.validate(pipe)
        # the anonymize stage covers every split; the attacker only ever sees its own aux identities
        anon = [r for r in read_manifest(pipe.anonymize(target) / "manifest.jsonl") if r.split == "aux"]
        originals = [r for r in pipe.records if r.split == "aux"]
        cfg = self.attack_config(pipe)
        train_attack(cfg, as_training(anon), as_training(originals), pipe.cfg.data.image_size, stage, resolve_device(cfg.device), pipe.progress)


@ATTACKS.register("edge-encoder")
class EdgeEncoderAttack(TrainedAttack):
    threat = "no access to the anonymizer: an encoder of edge maps trained on original images only"

    def fixed(self):
        # sees only the Sobel edge map; positives are other originals of the same identity
        return {"input": "edges", "positives": "identity"}

    def train_stage(self, pipe, target):
        from anonrisk.attack.train import train_fingerprint

        # independent of the target: one encoder serves every anonymizer
        fp = train_fingerprint(self.attack_config(pipe), pipe.data_fp, "originals-only", pipe.cfg.data.image_size)
        return StageDir(pipe.cfg.runs_dir, "train", fp)

    def prepare(self, pipe, target):
        from anonrisk.attack.train import train_attack
        from anonrisk.devices import resolve_device

        stage = self.train_stage(pipe, target)
        if stage.is_done():
            return
        cfg = self.attack_config(pipe)
        train = [r for r in pipe.records if r.split == "train"]
        # (original, original) pairs: the two views differ by the training augmentation only
        train_attack(cfg, train, pipe.records, pipe.cfg.data.image_size, stage, resolve_device(cfg.device), pipe.progress)


def _register_more() -> None:
    from anonrisk.attack import edge  # noqa: F401
    from anonrisk.evaluate import recognizers  # noqa: F401


_register_more()
