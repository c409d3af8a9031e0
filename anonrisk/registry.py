"""Name -> kind registries (anonymizers, attacks, datasets, annotators, recognizers) with errors that list
the options, and each kind's pydantic ``Params`` validated in one place.

The built-in kinds register themselves when their package is imported (``anonrisk.anonymize``,
``anonrisk.attack``, ``anonrisk.data``). Kinds from other packages come through entry points (group
``anonrisk.anonymizers``, ``anonrisk.attacks``, ``anonrisk.datasets``): an entry point names a class (or a
module whose import registers it); one that fails to import is reported with its package's name when it is
asked for and never breaks the other kinds.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Generic, Mapping, Optional, TypeVar

from pydantic import BaseModel

from anonrisk.config.validation import NoParams, validate_model
from anonrisk.errors import ConfigError

log = logging.getLogger("anonrisk")
T = TypeVar("T")


class Kind:
    """The base of every registered kind (anonymizer, attack, dataset): its settings are a pydantic ``Params``
    model, validated by the registry and handed to the instance as ``self.p``; ``key`` says where in the
    config it comes from (for error messages)."""

    Params: ClassVar[type[BaseModel]] = NoParams

    def __init__(self, params: BaseModel, key: str = ""):
        self.p = params
        self.key = key


@dataclass(frozen=True)
class KindInfo:
    """One registered kind as ``anonrisk ls kinds`` shows it: where it comes from and its settings."""

    name: str
    package: str  # the distribution that provides it ("anonrisk" for the built-in kinds)
    entry: Any  # the class (None when its plugin failed to load)
    params: Optional[type[BaseModel]]  # its Params model (None when it failed to load)
    error: Optional[str] = None  # why a plugin's kind did not load


def _package_of(entry: Any) -> str:
    """The distribution whose code defines ``entry`` (its top-level module's, else that module's name)."""
    top = (getattr(entry, "__module__", None) or "?").split(".")[0]
    if top == "anonrisk":
        return "anonrisk"
    from importlib.metadata import packages_distributions

    return ", ".join(packages_distributions().get(top, [])) or top


class Registry(Generic[T]):
    def __init__(self, kind: str, group: Optional[str] = None):
        self.kind = kind
        self.group = group  # entry-point group of outside kinds
        self._entries: dict[str, T] = {}
        self._broken: dict[str, str] = {}  # entry-point name -> why it did not load
        self._origin: dict[str, str] = {}  # kind name -> the distribution whose entry point brought it
        self._discovered = group is None

    def register(self, name: str) -> Callable[[T], T]:
        def deco(entry: T) -> T:
            self.add(name, entry)
            return entry

        return deco

    def add(self, name: str, entry: T) -> None:
        if name in self._entries and self._entries[name] is not entry:
            raise ValueError(f"{self.kind} {name!r} registered twice")
        self._entries[name] = entry

    def _discover(self) -> None:
        if self._discovered:
            return
        self._discovered = True
        from importlib.metadata import entry_points

        for ep in entry_points(group=self.group):
            if ep.name in self._entries:
                continue
            package = ep.dist.name if ep.dist is not None else "?"
            before = set(self._entries)
            try:
                loaded = ep.load()
            except Exception as exc:  # noqa: BLE001 - any failure: report it, keep the other kinds
                self._broken[ep.name] = f"package {package} ({ep.value}) failed to load: {type(exc).__name__}: {exc}"
                log.warning("%s %r from %s", self.kind, ep.name, self._broken[ep.name])
                continue
            if ep.name not in self._entries and callable(loaded):  # a module that registered itself is done
                self.add(ep.name, loaded)
            for name in set(self._entries) - before:  # what this entry point brought (also by registering itself)
                self._origin[name] = package

    def __contains__(self, name: str) -> bool:
        self._discover()
        return name in self._entries

    def names(self) -> list[str]:
        self._discover()
        return sorted(self._entries)

    def kinds(self) -> list[KindInfo]:
        """Every kind, built-in and from plugins, with its package and Params; plugins that failed to load
        are listed with the reason (sorted by name)."""
        self._discover()
        out = [KindInfo(name, self._origin.get(name) or _package_of(entry), entry, getattr(entry, "Params", NoParams))
               for name, entry in self._entries.items()]
        out += [KindInfo(name, why.split(" ")[1] if why.startswith("package ") else "?", None, None, why)
                for name, why in self._broken.items() if name not in self._entries]
        return sorted(out, key=lambda k: k.name)

    def get(self, name: str, key: str = "") -> T:
        self._discover()
        if name in self._entries:
            return self._entries[name]
        where = f"{key}: " if key else ""
        if name in self._broken:
            raise ConfigError(f"{where}{self.kind} {name!r}: {self._broken[name]}")
        raise ConfigError(f"{where}unknown {self.kind} {name!r}; known: {', '.join(self.names())}")

    def params(self, name: str, params: Mapping[str, Any], key: str = "", prefix: str = "params.") -> Any:
        """``params`` validated by the kind's ``Params`` model (a ConfigError naming each bad key as
        ``<prefix><key>``)."""
        model = getattr(self.get(name, key), "Params", NoParams)
        return validate_model(model, params, f"{key or name}: {self.kind} {name!r}", prefix=prefix)

    def build(self, name: str, key: str = "", **params: Any) -> Any:
        """An instance of kind ``name``: its Params validated, then ``Kind(params, key)``."""
        return self.get(name, key)(self.params(name, params, key), key or f"{self.kind} {name}")
