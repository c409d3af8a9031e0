"""The anonymizer contract: a batch of images in, a batch of images out, one seed per record.

Images are ``uint8`` arrays of shape ``(N, H, W, 3)`` (RGB). ``seeds[i]`` alone decides the randomness of
image ``i`` (see ``anonrisk.stages.record_seed``), so a batched call equals one-by-one calls and a sharded
run equals a single-process run. Heavy anonymizers load their models lazily in ``setup`` so that building
one (e.g. to fingerprint a config) is cheap; a runner calls ``setup`` once per worker.

Add a kind in one file: a subclass with a pydantic ``Params`` model (validated by the registry; the instance
gets it as ``self.p``), registered with ``@ANONYMIZERS.register("name")`` (see docs/architecture.md).
"""

from __future__ import annotations

import abc
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Mapping, Optional, Sequence

import numpy as np

from anonrisk.registry import Kind, Registry

if TYPE_CHECKING:
    from anonrisk.data.records import FaceRecord

ANONYMIZERS: Registry[type["Anonymizer"]] = Registry("anonymizer", group="anonrisk.anonymizers")


class Anonymizer(Kind, abc.ABC):
    #: bump when the output for the same params changes, so fingerprints (and caches) change with it
    version: ClassVar[int] = 1
    #: the devices it wants: "cpu" or "gpu" (a Ray runner gives "gpu" anonymizers one GPU per actor)
    device_kind: ClassVar[str] = "cpu"
    #: True: called once per shard, with every record of the shard that has no output yet and
    #: ``shard=ShardInfo(...)`` (their ids and paths, the shard's number, the stage's log folder): kinds that
    #: need to know the records (an external program, outputs made elsewhere)
    per_shard: ClassVar[bool] = False

    def setup(self, device: str = "cpu") -> None:
        """Load models onto ``device``; called once per worker before the first batch."""

    def validate(self) -> None:
        """Raise ConfigError for a wrong configuration (missing model path, ...) before any image runs."""

    @abc.abstractmethod
    def __call__(self, images: np.ndarray, seeds: Sequence[int]) -> np.ndarray:
        """Anonymize ``images`` (N,H,W,3 uint8); returns the same shape and dtype."""

    def unusable(self, records: Sequence["FaceRecord"]) -> Mapping[str, str]:
        """Records this anonymizer cannot give an output for (record id -> why), checked when the stage
        starts: the stage fails naming them, or quarantines them (``data.on_bad_image``)."""
        return {}

    def runtime(self) -> dict[str, Any]:
        """How this worker actually ran it after ``setup`` (device, dtype, attention backend): recorded in
        the stage's shard markers and DONE, and in the results' ``environment`` block; never fingerprinted.
        The default: NumPy on the CPU (the classical kinds)."""
        return {"device": "cpu", "backend": "numpy"}

    def describe(self) -> dict[str, Any]:
        """What identifies this anonymizer's output (goes into the stage fingerprint)."""
        return {"class": type(self).__name__, "version": self.version, "params": self.p.model_dump()}


@dataclass(frozen=True)
class ShardInfo:
    """What a ``per_shard`` anonymizer is told about its call: the records (in the order of the images)."""

    records: Sequence["FaceRecord"]
    index: Optional[int] = None  # the shard's number (None outside a runner)
    log_dir: Optional[Path] = None  # the stage's log folder

    def label(self) -> str:
        return f"shard {self.index}" if self.index is not None else "a batch"


def check_batch(images: np.ndarray, seeds: Sequence[int]) -> None:
    if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
        raise ValueError(f"expected uint8 (N,H,W,3) images, got {images.dtype} {images.shape}")
    if len(seeds) != len(images):
        raise ValueError(f"{len(images)} images but {len(seeds)} seeds")
