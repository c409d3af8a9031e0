"""Anonymizers behind one contract (``base.Anonymizer``); importing this package registers the built-in kinds."""

from anonrisk.anonymize import camouflage, camouflage_light, classical, command, diffusion, instance_aug_faithful, precomputed  # noqa: F401  (register the built-in kinds)
from anonrisk.anonymize.base import ANONYMIZERS, Anonymizer, check_batch


def build_anonymizer(spec, key: str = "") -> Anonymizer:
    """An anonymizer from a ``Spec``, its params validated; weights paths under ``$ANONRISK_WEIGHTS`` when set."""
    from anonrisk.weights import localize

    return ANONYMIZERS.build(spec.kind, key=key or f"anonymizer {spec.name}", **localize(spec.params))


__all__ = ["ANONYMIZERS", "Anonymizer", "build_anonymizer", "check_batch"]
