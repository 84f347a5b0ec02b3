"""Exact-match registries for pluggable components (vision encoders, bridges, LLMs).

Each entry pairs a key with a config dataclass and a builder. Keys match exactly;
an unknown key or an unknown config field is a ``KeyError``/``ValueError`` that
lists what is valid, so a typo in a recipe is a one-line fix.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Callable, Generic, TypeVar

T = TypeVar("T")


@dataclass
class Entry(Generic[T]):
    """One registered component: its config dataclass and the function that builds it."""

    key: str
    config_cls: type
    build: Callable[..., T]


class Registry(Generic[T]):
    """A named table of components, filled by the ``@REGISTRY.register(key, Config)`` decorator."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, Entry[T]] = {}

    def register(self, key: str, config_cls: type) -> Callable[[Callable[..., T]], Callable[..., T]]:
        """Register ``build(cfg, ...)`` under ``key``; ``config_cls`` must be a dataclass with a ``type`` field."""
        if not dataclasses.is_dataclass(config_cls) or "type" not in {f.name for f in dataclasses.fields(config_cls)}:
            raise TypeError(f"{self.kind} '{key}': config class {config_cls.__name__} must be a dataclass with a 'type' field")

        def decorate(build: Callable[..., T]) -> Callable[..., T]:
            if key in self._entries:
                raise KeyError(f"{self.kind} '{key}' is registered twice")
            self._entries[key] = Entry(key, config_cls, build)
            return build

        return decorate

    def keys(self) -> list[str]:
        return sorted(self._entries)

    def __contains__(self, key: str) -> bool:
        return key in self._entries

    def get(self, key: str) -> Entry[T]:
        if key not in self._entries:
            raise KeyError(f"unknown {self.kind} '{key}'; known: {', '.join(self.keys())}")
        return self._entries[key]

    def make_config(self, spec: Any) -> Any:
        """Turn a dict (from YAML) or a config instance into this registry's config dataclass."""
        if dataclasses.is_dataclass(spec) and not isinstance(spec, type):
            self.get(spec.type)
            return spec
        if not isinstance(spec, dict) or "type" not in spec:
            raise ValueError(f"{self.kind} config needs a 'type' field (one of: {', '.join(self.keys())}); got {spec!r}")
        entry = self.get(spec["type"])
        return config_from_dict(entry.config_cls, spec, where=f"{self.kind} '{spec['type']}'")

    def build(self, spec: Any, *args: Any, **kwargs: Any) -> T:
        """Build the component described by ``spec`` (dict or config)."""
        cfg = self.make_config(spec)
        return self.get(cfg.type).build(cfg, *args, **kwargs)


def config_from_dict(cls: type, data: dict, where: str = "") -> Any:
    """Instantiate dataclass ``cls`` from ``data``, rejecting unknown fields with the list of valid ones."""
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        label = where or cls.__name__
        raise ValueError(f"{label}: unknown field(s) {unknown}; valid fields: {sorted(names)}")
    return cls(**data)
