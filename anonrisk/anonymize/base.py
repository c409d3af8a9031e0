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
from typing import Any, ClassVar, Sequence

import numpy as np

from anonrisk.registry import Kind, Registry

ANONYMIZERS: Registry[type["Anonymizer"]] = Registry("anonymizer", group="anonrisk.anonymizers")


class Anonymizer(Kind, abc.ABC):
    #: bump when the output for the same params changes, so fingerprints (and caches) change with it
    version: ClassVar[int] = 1
    #: the devices it wants: "cpu" or "gpu" (a Ray runner gives "gpu" anonymizers one GPU per actor)
    device_kind: ClassVar[str] = "cpu"

    def setup(self, device: str = "cpu") -> None:
        """Load models onto ``device``; called once per worker before the first batch."""

    def validate(self) -> None:
        """Raise ConfigError for a wrong configuration (missing model path, ...) before any image runs."""

    @abc.abstractmethod
    def __call__(self, images: np.ndarray, seeds: Sequence[int]) -> np.ndarray:
        """Anonymize ``images`` (N,H,W,3 uint8); returns the same shape and dtype."""

    def runtime(self) -> dict[str, Any]:
        """How this worker actually ran it after ``setup`` (device, dtype, attention backend): recorded in
        the stage's shard markers and DONE, and in the results' ``environment`` block; never fingerprinted.
        The default: NumPy on the CPU (the classical kinds)."""
        return {"device": "cpu", "backend": "numpy"}

    def describe(self) -> dict[str, Any]:
        """What identifies this anonymizer's output (goes into the stage fingerprint)."""
        return {"class": type(self).__name__, "version": self.version, "params": self.p.model_dump()}


def check_batch(images: np.ndarray, seeds: Sequence[int]) -> None:
    if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
        raise ValueError(f"expected uint8 (N,H,W,3) images, got {images.dtype} {images.shape}")
    if len(seeds) != len(images):
        raise ValueError(f"{len(images)} images but {len(seeds)} seeds")
