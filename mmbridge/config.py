"""Run configuration: a recipe is YAML → dataclasses, with dotted ``key=value`` overrides from the CLI.

A recipe names the model (``model: {vision, bridge, llm}``), processor settings,
default data, and a list of stages (:class:`~mmbridge.train.recipe.StageConfig`).
Precedence: dataclass defaults → YAML → CLI overrides. The resolved config is saved
into the run directory as ``recipe.yaml`` so every run can be reproduced.
"""

from __future__ import annotations

import copy
import re
import dataclasses
from dataclasses import dataclass, field
from typing import Any

import yaml

from mmbridge.registry import config_from_dict


class _RecipeLoader(yaml.SafeLoader):
    """YAML 1.1 reads ``2e-4`` (no dot) as a string; recipes mean a float, as YAML 1.2 does."""


_RecipeLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def parse_yaml(text: str) -> Any:
    """Parse YAML with :class:`_RecipeLoader` (so ``1e-4`` is a float)."""
    return yaml.load(text, Loader=_RecipeLoader)


STRATEGIES = ("ddp", "fsdp")  # how several processes share a run (mmbridge.train.distributed, .sharding)


@dataclass
class DistributedConfig:
    """How a run launched on several processes shares the work. ``ddp`` (the default): every process holds the
    whole model and gradients are averaged. ``fsdp``: parameters, gradients and AdamW moments are sharded across
    the processes (:mod:`mmbridge.train.sharding`). On one process both train the same, unsharded."""

    strategy: str = "ddp"

    def __post_init__(self) -> None:
        if self.strategy not in STRATEGIES:
            raise ValueError(f"distributed.strategy must be one of {list(STRATEGIES)}, got {self.strategy!r}")


@dataclass
class RunConfig:
    """Everything one ``mmbridge train`` run needs."""

    model: dict = field(default_factory=dict)
    stages: list = field(default_factory=list)
    data: dict | None = None  # default data for stages that name none
    processor: dict = field(default_factory=dict)  # Processor settings: max_length, system_prompt
    output_dir: str = "runs/default"
    seed: int = 0
    distributed: DistributedConfig = field(default_factory=DistributedConfig)

    def __post_init__(self) -> None:
        if isinstance(self.distributed, dict):
            self.distributed = config_from_dict(DistributedConfig, self.distributed, where="recipe: distributed")

    def to_dict(self) -> dict:
        return _plain(dataclasses.asdict(self))


def _plain(value: Any) -> Any:
    """Dataclasses and tuples → dicts and lists, for YAML/JSON."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return _plain(dataclasses.asdict(value))
    if isinstance(value, dict):
        return {key: _plain(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(item) for item in value]
    return value


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Apply ``a.b.0.c=value`` overrides (values parsed as YAML) to a nested dict; returns a new dict."""
    data = copy.deepcopy(data)
    for override in overrides:
        if "=" not in override:
            raise ValueError(f"override {override!r} must look like key.path=value")
        path, raw = override.split("=", 1)
        value = parse_yaml(raw) if raw else ""
        keys = path.split(".")
        node: Any = data
        for depth, key in enumerate(keys[:-1]):
            node = _child(node, key, ".".join(keys[:depth + 1]))
        _assign(node, keys[-1], value, path)
    return data


def _child(node: Any, key: str, where: str) -> Any:
    if isinstance(node, list):
        index = _index(node, key, where)
        return node[index]
    if not isinstance(node, dict):
        raise ValueError(f"override path {where!r}: cannot descend into a {type(node).__name__}")
    return node.setdefault(key, {})


def _assign(node: Any, key: str, value: Any, where: str) -> None:
    if isinstance(node, list):
        node[_index(node, key, where)] = value
    elif isinstance(node, dict):
        node[key] = value
    else:
        raise ValueError(f"override path {where!r}: cannot set a field on a {type(node).__name__}")


def _index(node: list, key: str, where: str) -> int:
    if not key.lstrip("-").isdigit() or not -len(node) <= int(key) < len(node):
        raise ValueError(f"override path {where!r}: {key!r} is not an index into a list of {len(node)}")
    return int(key)


def load_run_config(path: str, overrides: list[str] | None = None) -> RunConfig:
    """Read a YAML recipe, apply overrides, and validate the top-level fields."""
    try:
        with open(path) as handle:
            data = parse_yaml(handle.read()) or {}
    except FileNotFoundError:
        raise FileNotFoundError(f"recipe {path} does not exist") from None
    except yaml.YAMLError as error:
        raise ValueError(f"recipe {path} is not valid YAML: {error}") from None
    if not isinstance(data, dict):
        raise ValueError(f"recipe {path} must be a mapping with model/stages/…, got {type(data).__name__}")
    data = apply_overrides(data, overrides or [])
    return config_from_dict(RunConfig, data, where=f"recipe {path}")


def save_run_config(config: RunConfig, path: str) -> None:
    """Write the resolved recipe as YAML (atomically)."""
    from mmbridge.utils import atomic_path

    with atomic_path(path) as temporary:
        with open(temporary, "w") as handle:
            yaml.safe_dump(config.to_dict(), handle, sort_keys=False)
