"""The attack contract: every threat model turns a target anonymizer's test probes (anonymized images) and
the gallery (the test identities' originals) into a probes x gallery similarity matrix, which
``evaluate.score_similarity`` scores the same way for every attack.

An attack never sees the pipeline: it gets an ``AttackContext`` (the records, the image size, its planned
stage directories, the target's anonymized manifest). Every kind runs the same path, ``validate`` ->
``train`` -> ``similarity``, so the checks of that path (the training plan, the multi-process guard) hold
for every kind. Add a kind in one file: a subclass with a pydantic ``Params`` model, registered with
``@ATTACKS.register("name")`` (see docs/architecture.md).
"""

from __future__ import annotations

import abc
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, ClassVar, Mapping, Optional, Sequence

from anonrisk.config.schema import TrainConfig
from anonrisk.registry import Kind, Registry
from anonrisk.stages import StageDir

if TYPE_CHECKING:
    import torch

    from anonrisk.data.records import FaceRecord

ATTACKS: Registry[type["Attack"]] = Registry("attack", group="anonrisk.attacks")


@dataclass
class AttackContext:
    """What an attack sees of a run, for one target anonymizer."""

    records: Sequence["FaceRecord"]  # the prepared originals, every split
    image_size: int
    progress: bool = True
    train_stage: Optional[StageDir] = None  # where a trained attack's encoder lives (planned)
    train_config: Optional[TrainConfig] = None  # its resolved training settings (planned)
    caches: Mapping[str, StageDir] = field(default_factory=dict)  # its other planned directories
    load_anonymized: Optional[Callable[[], Sequence["FaceRecord"]]] = None  # runs the target's anonymize stage if needed
    on_step: Optional[Callable[[int, float, float], None]] = None  # (step, loss, lr) from training, rank 0 (MLflow)

    def anonymized(self) -> list["FaceRecord"]:
        """The target's anonymized manifest (every split), anonymizing first when the stage is not done."""
        if self.load_anonymized is None:
            raise RuntimeError("this context has no target anonymizer")
        return list(self.load_anonymized())

    def originals(self, split: str) -> list["FaceRecord"]:
        return [r for r in self.records if r.split == split]


class Attack(Kind, abc.ABC):
    """One threat model. ``Params`` is validated by the registry; the instance is shared by every target."""

    #: bump when the similarity for the same inputs changes, so evaluate fingerprints change with it
    version: ClassVar[int] = 1
    #: one line for the report: what the attacker has
    threat: ClassVar[str] = ""

    # ---- planning: static, from the config alone ------------------------------------------------------
    def training(self, base: TrainConfig) -> Optional[TrainConfig]:
        """The training settings of a trained attack (``train:`` with its params on top); None: no training."""
        return None

    #: what a trained attack's encoder learns from: "target" (the target's anonymized images), "aux" (the
    #: target applied to the attacker's own identities) or "originals" (no anonymized image at all)
    source: ClassVar[str] = "target"

    def settings(self) -> dict[str, Any]:
        """What decides the similarity besides the upstream stages (goes into the evaluate fingerprint)."""
        return self.p.model_dump(mode="json")

    def caches(self) -> dict[str, Any]:
        """Directories of its own that the plan should make: stage name -> what decides their content."""
        return {}

    # ---- execution -------------------------------------------------------------------------------------
    def validate(self, ctx: AttackContext) -> None:
        """Raise ConfigError for a wrong setting, Unavailable for a missing optional resource, before work."""

    def train(self, ctx: AttackContext) -> None:
        """Train (or reuse) what the attack needs against the context's target; nothing for untrained kinds."""

    @abc.abstractmethod
    def similarity(self, ctx: AttackContext, probes: Sequence["FaceRecord"], gallery: Sequence["FaceRecord"]) -> "torch.Tensor":
        """probes x gallery similarity (larger = more alike): a matrix, or better a function of probe rows
        with a ``shape`` (``evaluate.protocols.EmbeddingSimilarity`` for embeddings, ``StreamedSimilarity`` for
        any other score), which the scorer reads one block of rows at a time, so memory stays O(probes x
        identities) whatever the gallery."""

    def describe(self) -> dict[str, Any]:
        return {"class": type(self).__name__, "version": self.version, "params": self.p.model_dump(mode="json")}
