"""Typed run configuration: YAML files, dotted command-line overrides, validation, fingerprints."""

from anonrisk.config.loader import load_config, parse_overrides
from anonrisk.config.schema import AnonymizerSpec, RunConfig

__all__ = ["AnonymizerSpec", "RunConfig", "load_config", "parse_overrides"]
