"""Source types: data sources read by code that registers itself here, and what a source's reading gives.

A recipe's data source is a file (``path``), webdataset shards (``webdataset``) or a *source type*: a key
registered in :data:`SOURCE_TYPES` whose value is that type's spec, e.g. ``{miniworld: {task: caption,
split: train, n: 400}}`` (:mod:`mmbridge.worlds.miniworld` registers ``miniworld`` when ``mmbridge`` is
imported). A package adds its own type the same way, and data never imports it::

    SOURCE_TYPES.add("lines", SourceType(load=lambda spec, name: [...]))  # then {lines: {...}} in a recipe

:class:`LoadedSource` is what reading any source gives the mixture: its samples, one list per shard.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

from mmbridge.data.formats.llava import Sample
from mmbridge.registry import Table


@dataclass
class LoadedSource:
    """A source's samples, one list per shard (a single list for a file or a source type), and the
    ``(id, reason)`` of samples dropped while reading it (a webdataset scan with ``skip_bad_samples``)."""

    shards: list[list[Sample]]
    skipped: list[tuple[str, str]] = field(default_factory=list)

    @property
    def samples(self) -> list[Sample]:
        return [sample for shard in self.shards for sample in shard]


@dataclass(frozen=True)
class SourceType:
    """How data reads a source of one registered type from its spec (the value under the type's key).

    ``load(spec, name)``: the samples, each with ``source=name``; images are opened (or drawn) only when
    the processor asks, through a sample's ``image_loader``. ``check(spec)``: validates the spec without
    loading, a ``ValueError`` naming what is wrong (``mmbridge train`` checks a recipe before it builds the
    model); None checks nothing. ``stem(spec)``: the source's default name; None: the type's key.
    """

    load: Callable[[Any, str], list[Sample]]
    check: Callable[[Any], Any] | None = None
    stem: Callable[[Any], str] | None = None


SOURCE_TYPES: Table[SourceType] = Table("data source type")
