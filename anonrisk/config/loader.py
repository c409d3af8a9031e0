"""Load a YAML config, apply ``a.b.c=value`` overrides, validate, and resolve anonymizer presets.

Errors name the offending key and, for unknown keys or choices, the allowed ones.
"""

from __future__ import annotations

import os
import typing
from pathlib import Path
from typing import Any, Iterable

import yaml
from pydantic import BaseModel, ValidationError

from anonrisk.config.schema import AnonymizerSpec, RunConfig
from anonrisk.errors import ConfigError

# Where presets live when a config names one by a bare name: the config's own folder first, then the
# repository's configs/ (also found from an installed package run inside the checkout).
REPO_CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def parse_override(item: str) -> tuple[str, Any]:
    """``"attack.steps=10"`` -> ``("attack.steps", 10)`` (the value parsed as YAML)."""
    if "=" not in item:
        raise ConfigError(f"override {item!r} is not of the form key=value (e.g. attack.backbone=resnet18)")
    key, raw = item.split("=", 1)
    try:
        return key.strip(), (yaml.safe_load(raw) if raw != "" else "")
    except yaml.YAMLError as exc:
        raise ConfigError(f"override {key}: cannot parse value {raw!r}: {exc}") from None


def nest(dotted: dict[str, Any], what: str = "override") -> dict[str, Any]:
    """``{"attack.steps": 10}`` -> ``{"attack": {"steps": 10}}`` (later keys win, sections merge)."""
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
    """``["attack.steps=10", "anonymizers=[identity,blur]"]`` -> nested dict (values parsed as YAML)."""
    return nest(dict(parse_override(item) for item in items))


def deep_merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for k, v in update.items():
        if isinstance(v, dict) and isinstance(merged.get(k), dict):
            merged[k] = deep_merge(merged[k], v)
        else:
            merged[k] = v
    return merged


def _model_in(annotation: Any) -> type[BaseModel] | None:
    """The first pydantic model inside an annotation (``X``, ``Optional[X]``, ``list[Union[str, X]]``)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in typing.get_args(annotation):
        found = _model_in(arg)
        if found is not None:
            return found
    return None


def _model_at(model: type[BaseModel], loc: tuple) -> type[BaseModel] | None:
    """The pydantic model that owns the field at ``loc`` (to list its valid keys)."""
    for part in loc:
        if isinstance(part, int):
            continue  # a list index: the list's item model owns what follows
        field = model.model_fields.get(part)
        model = _model_in(field.annotation) if field is not None else None
        if model is None:
            return None
    return model


def format_validation_error(exc: ValidationError, model: type[BaseModel], source: str) -> str:
    lines = []
    for err in exc.errors():
        loc = tuple(p for p in err["loc"] if not (isinstance(p, str) and p in {"str", "AnonymizerSpec", "AttackSpec"}))
        key = ".".join(str(p) for p in loc) or "<root>"
        if err["type"] == "extra_forbidden":
            owner = _model_at(model, loc[:-1])
            valid = ", ".join(owner.model_fields) if owner else "?"
            lines.append(f"unknown key '{key}'; valid keys here: {valid}")
        elif err["type"] == "literal_error":
            lines.append(f"'{key}': {err['input']!r} is not allowed; {err['msg'].replace('Input should be ', 'expected ')}")
        else:
            lines.append(f"'{key}': {err['msg']} (got {err.get('input')!r})")
    return f"invalid config {source}:\n  " + "\n  ".join(dict.fromkeys(lines))


def validate(raw: dict[str, Any], source: str = "") -> RunConfig:
    try:
        return RunConfig.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, RunConfig, source)) from None


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


def resolve_anonymizer(entry: str | AnonymizerSpec, dirs: list[Path], index: int) -> AnonymizerSpec:
    """A bare name is a registered anonymizer kind or a preset file ``<name>.yaml``."""
    from anonrisk.anonymize import ANONYMIZERS  # registers the built-in kinds

    key = f"anonymizers[{index}]"
    if isinstance(entry, AnonymizerSpec):
        ANONYMIZERS.get(entry.kind, key)
        return entry
    for d in dirs:
        preset = d / f"{entry}.yaml"
        if preset.exists():
            raw = load_yaml(preset)
            raw.setdefault("name", entry)
            try:
                spec = AnonymizerSpec.model_validate(raw)
            except ValidationError as exc:
                raise ConfigError(format_validation_error(exc, AnonymizerSpec, str(preset))) from None
            ANONYMIZERS.get(spec.kind, f"{preset}: kind")
            return spec
    if entry in ANONYMIZERS:
        return AnonymizerSpec(name=entry, kind=entry)
    presets = sorted({p.stem for d in dirs if d.is_dir() for p in d.glob("*.yaml")})
    raise ConfigError(
        f"{key}: unknown anonymizer {entry!r}; built-in kinds: {', '.join(ANONYMIZERS.names())}; "
        f"presets: {', '.join(presets) or '(none found)'}"
    )


def load_config(path: str | os.PathLike | None, overrides: Iterable[str] = ()) -> RunConfig:
    """The resolved, validated config of a run: file, then overrides, then presets expanded."""
    raw = load_yaml(path) if path is not None else {}
    raw = deep_merge(raw, parse_overrides(overrides))
    cfg = validate(raw, str(path or "<defaults>"))
    dirs = preset_dirs(path)
    specs = [resolve_anonymizer(e, dirs, i) for i, e in enumerate(cfg.anonymizers)]
    names = [s.name for s in specs]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ConfigError(f"anonymizers: names must be unique, repeated: {', '.join(dupes)}")
    cfg.anonymizers = specs
    from anonrisk.attack.suite import ATTACKS  # light: the attack modules import their heavy parts lazily

    for i, a in enumerate(cfg.attacks):
        ATTACKS.get(a.kind, f"attacks[{i}] ({a.name})")
    return cfg
