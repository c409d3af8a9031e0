"""Typed run configuration: YAML files, dotted command-line overrides, validation. Parses only: kinds and
their params are checked when the plan is built."""

from anonrisk.config.loader import load_config, parse_overrides
from anonrisk.config.schema import RunConfig, Spec

__all__ = ["RunConfig", "Spec", "load_config", "parse_overrides"]
