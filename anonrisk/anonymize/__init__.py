"""Anonymizers behind one contract (``base.Anonymizer``) and the stage that runs them over a manifest."""

from anonrisk.anonymize import classical  # noqa: F401  (registers the built-in kinds)
from anonrisk.anonymize import diffusion  # noqa: F401
from anonrisk.anonymize.base import ANONYMIZERS, Anonymizer, check_batch


def build_anonymizer(spec) -> Anonymizer:
    """An anonymizer from an ``AnonymizerSpec``."""
    return ANONYMIZERS.build(spec.kind, key=f"anonymizer {spec.name}", **spec.params)


__all__ = ["ANONYMIZERS", "Anonymizer", "build_anonymizer", "check_batch"]
