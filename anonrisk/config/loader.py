"""Load a YAML config, apply ``a.b.c=value`` overrides, validate, and resolve anonymizer presets.

Errors name the offending key and, for unknown keys or choices, the allowed ones. This module only parses:
it never imports a plugin; kinds and their params are checked when the plan is built (``anonrisk.plan``).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Iterable

import yaml

from anonrisk.config.job_paths import check_job_paths
from anonrisk.config.migrate import migrate
from anonrisk.config.schema import RunConfig, Spec
from anonrisk.config.validation import repeated, validate_model
from anonrisk.errors import ConfigError

# Where presets live when a config names one by a bare name: the config's own folder first, then the
# repository's configs/ (also found from an installed package run inside the checkout).
REPO_CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def parse_override(item: str) -> tuple[str, Any]:
    """``"train.steps=10"`` -> ``("train.steps", 10)`` (the value parsed as YAML)."""
    if "=" not in item:
        raise ConfigError(f"override {item!r} is not of the form key=value (e.g. train.backbone=resnet18)")
    key, raw = item.split("=", 1)
    try:
        return key.strip(), (yaml.safe_load(raw) if raw != "" else "")
    except yaml.YAMLError as exc:
        raise ConfigError(f"override {key}: cannot parse value {raw!r}: {exc}") from None


def nest(dotted: dict[str, Any], what: str = "override") -> dict[str, Any]:
    """``{"train.steps": 10}`` -> ``{"train": {"steps": 10}}`` (later keys win, sections merge)."""
    out: dict[str, Any] = {}
    for key, value in dotted.items():
        parts = key.split(".")
        node = out
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"{what} {key}: {p!r} is set to a value and also used as a section")
        last = parts[-1]
        node[last] = deep_merge(node[last], value) if isinstance(value, dict) and isinstance(node.get(last), dict) else value
    return out


def parse_overrides(items: Iterable[str]) -> dict[str, Any]:
    """``["train.steps=10", "anonymizers=[identity,blur]"]`` -> nested dict (values parsed as YAML)."""
    return nest(dict(parse_override(item) for item in items))


def deep_merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for k, v in update.items():
        if isinstance(v, dict) and isinstance(merged.get(k), dict):
            merged[k] = deep_merge(merged[k], v)
        else:
            merged[k] = v
    return merged


def validate(raw: dict[str, Any], source: str = "") -> RunConfig:
    return validate_model(RunConfig, migrate(raw, source or "<config>"), f"invalid config {source}")


def load_yaml(path: str | os.PathLike) -> dict[str, Any]:
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"config file not found: {path}")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level, got {type(raw).__name__}")
    return raw


def preset_dirs(config_path: str | os.PathLike | None) -> list[Path]:
    dirs = []
    if config_path is not None:
        dirs.append(Path(config_path).resolve().parent / "anonymizers")
    dirs += [Path.cwd() / "configs" / "anonymizers", REPO_CONFIGS / "anonymizers"]
    return list(dict.fromkeys(dirs))


def preset_names(dirs: Iterable[Path] = ()) -> list[str]:
    """Anonymizer presets found in ``dirs`` and the default preset folders."""
    return sorted({p.stem for d in [*dirs, *preset_dirs(None)] if d.is_dir() for p in d.glob("*.yaml")})


def resolve_anonymizer(entry: str | Spec, dirs: list[Path], index: int) -> Spec:
    """A bare name is a preset file ``<name>.yaml`` or else a kind (checked when the plan is built)."""
    if isinstance(entry, Spec):
        return entry
    for d in dirs:
        preset = d / f"{entry}.yaml"
        if preset.exists():
            raw = load_yaml(preset)
            raw.setdefault("name", entry)
            return validate_model(Spec, raw, f"invalid preset {preset}")
    return Spec(name=entry, kind=entry)


def load_config(path: str | os.PathLike | None, overrides: Iterable[str] = ()) -> RunConfig:
    """The resolved, validated config of a run: file, then overrides, then presets expanded. Deprecated
    names are read with a warning (each source on its own, so an override beats the file)."""
    source = str(path or "<defaults>")
    raw = migrate(load_yaml(path), source) if path is not None else {}
    raw = deep_merge(raw, migrate(parse_overrides(overrides), "override"))
    cfg = validate(raw, source)
    dirs = preset_dirs(path)
    specs = [resolve_anonymizer(e, dirs, i) for i, e in enumerate(cfg.anonymizers)]
    dupes = repeated([s.name for s in specs])
    if dupes:
        raise ConfigError(f"anonymizers: names must be unique, repeated: {', '.join(dupes)}")
    cfg.anonymizers = specs
    check_job_paths({"runs_dir": cfg.runs_dir, "results_dir": cfg.results_dir})
    return cfg
