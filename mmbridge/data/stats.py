"""``mmbridge data stats RECIPE``: what each stage's mixture draws from each source per epoch.

For every stage (its own ``data`` or the recipe's default: :func:`mmbridge.train.recipe.recipe_stats` picks it)
and every source: its kind, its size, its weight and cap, the draws per epoch
(:func:`~mmbridge.data.mixture.draw_counts`, the numbers :meth:`~mmbridge.data.mixture.MixtureDataset.epoch_indices`
uses) and their share of the epoch. Sources are read as the dataset reads them — JSON parsed, a source type's
samples made (MiniWorld's records generated), webdataset shards scanned — but no image is opened, rendered or
decoded. A source used by several stages is read once.
"""

from __future__ import annotations

from dataclasses import dataclass

from mmbridge.data.mixture import (SQRT, DataConfig, SourceConfig, _source_names, draw_counts,
                                   load_source_shards)
from mmbridge.registry import config_from_dict


@dataclass
class SourceStats:
    """One source of one stage: ``draws`` of its ``size`` samples per epoch (``skipped``: dropped when read)."""

    name: str
    kind: str
    size: int
    weight: float | str
    max_samples: int | None
    draws: int
    skipped: int = 0


def source_kind(source: SourceConfig) -> str:
    """The source type (``miniworld``…), ``webdataset`` or the file's ``format`` (``auto`` for a file left to its
    first record)."""
    if source.type is not None:
        return source.type
    if source.webdataset is not None:
        return f"webdataset ({len(_shards(source))} shards)"
    return source.format


def mixture_stats(config: DataConfig, cache: dict | None = None) -> list[SourceStats]:
    """Per source of ``config``: size, weight, cap and draws per epoch. ``cache`` (source key → (size,
    skipped)) lets several stages share one read of a source."""
    cache = {} if cache is None else cache
    sizes, skips = [], []
    for source, name in zip(config.sources, _source_names(config.sources)):
        key = (repr(source.path), source.type, repr(source.spec), repr(source.webdataset), source.format,
               source.image_root, config.skip_bad_samples)
        if key not in cache:
            loaded = load_source_shards(source, name, skip_bad_samples=config.skip_bad_samples)
            cache[key] = (sum(len(shard) for shard in loaded.shards), len(loaded.skipped))
        sizes.append(cache[key][0])
        skips.append(cache[key][1])
    draws = draw_counts(config.sources, sizes)
    return [SourceStats(name, source_kind(source), size, source.weight, source.max_samples, count, skipped)
            for source, name, size, count, skipped in zip(config.sources, _source_names(config.sources), sizes,
                                                          draws, skips)]


def stats_table(rows: list[SourceStats]) -> str:
    """The rows as an aligned table with each source's share of the epoch's draws."""
    total = sum(row.draws for row in rows)
    header = ("source", "kind", "size", "weight", "cap", "draws", "share")
    lines = [header] + [(row.name, row.kind, f"{row.size:,}", _weight(row.weight), _count(row.max_samples),
                         f"{row.draws:,}", f"{100 * row.draws / total:.1f}%" if total else "-") for row in rows]
    widths = [max(len(line[column]) for line in lines) for column in range(len(header))]
    text = ["  ".join(cell.ljust(width) if column < 2 else cell.rjust(width)
                      for column, (cell, width) in enumerate(zip(line, widths))).rstrip() for line in lines]
    skipped = [f"{row.name}: {row.skipped}" for row in rows if row.skipped]
    if skipped:
        text.append("dropped while reading (skip_bad_samples): " + ", ".join(skipped))
    return "\n".join(text)


def stages_stats(stages: list[tuple[str, dict | DataConfig]]) -> str:
    """Every stage's table, headed by its label and epoch length; ``stages`` pairs each label with the stage's
    data (a mapping as a recipe writes it, or a :class:`DataConfig`). A source used by several stages is read
    once."""
    cache: dict = {}
    blocks = []
    for label, spec in stages:
        config = spec if isinstance(spec, DataConfig) else config_from_dict(DataConfig, dict(spec),
                                                                             where=f"{label} data")
        rows = mixture_stats(config, cache)
        blocks.append(f"{label}: {sum(row.draws for row in rows):,} samples per epoch from {len(rows)} source(s)\n"
                      + stats_table(rows))
    return "\n\n".join(blocks)


def _shards(source: SourceConfig) -> list[str]:
    from mmbridge.data.formats.webdataset import expand_shards

    return expand_shards(source.webdataset)


def _weight(weight: float | str) -> str:
    return SQRT if weight == SQRT else f"{weight:g}"


def _count(value: int | None) -> str:
    return "-" if value is None else f"{value:,}"
