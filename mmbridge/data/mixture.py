"""Several LLaVA files in one run: weighted per-epoch sampling, bad-sample skipping, length grouping.

:class:`MixtureDataset` indexes every sample of every source once (``len`` is the
unweighted total); :meth:`MixtureDataset.epoch_indices` draws one epoch's sample
order from the source weights, and :func:`batch_indices` cuts it into batches,
LLaVA-style length-grouped if asked. Both are pure functions of ``(seed, epoch)``, so
a resumed run replays the same batches.
"""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass

import numpy as np
import torch

from mmbridge.boxes import check_box_format
from mmbridge.data.formats import Sample, is_document, load_interleaved, load_llava_json, read_records
from mmbridge.data.processor import TEMPLATES, Processor, SampleError
from mmbridge.registry import config_from_dict

SOURCE_FORMATS = ("auto", "llava", "interleaved")
LABELS = ("assistant", "all")
MEGABATCH_FACTOR = 50  # LLaVA's length grouping sorts windows of batch_size * 50 samples


@dataclass
class SourceConfig:
    """One data file; ``weight`` scales how many of its samples an epoch draws (1 = each once).

    ``format``: ``llava`` (conversations), ``interleaved`` (image–text documents, MMC4 fields
    accepted) or ``auto`` (the default: the first record decides). Instead of ``path``,
    ``miniworld: {task, split, n, seed}`` streams a MiniWorld task: its samples are generated in
    memory and their images drawn when loaded.
    """

    path: str | None = None
    image_root: str | None = None
    weight: float = 1.0
    name: str | None = None
    miniworld: dict | None = None
    format: str = "auto"

    def __post_init__(self) -> None:
        if self.format not in SOURCE_FORMATS:
            raise ValueError(f"source {self.path or self.stem}: format must be one of {SOURCE_FORMATS}, "
                             f"got {self.format!r}")
        if (self.path is None) == (self.miniworld is None):
            raise ValueError(f"a data source needs exactly one of 'path' (a LLaVA JSON file) or 'miniworld' "
                             f"({{task, split, n, seed}}); got path={self.path!r}, miniworld={self.miniworld!r}")
        if self.weight < 0:
            raise ValueError(f"source {self.path or self.stem}: weight must be >= 0, got {self.weight}")

    @property
    def stem(self) -> str:
        """The default name: the file stem, or ``miniworld-TASK-SPLIT``."""
        if self.miniworld is not None:
            return f"miniworld-{self.miniworld.get('task')}-{self.miniworld.get('split')}"
        return os.path.splitext(os.path.basename(self.path))[0]


@dataclass
class DataConfig:
    """The data of a run: sources (configs or dicts), length limit, skipping and batching options."""

    sources: list[SourceConfig | dict]
    max_length: int | None = None  # None: the processor's (recipe ``processor.max_length``, default 2048)
    skip_bad_samples: bool = False
    group_by_length: bool = True
    num_workers: int = 0
    feature_cache: str | None = None  # a directory: stages with a frozen encoder train from cached features
    prefix_lm: bool = False  # encoder-decoder LLMs: BLIP-2's prefix LM, part of each reply moves into the encoder
    template: str = "chat"  # "plain": LLaVA's pretraining format, image tokens + reply (no chat markup)
    labels: str = "assistant"  # "all": next-token loss on every text token (Flamingo's objective), not only replies
    video_stride: int = 1  # models that take video: keep every n-th frame of a video sample (then at most max_frames)
    box_format: str = "plain"  # grounding boxes in every turn rewritten to "plain" [x0, y0, x1, y1] or "qwen" <box>

    def __post_init__(self) -> None:
        if self.labels not in LABELS:
            raise ValueError(f"data labels must be one of {LABELS}, got {self.labels!r}")
        if self.template not in TEMPLATES:
            raise ValueError(f"data template must be one of {TEMPLATES}, got {self.template!r}")
        check_box_format(self.box_format, "data box_format")
        self.sources = [source if isinstance(source, SourceConfig)
                        else config_from_dict(SourceConfig, dict(source), where=f"data source #{number}")
                        for number, source in enumerate(self.sources)]


class MixtureDataset(torch.utils.data.Dataset):
    """All samples of all sources, processed on access.

    With ``skip_bad_samples``, a sample whose images cannot be loaded or that fails
    processing yields ``None`` and is counted in :attr:`skipped` (by reason) and
    :attr:`skipped_samples` (``(id, reason)``). With DataLoader workers these counts
    live in each worker process.
    """

    def __init__(self, config: DataConfig, processor: Processor) -> None:
        if not config.sources:
            raise ValueError("DataConfig.sources is empty: give at least one LLaVA JSON file")
        self.config = config
        self.processor = processor
        self.source_names = _source_names(config.sources)
        self.samples: list[Sample] = []
        self.source_ranges: list[range] = []
        for source, name in zip(config.sources, self.source_names):
            loaded = load_source(source, name)
            self.source_ranges.append(range(len(self.samples), len(self.samples) + len(loaded)))
            self.samples.extend(loaded)
        self.skipped: dict[str, int] = Counter()
        self.skipped_samples: list[tuple[str, str]] = []
        self._lengths: list[int] | None = None

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict | None:
        """The processed example with its ``source`` name, or ``None`` for a skipped bad sample."""
        sample = self.samples[index]
        try:
            example = self.processor(sample)
        except SampleError as error:
            if not self.config.skip_bad_samples:
                raise
            self.skipped[error.reason] += 1
            self.skipped_samples.append((sample.id, error.reason))
            return None
        example["source"] = sample.source
        return example

    def epoch_indices(self, epoch: int, seed: int) -> list[int]:
        """One epoch's shuffled sample indices: ``round(weight * size)`` draws from each source.

        Whole multiples of a source repeat all of it; the fractional part is a random
        subset without replacement. Deterministic in ``(seed, epoch)``.
        """
        generator = np.random.default_rng([seed, epoch])
        chosen = [_weighted_draw(indices, source.weight, generator)
                  for indices, source in zip(self.source_ranges, self.config.sources)]
        order = np.concatenate(chosen) if chosen else np.zeros(0, dtype=np.int64)
        return [int(index) for index in generator.permutation(order)]

    def source_counts(self, indices: list[int]) -> dict[str, int]:
        """How many of ``indices`` come from each source, by source name."""
        counts = Counter(self.samples[index].source for index in indices)
        return {name: counts.get(name, 0) for name in self.source_names}

    def lengths(self) -> list[int]:
        """Approximate token length of every sample (text tokens + image tokens), images not loaded; cached."""
        if self._lengths is None:
            self._lengths = self.processor.estimate_lengths(self.samples)
        return self._lengths


def batch_indices(dataset: MixtureDataset, epoch: int, seed: int, batch_size: int,
                  group_by_length: bool) -> list[list[int]]:
    """The batches of one epoch, deterministic in ``(seed, epoch)``.

    With ``group_by_length`` (LLaVA): the epoch order is split into megabatches of
    ``batch_size * 50``, each sorted by length (longest first) and cut into batches,
    and the batch order is shuffled.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    order = dataset.epoch_indices(epoch, seed)
    if not group_by_length:
        return _chunks(order, batch_size)
    lengths = dataset.lengths()
    batches = []
    for megabatch in _chunks(order, batch_size * MEGABATCH_FACTOR):
        by_length = sorted(megabatch, key=lambda index: lengths[index], reverse=True)
        batches.extend(_chunks(by_length, batch_size))
    generator = np.random.default_rng([seed, epoch])
    return [batches[position] for position in generator.permutation(len(batches))]


def load_source(source: SourceConfig, name: str) -> list[Sample]:
    """A source's samples: read from its LLaVA file, or generated from its MiniWorld spec."""
    if source.miniworld is not None:
        from mmbridge.worlds.miniworld.stream import load_samples  # imported here: the world imports this package

        return load_samples(source.miniworld, source=name)
    records = read_records(source.path)  # read once, whichever format parses them
    interleaved = source.format == "interleaved" or (source.format == "auto" and bool(records)
                                                     and is_document(records[0]))
    loader = load_interleaved if interleaved else load_llava_json
    return loader(source.path, source.image_root, source=name, records=records)


def _chunks(items: list[int], size: int) -> list[list[int]]:
    """Consecutive slices of ``size`` (the last may be shorter)."""
    return [items[start:start + size] for start in range(0, len(items), size)]


def _weighted_draw(indices: range, weight: float, generator: np.random.Generator) -> np.ndarray:
    """``round(weight * len(indices))`` indices: whole repeats, then a random subset for the remainder."""
    size = len(indices)
    if size == 0:
        return np.zeros(0, dtype=np.int64)
    count = int(round(weight * size))
    repeats, remainder = divmod(count, size)
    pool = np.arange(indices.start, indices.stop, dtype=np.int64)
    subset = np.sort(generator.choice(pool, size=remainder, replace=False))
    return np.concatenate([np.tile(pool, repeats), subset])


def _source_names(sources: list[SourceConfig]) -> list[str]:
    """Each source's name: the given one, or the file stem (made unique with ``-2``, ``-3``…)."""
    names: list[str] = []
    for source in sources:
        if source.name is not None:
            if source.name in names:
                raise ValueError(f"two data sources are named {source.name!r}; names must be unique")
            names.append(source.name)
            continue
        stem = source.stem
        name, suffix = stem, 2
        while name in names or any(other.name == name for other in sources):
            name, suffix = f"{stem}-{suffix}", suffix + 1
        names.append(name)
    return names
