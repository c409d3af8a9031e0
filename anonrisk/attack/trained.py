"""The attacks that train the contrastive encoder; their similarity is the cosine between its embeddings.
They share one path (validate -> train -> similarity) and differ in what the encoder learns from:

- ``contrastive``: (anonymized, original) pairs of the anonymizer's own training split (the paper's attack);
- ``surrogate``: query access only: it anonymizes its own identity-disjoint ``aux`` identities through the
  anonymizer and trains on those pairs alone;
- ``edge-encoder``: no access: an encoder that sees only edge maps, trained on originals with augmentations.

``params`` override any ``train:`` key for that attack alone.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar, Optional, Sequence

from pydantic import create_model

from anonrisk.attack.base import ATTACKS, Attack, AttackContext
from anonrisk.config.schema import TrainConfig
from anonrisk.config.validation import Strict, validate_model
from anonrisk.errors import ConfigError

#: a trained attack's params: any train: key, all optional (their ranges are checked on the merged settings)
TrainParams = create_model("TrainParams", __base__=Strict,
                           **{name: (Optional[f.annotation], None) for name, f in TrainConfig.model_fields.items()})


class TrainedAttack(Attack):
    Params = TrainParams
    #: settings the threat model implies (its params may still override them)
    fixed: ClassVar[dict[str, Any]] = {}

    def training(self, base: TrainConfig) -> TrainConfig:
        merged = {**base.model_dump(), **self.fixed, **self.p.model_dump(exclude_unset=True)}
        return validate_model(TrainConfig, merged, self.key, prefix="params.")

    def settings(self) -> dict[str, Any]:
        return {}  # the train stage's fingerprint holds every setting

    def config(self, ctx: AttackContext) -> TrainConfig:
        """The settings the encoder is trained with (a kind may adapt the planned ones to the data)."""
        return ctx.train_config

    def pairs(self, ctx: AttackContext) -> tuple[Sequence, Sequence]:
        """(anonymized, originals) that ``train_attack`` learns from (it uses the anonymized ``train`` split)."""
        raise NotImplementedError

    def training_identities(self, ctx: AttackContext) -> int:
        """How many identities the encoder learns from (a batch draws distinct ones)."""
        return len({r.identity for r in ctx.originals("aux" if self.source == "aux" else "train")})

    def validate(self, ctx: AttackContext) -> None:
        from anonrisk.attack.dist import read_env
        from anonrisk.attack.train_plan import validate_plan
        from anonrisk.devices import resolve_device

        cfg = self.config(ctx)
        validate_plan(cfg, resolve_device(cfg.device), read_env().world_size)
        per = cfg.per_identity if cfg.positives == "identity" else 1
        have = self.training_identities(ctx)
        if cfg.batch_size % per:
            raise ConfigError(f"{self.key}: train.batch_size={cfg.batch_size} is not divisible by train.per_identity={per}")
        if cfg.batch_size // per > have:
            raise ConfigError(f"{self.key}: train.batch_size={cfg.batch_size} needs {cfg.batch_size // per} distinct identities per "
                              f"batch (per_identity={per}) but training has {have}: lower the batch size, raise "
                              "train.per_identity, or use more identities")

    def train(self, ctx: AttackContext) -> None:
        from anonrisk.attack.train import train_attack
        from anonrisk.devices import resolve_device

        if ctx.train_stage.reuse(["encoder.safetensors"]):
            return
        self.validate(ctx)
        anonymized, originals = self.pairs(ctx)
        cfg = self.config(ctx)
        train_attack(cfg, anonymized, originals, ctx.image_size, ctx.train_stage, resolve_device(cfg.device), ctx.progress, ctx.on_step)

    def similarity(self, ctx, probes, gallery):
        """The cosine of the encoder's embeddings, handed to the scorer as embeddings: it computes one block
        of probe rows at a time (on the encoder's device), never the probes x gallery matrix."""
        from anonrisk.attack.embed import embed_records
        from anonrisk.attack.train import load_encoder
        from anonrisk.devices import resolve_device
        from anonrisk.evaluate.protocols import EmbeddingSimilarity

        cfg = self.config(ctx)
        device = resolve_device(cfg.device)
        model = load_encoder(cfg, ctx.train_stage / "encoder.safetensors", device)
        p, g = (embed_records(model, r, ctx.image_size, device) for r in (probes, gallery))
        return EmbeddingSimilarity(p, g, device)


def as_training(records: Sequence) -> list:
    """The same records relabelled as the training split (what ``train_attack`` learns from)."""
    return [dataclasses.replace(r, split="train") for r in records]


@ATTACKS.register("contrastive")
class ContrastiveAttack(TrainedAttack):
    threat = "(anonymized, original) pairs of the anonymizer's training split: the paper's attack"

    def pairs(self, ctx):
        return ctx.anonymized(), ctx.records


@ATTACKS.register("surrogate")
class SurrogateAttack(TrainedAttack):
    threat = "query access: anonymizes its own identity-disjoint aux identities and trains on those pairs only"
    source = "aux"

    def aux_identities(self, ctx: AttackContext) -> int:
        return len({r.identity for r in ctx.originals("aux")})

    def validate(self, ctx):
        if self.aux_identities(ctx) < 2:
            raise ConfigError(
                f"{self.key}: the surrogate attacker needs its own auxiliary identities but the data has "
                f"{self.aux_identities(ctx)}: set data.split.aux_fraction (e.g. 0.2)"
            )
        super().validate(ctx)

    def config(self, ctx):
        cfg = ctx.train_config
        # the attacker's own set is small: a batch cannot ask for more distinct identities than it has (a
        # function of the prepared data, so the planned settings still decide the result)
        per = cfg.per_identity if cfg.positives == "identity" else 1
        cap = self.aux_identities(ctx) * per
        if cfg.batch_size > cap and "batch_size" not in self.p.model_fields_set and cap >= 2:
            cfg = cfg.model_copy(update={"batch_size": cap})
        return cfg

    def pairs(self, ctx):
        # the anonymize stage covers every split; the attacker only ever sees its own aux identities
        anonymized = [r for r in ctx.anonymized() if r.split == "aux"]
        return as_training(anonymized), as_training(ctx.originals("aux"))


@ATTACKS.register("edge-encoder")
class EdgeEncoderAttack(TrainedAttack):
    threat = "no access to the anonymizer: an encoder of edge maps trained on original images only"
    source = "originals"  # one encoder serves every anonymizer
    # sees only the Sobel edge map; positives are other originals of the same identity
    fixed = {"input": "edges", "positives": "identity"}

    def pairs(self, ctx):
        # (original, original) pairs: the two views differ by the training augmentation only
        return ctx.originals("train"), ctx.records
