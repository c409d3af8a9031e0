"""Name -> factory registries (anonymizers, backbones, datasets, attacks), with errors that list the options."""

from __future__ import annotations

from typing import Any, Callable, Generic, TypeVar

from anonrisk.errors import ConfigError

T = TypeVar("T")


class Registry(Generic[T]):
    def __init__(self, kind: str):
        self.kind = kind
        self._entries: dict[str, Callable[..., T]] = {}

    def register(self, name: str) -> Callable[[Callable[..., T]], Callable[..., T]]:
        def deco(factory: Callable[..., T]) -> Callable[..., T]:
            if name in self._entries:
                raise ValueError(f"{self.kind} {name!r} registered twice")
            self._entries[name] = factory
            return factory

        return deco

    def __contains__(self, name: str) -> bool:
        return name in self._entries

    def names(self) -> list[str]:
        return sorted(self._entries)

    def get(self, name: str, key: str = "") -> Callable[..., T]:
        if name not in self._entries:
            where = f"{key}: " if key else ""
            raise ConfigError(f"{where}unknown {self.kind} {name!r}; known: {', '.join(self.names())}")
        return self._entries[name]

    def build(self, name: str, key: str = "", **params: Any) -> T:
        factory = self.get(name, key)
        try:
            return factory(**params)
        except TypeError as exc:
            raise ConfigError(f"{key or name}: bad parameters for {self.kind} {name!r}: {exc}") from None
