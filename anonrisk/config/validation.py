"""Pydantic validation with errors a user can act on: the one formatter of validation errors and the one
validate-or-ConfigError wrapper, shared by run configs, grid and sweep files, cluster profiles and every
plugin's ``Params`` (anonymizers, attacks, datasets)."""

from __future__ import annotations

import typing
from typing import Any, Optional, TypeVar

from pydantic import BaseModel, ConfigDict, TypeAdapter, ValidationError, ValidationInfo, field_validator

from anonrisk.errors import ConfigError

M = TypeVar("M")


def _wants_number(annotation: Any) -> bool:
    """Whether a field takes an int or a float and no bool (``Optional[int]``, ``Union[int, Literal["all"]]``)."""
    args = typing.get_args(annotation) or (annotation,)
    return bool is not annotation and any(a in (int, float) for a in args) and bool not in args


class Strict(BaseModel):
    """Unknown keys are errors that name the key; a boolean is not a number (pydantic would read
    ``steps: true`` as 1)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    @field_validator("*", mode="before")
    @classmethod
    def _no_bool_for_numbers(cls, value: Any, info: ValidationInfo) -> Any:
        if isinstance(value, bool) and info.field_name in cls.model_fields and _wants_number(cls.model_fields[info.field_name].annotation):
            raise ValueError("expected a number, not a boolean")
        return value


class NoParams(Strict):
    """The Params of a kind that takes none."""


def repeated(names: list[str]) -> list[str]:
    """The names that occur more than once (sorted)."""
    return sorted({n for n in names if names.count(n) > 1})


def fields_of(model: Any) -> dict[str, Any]:
    """Field name -> FieldInfo of a pydantic model or pydantic dataclass (empty for anything else)."""
    found = getattr(model, "__pydantic_fields__", None)
    return dict(found) if isinstance(found, dict) else {}


def _models_in(annotation: Any) -> list[Any]:
    """The pydantic models inside an annotation (``X``, ``Optional[X]``, ``list[Union[str, X]]``)."""
    if fields_of(annotation) and isinstance(annotation, type):
        return [annotation]
    return [m for arg in typing.get_args(annotation) for m in _models_in(arg)]


def _model_at(model: Any, loc: tuple) -> Any:
    """The model that owns the field at ``loc`` (to list its valid keys), or None."""
    for part in loc:
        if isinstance(part, int):
            continue  # a list index: the list's item model owns what follows
        field = fields_of(model).get(part)
        inner = _models_in(field.annotation) if field is not None else []
        if not inner:
            return None
        model = inner[0]
    return model


def _clean_loc(model: Any, loc: tuple) -> tuple:
    """``loc`` without the union-member tags pydantic inserts (``str``, ``dict[str,any]``, a model's name)."""
    names = {m.__name__ for m in _all_models(model)}
    tags = {"str", "int", "float", "bool", "list", "dict", "tuple", "none"}
    return tuple(p for p in loc if not (isinstance(p, str) and (p in tags or p in names or "[" in p or p.startswith("function-"))))


def _all_models(model: Any, seen: Optional[set] = None) -> set:
    seen = set() if seen is None else seen
    if model in seen or not fields_of(model):
        return seen
    seen.add(model)
    for f in fields_of(model).values():
        for m in _models_in(f.annotation):
            _all_models(m, seen)
    return seen


def error_lines(exc: ValidationError, model: Any, prefix: str = "") -> list[str]:
    """One ``key: what is wrong`` line per error; ``prefix`` is put before every key (``params.``)."""
    lines = []
    for err in exc.errors():
        loc = _clean_loc(model, tuple(err["loc"]))
        key = prefix + ".".join(str(p) for p in loc) if loc else (prefix.rstrip(".") or "<root>")
        kind, msg = err["type"], err["msg"].removeprefix("Value error, ")
        if kind == "extra_forbidden":
            owner = _model_at(model, loc[:-1])
            lines.append(f"{key}: unknown key; valid keys here: {', '.join(fields_of(owner)) if owner else '?'}")
        elif kind == "literal_error":
            lines.append(f"{key}: {err['input']!r} is not allowed; {msg.replace('Input should be ', 'expected ')}")
        elif kind == "missing":
            lines.append(f"{key}: required")
        elif kind == "model_type" or kind == "dataclass_type":
            lines.append(f"{key}: expected a mapping of settings (got {err.get('input')!r})")
        elif not loc:  # a check of the whole model: its input is everything
            lines.append(f"{key}: {msg}")
        else:
            lines.append(f"{key}: {msg} (got {err.get('input')!r})")
    return list(dict.fromkeys(lines))


def format_errors(exc: ValidationError, model: Any, where: str, prefix: str = "") -> str:
    lines = error_lines(exc, model, prefix)
    return f"{where}: {lines[0]}" if len(lines) == 1 else f"{where}:\n  " + "\n  ".join(lines)


def validate_model(model: type[M], data: Any, where: str, prefix: str = "") -> M:
    """``model`` (a pydantic model or dataclass) validated from ``data``, or a ConfigError naming each bad key."""
    try:
        if isinstance(model, type) and issubclass(model, BaseModel):
            return model.model_validate(data)
        return TypeAdapter(model).validate_python(data)
    except ValidationError as exc:
        raise ConfigError(format_errors(exc, model, where, prefix)) from None
