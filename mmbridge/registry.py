"""Exact-match registries for pluggable components (vision encoders, bridges, LLMs, data source types, eval suites).

A :class:`Table` holds named items under exact keys; a :class:`Registry` is a table whose entries pair a key
with a config dataclass and a builder. An unknown key or an unknown config field is a ``KeyError``/``ValueError``
that lists what is valid, so a typo in a recipe is a one-line fix. A package adds to a table when it is imported
(``@BRIDGES.register(...)``, ``SUITES.add(...)``), so code that looks a key up never imports what provides it.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass
from typing import Any, Callable, Generic, TypeVar

T = TypeVar("T")


@dataclass
class Entry(Generic[T]):
    """One registered component: its config dataclass and the function that builds it."""

    key: str
    config_cls: type
    build: Callable[..., T]


class Table(Generic[T]):
    """Items under exact keys (``kind`` names what they are in errors); a key is added once."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, T] = {}

    def add(self, key: str, item: T) -> T:
        """Add ``item`` under ``key`` (a ``KeyError`` if the key is taken); returns the item."""
        if key in self._entries:
            raise KeyError(f"{self.kind} '{key}' is registered twice")
        self._entries[key] = item
        return item

    def remove(self, key: str) -> T:
        """Take the item under ``key`` out (tests and plugins that register for a while); returns it."""
        item = self.get(key)
        del self._entries[key]
        return item

    def keys(self) -> list[str]:
        return sorted(self._entries)

    def __contains__(self, key: str) -> bool:
        return key in self._entries

    def get(self, key: str) -> T:
        if key not in self._entries:
            raise KeyError(f"unknown {self.kind} '{key}'; known: {', '.join(self.keys())}")
        return self._entries[key]


class Registry(Table[Entry[T]]):
    """A table of components, filled by the ``@REGISTRY.register(key, Config)`` decorator."""

    def register(self, key: str, config_cls: type) -> Callable[[Callable[..., T]], Callable[..., T]]:
        """Register ``build(cfg, ...)`` under ``key``; ``config_cls`` must be a dataclass with a ``type`` field."""
        if not dataclasses.is_dataclass(config_cls) or "type" not in {f.name for f in dataclasses.fields(config_cls)}:
            raise TypeError(f"{self.kind} '{key}': config class {config_cls.__name__} must be a dataclass with a 'type' field")

        def decorate(build: Callable[..., T]) -> Callable[..., T]:
            self.add(key, Entry(key, config_cls, build))
            return build

        return decorate

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
    """Instantiate dataclass ``cls`` from ``data``, rejecting unknown fields (listing the valid ones) and values
    of the wrong type (naming the field, the type it takes and the value given)."""
    label = where or cls.__name__
    if not isinstance(data, dict):
        raise ValueError(f"{label}: expected a mapping of fields, got {data!r}")
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ValueError(f"{label}: unknown field(s) {unknown}; valid fields: {sorted(names)}")
    hints = typing.get_type_hints(cls)
    for name, value in data.items():
        if not _matches(value, hints.get(name, Any)):
            raise ValueError(f"{label}: field '{name}' must be {describe_type(hints[name])}, got {value!r}")
    return cls(**data)


def _matches(value: Any, hint: Any) -> bool:
    """Whether a value read from YAML fits a dataclass field annotation (lists may stand for tuples,
    mappings for dataclasses, ints for floats; anything the check does not model passes)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any or isinstance(hint, TypeVar):
        return True
    if hint is type(None):
        return value is None
    if origin in (typing.Union, types.UnionType):
        return any(_matches(value, arg) for arg in args)
    if origin is typing.Literal:
        return value in args
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is str:
        return isinstance(value, str)
    if dataclasses.is_dataclass(hint):
        return isinstance(value, (dict, hint))
    if origin in (list, tuple) or hint in (list, tuple):
        if not isinstance(value, (list, tuple)):
            return False
        if origin is tuple and args and args[-1] is not Ellipsis:
            return len(value) == len(args) and all(_matches(item, arg) for item, arg in zip(value, args))
        return not args or all(_matches(item, args[0]) for item in value)
    if origin is dict or hint is dict:
        return isinstance(value, dict)
    return True


def describe_type(hint: Any) -> str:
    """A field annotation in words: ``a number``, ``an integer or null``, ``a list of integers``…"""
    words = {int: "an integer", float: "a number", bool: "true or false", str: "a string", dict: "a mapping",
             list: "a list", tuple: "a list", type(None): "null"}
    if hint in words:
        return words[hint]
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(describe_type(arg) for arg in args)
    if origin is typing.Literal:
        return " or ".join(repr(arg) for arg in args)
    if origin in (list, tuple):
        return "a list" + (f" of {describe_type(args[0]).split(' ', 1)[-1]}s" if args and args[0] in words else "")
    if origin is dict:
        return "a mapping"
    if dataclasses.is_dataclass(hint):
        return f"a mapping ({hint.__name__})"
    return str(hint)
