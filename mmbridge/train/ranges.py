"""The range of every numeric field of a recipe, checked before anything loads.

A value of the right type can still mean nothing: ``stages.0.steps=-4`` used to train no step,
save the untouched model and exit 0. :func:`check_ranges` walks a recipe — dicts as read from
YAML, or the dataclasses a library caller built — and stops at the first number out of its
range, naming the field by the dotted path an override would use::

    stages.0.steps must be >= 1 (or null), got -4

:data:`RANGES` holds one :class:`Bound` per numeric field of each recipe dataclass (a test keeps
it complete). Values of another type are left to the type checks that follow
(:func:`mmbridge.registry.config_from_dict`), and shapes it cannot walk to the preflight checks.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass
from typing import Any

from mmbridge.config import DistributedConfig, RunConfig
from mmbridge.data import DataConfig, SourceConfig
from mmbridge.train.recipe import StageConfig, TuneSpec


@dataclass(frozen=True)
class Bound:
    """An interval of allowed values: ``low``/``high`` (None: unbounded), each included unless marked open."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False

    def holds(self, value: float) -> bool:
        above = self.low is None or (value > self.low if self.low_open else value >= self.low)
        below = self.high is None or (value < self.high if self.high_open else value <= self.high)
        return above and below

    def text(self) -> str:
        """``>= 1``, ``> 0``, ``in [0, 1)``…"""
        if self.low is not None and self.high is not None:
            return f"in {'(' if self.low_open else '['}{self.low}, {self.high}{')' if self.high_open else ']'}"
        if self.low is not None:
            return f"{'>' if self.low_open else '>='} {self.low}"
        return f"{'<' if self.high_open else '<='} {self.high}"


AT_LEAST_0, AT_LEAST_1, POSITIVE = Bound(0), Bound(1), Bound(0, low_open=True)
FRACTION = Bound(0, 1)  # a share of something, both ends meaningful
PROBABILITY_BELOW_1 = Bound(0, 1, high_open=True)  # dropout: 1 would drop everything

RANGES: dict[type, dict[str, Bound]] = {
    RunConfig: {"seed": AT_LEAST_0},
    DistributedConfig: {},
    StageConfig: {"lr": POSITIVE, "weight_decay": AT_LEAST_0, "epochs": POSITIVE, "steps": AT_LEAST_1,
                  "batch_size": AT_LEAST_1, "grad_accum": AT_LEAST_1, "warmup_ratio": FRACTION,
                  "max_grad_norm": POSITIVE, "save_every": AT_LEAST_1, "log_every": AT_LEAST_1},
    TuneSpec: {"lr": POSITIVE, "layers": AT_LEAST_1, "r": AT_LEAST_1, "alpha": POSITIVE,
               "dropout": PROBABILITY_BELOW_1},
    DataConfig: {"max_length": AT_LEAST_1, "num_workers": AT_LEAST_0, "video_stride": AT_LEAST_1},
    SourceConfig: {"weight": AT_LEAST_0, "max_samples": AT_LEAST_1, "shuffle_buffer": AT_LEAST_1},
}


def check_ranges(run: RunConfig) -> None:
    """Raise ``ValueError`` naming the first numeric field of ``run`` that is out of its range (or not finite)."""
    _check_fields(RunConfig, run, "")
    _check_fields(DistributedConfig, run.distributed, "distributed")
    stages = run.stages if isinstance(run.stages, list) else []
    for index, stage in enumerate(stages):
        label = f"stages.{index}"
        _check_fields(StageConfig, stage, label)
        train = _fields(stage).get("train")
        for key, spec in (train.items() if isinstance(train, dict) else []):
            _check_fields(TuneSpec, spec, f"{label}.train.{key}")
        _check_data(_fields(stage).get("data"), f"{label}.data")
    _check_data(run.data, "data")


def numeric_fields(cls: type) -> set[str]:
    """The fields of dataclass ``cls`` whose type admits an int or a float (bool excluded)."""
    hints = typing.get_type_hints(cls)
    return {field.name for field in dataclasses.fields(cls) if {int, float} & _members(hints[field.name])}


def _members(hint: Any) -> set:
    """The types a (possibly union) annotation admits, one level deep."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return set(typing.get_args(hint))
    return {hint}


def _check_data(data: Any, label: str) -> None:
    """A ``data:`` section and each of its sources (the spec of a registered source type, such as
    ``miniworld: {task, split, n, seed}``, is checked by that type's own ``check``)."""
    _check_fields(DataConfig, data, label)
    sources = _fields(data).get("sources")
    for number, source in enumerate(sources if isinstance(sources, list) else []):
        _check_fields(SourceConfig, source, f"{label}.sources.{number}")


def _fields(node: Any) -> dict:
    """A recipe node's fields: a dict as it is, a dataclass's attributes, anything else none."""
    if isinstance(node, dict):
        return node
    if dataclasses.is_dataclass(node) and not isinstance(node, type):
        return {field.name: getattr(node, field.name) for field in dataclasses.fields(node)}
    return {}


def _check_fields(cls: type, node: Any, label: str) -> None:
    values = _fields(node)
    hints = typing.get_type_hints(cls)
    for name, bound in RANGES[cls].items():
        path = f"{label}.{name}" if label else name
        _check_value(values.get(name), bound, path, nullable=type(None) in _members(hints[name]))


def _check_value(value: Any, bound: Bound, path: str, nullable: bool) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return  # null, a word ('sqrt') or a wrong type: the type checks speak to those
    if not math.isfinite(value):
        raise ValueError(f"{path} must be a finite number, got {value!r}")
    if not bound.holds(value):
        raise ValueError(f"{path} must be {bound.text()}{' (or null)' if nullable else ''}, got {value!r}")
