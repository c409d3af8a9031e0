"""ControlNet conditions: a *condition* is what a ControlNet was trained on (``canny``, ``softedge``,
``depth``, ``lineart``, ``normal``, ``segmentation``, ``pose``); its annotator computes it from an image.
``Condition`` is a pydantic dataclass, so a wrong entry of ``params.conditions`` is one error naming it."""

from __future__ import annotations

import os
from typing import Any, Optional

from pydantic import ConfigDict, field_validator, model_validator
from pydantic.dataclasses import dataclass

from anonrisk.anonymize.annotators import ANNOTATORS, making
from anonrisk.config.validation import validate_model
from anonrisk.errors import ConfigError

#: condition -> the annotator used when a condition names none
DEFAULT_ANNOTATOR = {
    "canny": "canny",
    "softedge": "hed",
    "depth": "midas",
    "lineart": "lineart",
    "normal": "normalbae",
    "segmentation": "upernet",
    "pose": "openpose",
}
CONDITIONS = tuple(DEFAULT_ANNOTATOR)


@dataclass(frozen=True, config=ConfigDict(extra="forbid"))
class Condition:
    """One ControlNet input: ``name`` (what the ControlNet expects), the annotator that makes it (default:
    the condition's usual one), its conditioning ``scale`` and the fraction of the denoising steps it is
    active in (``start``..``end``); ``options`` go to the annotator."""

    name: str
    annotator: Optional[str] = None
    scale: float = 1.0
    start: float = 0.0
    end: float = 1.0
    options: tuple = ()  # sorted (key, value) pairs; a mapping is accepted

    @field_validator("name")
    @classmethod
    def _known(cls, v: str) -> str:
        if v not in DEFAULT_ANNOTATOR:
            raise ValueError(f"unknown condition {v!r}; known: {', '.join(CONDITIONS)}")
        return v

    @field_validator("options", mode="before")
    @classmethod
    def _options(cls, v: Any) -> tuple:
        if isinstance(v, dict):
            return tuple(sorted(v.items()))
        if v is None:
            return ()
        return v

    @model_validator(mode="after")
    def _fill(self):
        if not 0.0 <= self.start < self.end <= 1.0:
            raise ValueError(f"need 0 <= start < end <= 1 (fractions of the denoising steps), got {self.start}..{self.end}")
        if self.annotator is None:
            object.__setattr__(self, "annotator", DEFAULT_ANNOTATOR[self.name])
        return self

    @property
    def opts(self) -> dict:
        return dict(self.options)


def parse_condition(entry: Any, index: int) -> Condition:
    """A condition from a name or a mapping (one entry of ``params.conditions``)."""
    if isinstance(entry, str):
        entry = {"name": entry}
    return validate_model(Condition, entry, f"params.conditions[{index}]")


def check_annotator(cond: Condition, index: int, weights: dict[str, str]) -> None:
    """ConfigError unless ``cond`` has an annotator that can run with the configured weights."""
    key = f"conditions[{index}] ({cond.name})"
    if cond.annotator not in ANNOTATORS:
        raise ConfigError(f"{key}: unknown annotator {cond.annotator!r}; known: {', '.join(ANNOTATORS.names())}")
    info = ANNOTATORS.get(cond.annotator)
    if cond.name not in info.conditions:
        raise ConfigError(f"{key}: annotator {cond.annotator!r} does not make {cond.name!r} maps; use one of: {', '.join(making(cond.name))}")
    if info.weights_hint is None:
        return
    w = weights.get(cond.annotator)
    if not w:
        free = making(cond.name, weight_free=True)
        alt = f", or pick a weight-free annotator ({', '.join(free)})" if free else ""
        raise ConfigError(
            f"{key}: annotator {cond.annotator!r} needs a network but none is configured; set "
            f"params.annotator_weights.{cond.annotator} to a local path: {info.weights_hint} "
            f"(or 'random' for random weights in tests){alt}"
        )
    if w != "random" and not os.path.exists(w):
        raise ConfigError(f"params.annotator_weights.{cond.annotator}: {w!r} does not exist ({info.weights_hint})")
