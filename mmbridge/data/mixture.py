"""Several sources in one run: weighted per-epoch sampling, bad-sample skipping, length grouping.

:class:`MixtureDataset` indexes every sample of every source once (``len`` is the
unweighted total); :meth:`MixtureDataset.epoch_indices` draws one epoch's sample
order from the source weights, and :func:`batch_indices` cuts it into batches,
LLaVA-style length-grouped if asked. Both are pure functions of ``(seed, epoch)``, so
a resumed run replays the same batches.

How many samples a source gives an epoch (:func:`draw_counts`):

* ``weight: w`` (a number) — ``round(w * size)`` draws: whole multiples repeat the source, the
  fractional part is a random subset without replacement, drawn afresh each epoch.
* ``weight: sqrt`` — InstructBLIP's square-root sampling (arXiv 2305.06500: a dataset is
  sampled with probability ∝ √size, so small sets are not drowned and large ones not over-fitted).
  The sqrt sources together keep their natural epoch length ``T = Σ size``; source ``d`` of size
  ``S_d`` draws ``round(T * √S_d / Σ √S)`` (the sum over the sqrt sources; rounding may move ``T`` by
  at most half a draw per source). Numeric-weight sources alongside are counted as above.
* ``max_samples: N`` — Yi-VL's per-source cap (arXiv 2403.04652: at most 50k samples from any one
  source): after the weight, a source draws ``min(draws, N)`` — a fresh random subset each epoch
  (without replacement while ``N <= size``).

The epoch order: each source orders its own draws — a random permutation, or with
``shuffle_buffer`` webdataset's streaming order (shards permuted, then a shuffle buffer, see
:func:`stream_order`) — and the sources are interleaved by a random permutation of the
epoch's slots (which slots belong to which source), keeping each source's own order. For
sources without a buffer this is exactly a uniform permutation of all draws.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections import Counter
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch

from mmbridge.boxes import check_box_format
from mmbridge.data.formats import Sample, is_document, load_interleaved, load_llava_json, read_records
from mmbridge.data.formats.webdataset import load_webdataset
from mmbridge.data.processor import TEMPLATES, Processor, SampleError
from mmbridge.data.sources import SOURCE_TYPES, LoadedSource
from mmbridge.registry import config_from_dict

SOURCE_FORMATS = ("auto", "llava", "sharegpt", "interleaved")  # sharegpt: text-only conversations, LLaVA's fields
SQRT = "sqrt"  # weight: InstructBLIP's square-root sampling
LABELS = ("assistant", "all")
MEGABATCH_FACTOR = 50  # LLaVA's length grouping sorts windows of batch_size * 50 samples


@dataclass
class SourceConfig:
    """One data source; ``weight`` scales how many of its samples an epoch draws (1 = each once).

    Exactly one of: ``path`` (a JSON/JSONL file), ``webdataset`` (tar shards: a path with brace ranges
    such as ``shards/{00000..00009}.tar``, or a list of paths; images read from the shard when loaded, see
    :mod:`mmbridge.data.formats.webdataset`) or a registered source type (:data:`~mmbridge.data.sources.
    SOURCE_TYPES`), written in a recipe as its key, e.g. ``miniworld: {task, split, n, seed}`` (a MiniWorld
    task generated in memory, images drawn when loaded); :meth:`from_dict` turns that key into ``type`` and
    ``spec``.
    ``format`` (files): ``llava`` (conversations), ``sharegpt`` (text-only conversations, the
    same ``from``/``value`` fields; read by the LLaVA loader), ``interleaved`` (image–text
    documents, MMC4 fields accepted) or ``auto`` (the default: the first record decides).
    ``weight``: a number >= 0 or ``"sqrt"``; ``max_samples``: at most this many draws per epoch;
    ``shuffle_buffer``: order the source's draws as a streaming reader would (see the module doc).
    """

    path: str | None = None
    image_root: str | None = None
    weight: float | Literal["sqrt"] = 1.0
    name: str | None = None
    webdataset: str | list[str] | None = None
    format: str = "auto"
    max_samples: int | None = None
    shuffle_buffer: int | None = None
    type: str | None = None  # a registered source type (SOURCE_TYPES), e.g. "miniworld"
    spec: Any = None  # that type's spec, e.g. {task, split, n, seed}

    def __post_init__(self) -> None:
        if self.format not in SOURCE_FORMATS:
            raise ValueError(f"source {self.path or self.stem}: format must be one of {SOURCE_FORMATS}, "
                             f"got {self.format!r}")
        given = [key for key in ("path", "webdataset") if getattr(self, key) is not None]
        given += [] if self.type is None else [self.type]
        if len(given) != 1:
            raise ValueError(_exactly_one(given, f"path={self.path!r}, webdataset={self.webdataset!r}, "
                                                 f"{self.type}={self.spec!r}"))
        if self.type is not None and self.type not in SOURCE_TYPES:
            raise ValueError(f"a data source has type {self.type!r}; known source types: "
                             f"{', '.join(SOURCE_TYPES.keys())}")
        if isinstance(self.weight, str) and self.weight != SQRT:
            raise ValueError(f"source {self.stem}: weight must be a number >= 0 or {SQRT!r}, got {self.weight!r}")
        if not isinstance(self.weight, str) and self.weight < 0:
            raise ValueError(f"source {self.stem}: weight must be >= 0, got {self.weight}")
        for key in ("max_samples", "shuffle_buffer"):
            value = getattr(self, key)
            if value is not None and value < 1:
                raise ValueError(f"source {self.stem}: {key} must be at least 1 (or absent), got {value}")

    @classmethod
    def from_dict(cls, data: dict, where: str = "") -> SourceConfig:
        """A source as a recipe writes it: the key of a registered source type (``{"miniworld": {...}}``)
        gives ``type`` and ``spec`` (a null value counts as absent); the other fields as
        :func:`~mmbridge.registry.config_from_dict` checks them."""
        label = where or "data source"
        if not isinstance(data, dict):
            raise ValueError(f"{label}: expected a mapping of fields, got {data!r}")
        typed = [key for key in data if key in SOURCE_TYPES and data[key] is not None]
        fields = {key: value for key, value in data.items() if key not in SOURCE_TYPES}
        names = [item.name for item in dataclasses.fields(cls)]
        unknown = sorted(set(fields) - set(names))
        if unknown:
            raise ValueError(f"{label}: unknown field(s) {unknown}; valid fields: {sorted(names)}, or the key of "
                             f"a source type: {', '.join(SOURCE_TYPES.keys())}")
        named_kinds = typed + (["type"] if typed and fields.get("type") is not None else [])
        if len(named_kinds) > 1:
            raise ValueError(_exactly_one(named_kinds, ", ".join(f"{key}={data[key]!r}" for key in named_kinds)))
        if typed:
            fields.update(type=typed[0], spec=data[typed[0]])
        return config_from_dict(cls, fields, where=where)

    @property
    def miniworld(self) -> Any:
        """The spec of a MiniWorld source (the type ``miniworld``), else None: how code read it when it was a
        field of its own."""
        return self.spec if self.type == "miniworld" else None

    @property
    def stem(self) -> str:
        """The default name: the file stem, the source type's (``miniworld-TASK-SPLIT``), or the first shard's
        stem without its number (``cc3m`` for ``cc3m-{00000..00009}.tar``)."""
        if self.type is not None:
            stem = SOURCE_TYPES.get(self.type).stem if self.type in SOURCE_TYPES else None
            return self.type if stem is None else stem(self.spec)
        if self.webdataset is not None:
            first = self.webdataset if isinstance(self.webdataset, str) else (self.webdataset or [""])[0]
            stem = os.path.basename(first).split("{")[0].split(".")[0].rstrip("-_0123456789")
            return stem or "webdataset"
        return os.path.splitext(os.path.basename(self.path))[0]


def _exactly_one(given: list[str], values: str) -> str:
    """The error of a source that names no kind or several: what it may name, what it named."""
    return (f"a data source needs exactly one of 'path' (a LLaVA JSON file), 'webdataset' (tar shards) or the key "
            f"of a source type ({', '.join(SOURCE_TYPES.keys()) or 'none registered'}, e.g. miniworld: "
            f"{{task, split, n, seed}}); got {', '.join(given) or 'none'}: {values}")


@dataclass
class DataConfig:
    """The data of a run: sources (configs or dicts), length limit, skipping and batching options."""

    sources: list[SourceConfig | dict]
    max_length: int | None = None  # None: the processor's (recipe ``processor.max_length``, default 2048)
    skip_bad_samples: bool = False
    group_by_length: bool = True
    num_workers: int = 0  # processes that load, process and collate micro-batches ahead (mmbridge.data.loader)
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
        if not isinstance(self.num_workers, int) or self.num_workers < 0:
            raise ValueError(f"data num_workers must be an integer >= 0 (0: load in the training process), "
                             f"got {self.num_workers!r}")
        self.sources = [source if isinstance(source, SourceConfig)
                        else SourceConfig.from_dict(dict(source), where=f"data source #{number}")
                        for number, source in enumerate(self.sources)]


class MixtureDataset(torch.utils.data.Dataset):
    """All samples of all sources, processed on access.

    With ``skip_bad_samples``, a sample whose images cannot be loaded or that fails
    processing yields ``None`` and is counted in :attr:`skipped` (by reason) and
    :attr:`skipped_samples` (``(id, reason)``). With loader workers
    (:mod:`mmbridge.data.loader`) each worker counts in its own copy, and the main process adds the
    records of every micro-batch it takes.
    """

    def __init__(self, config: DataConfig, processor: Processor) -> None:
        if not config.sources:
            raise ValueError("DataConfig.sources is empty: give at least one LLaVA JSON file")
        self.config = config
        self.processor = processor
        self.source_names = _source_names(config.sources)
        self.samples: list[Sample] = []
        self.source_ranges: list[range] = []
        self.source_shards: list[list[range]] = []  # per source, the index range of each shard (one for a file)
        self.skipped: dict[str, int] = Counter()
        self.skipped_samples: list[tuple[str, str]] = []
        for source, name in zip(config.sources, self.source_names):
            loaded = load_source_shards(source, name, skip_bad_samples=config.skip_bad_samples)
            start = len(self.samples)
            shards = []
            for part in loaded.shards:
                shards.append(range(len(self.samples), len(self.samples) + len(part)))
                self.samples.extend(part)
            self.source_ranges.append(range(start, len(self.samples)))
            self.source_shards.append(shards)
            for sample_id, reason in loaded.skipped:  # found while reading the source (webdataset scans)
                self.skipped[reason] += 1
                self.skipped_samples.append((sample_id, reason))
        self.draws = draw_counts(config.sources, [len(indices) for indices in self.source_ranges])
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
        """One epoch's sample indices: :attr:`draws` from each source (see the module doc), in order.

        Each source orders its own draws (a random permutation, or the streaming order of its
        ``shuffle_buffer``); a random permutation of the epoch's slots interleaves the sources.
        Deterministic in ``(seed, epoch)``.
        """
        orders = []
        sources = zip(self.config.sources, self.source_ranges, self.source_shards, self.draws)
        for number, (source, indices, shards, count) in enumerate(sources):
            generator = np.random.default_rng([seed, epoch, number])  # each source's order is its own
            if source.shuffle_buffer is not None:
                orders.append(stream_order(shards, count, source.shuffle_buffer, generator))
            else:
                orders.append(generator.permutation(_draw(indices, count, generator)))
        return interleave(orders, np.random.default_rng([seed, epoch]))

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


def load_source(source: SourceConfig, name: str, skip_bad_samples: bool = False) -> list[Sample]:
    """A source's samples: read from its file or shards, or as its source type reads its spec."""
    return load_source_shards(source, name, skip_bad_samples).samples


def load_source_shards(source: SourceConfig, name: str, skip_bad_samples: bool = False) -> LoadedSource:
    """A source's samples grouped by shard; no image is opened (webdataset shards are scanned, not decoded)."""
    if source.type is not None:
        return LoadedSource([SOURCE_TYPES.get(source.type).load(source.spec, name)])
    if source.webdataset is not None:
        return load_webdataset(source.webdataset, source=name, skip_bad_samples=skip_bad_samples)
    records = read_records(source.path)  # read once, whichever format parses them
    interleaved = source.format == "interleaved" or (source.format == "auto" and bool(records)
                                                     and is_document(records[0]))
    loader = load_interleaved if interleaved else load_llava_json
    return LoadedSource([loader(source.path, source.image_root, source=name, records=records)])


def draw_counts(sources: list[SourceConfig], sizes: list[int]) -> list[int]:
    """Draws per epoch of each source (of ``sizes`` samples): weight (a number, or ``sqrt`` over the sqrt
    sources' total), then the ``max_samples`` cap — the rules of the module doc."""
    rooted = [size for source, size in zip(sources, sizes) if source.weight == SQRT]
    total, roots = sum(rooted), sum(math.sqrt(size) for size in rooted)
    counts = []
    for source, size in zip(sources, sizes):
        if source.weight == SQRT:
            count = int(round(total * math.sqrt(size) / roots)) if roots else 0
        else:
            count = int(round(source.weight * size)) if size else 0
        counts.append(count if source.max_samples is None else min(count, source.max_samples))
    return counts


def interleave(orders: list[np.ndarray], generator: np.random.Generator) -> list[int]:
    """The sources' ordered draws merged by a random permutation of slots: slot ``k`` takes the next draw of
    the source the permutation assigns to it, so each source keeps its own order."""
    owners = generator.permutation(np.repeat(np.arange(len(orders)), [len(order) for order in orders]))
    merged = np.zeros(len(owners), dtype=np.int64)
    for number, order in enumerate(orders):
        merged[owners == number] = order
    return [int(index) for index in merged]


def stream_order(shards: list[range], count: int, buffer: int, generator: np.random.Generator) -> np.ndarray:
    """``count`` draws in the order a streaming reader gives them (webdataset's ``shuffle(buffer)``).

    Pass after pass over the source, each pass reads the shards in a fresh random order and each
    shard front to back; the stream goes through a shuffle buffer of ``buffer`` samples (once full,
    each new sample replaces a uniformly chosen one, which is emitted; at the end the rest leave in
    random order). The first ``count`` samples out are the draws. Reads stay near-sequential: at any
    time the buffer holds samples from the last ``buffer`` positions of the stream.
    """
    size = sum(len(shard) for shard in shards)
    if size == 0 or count == 0:
        return np.zeros(0, dtype=np.int64)
    passes = -(-count // size)
    stream = np.concatenate([np.concatenate([np.arange(shards[k].start, shards[k].stop, dtype=np.int64)
                                             for k in generator.permutation(len(shards))])
                             for _ in range(passes)])
    held = stream[:buffer].tolist()
    out: list[int] = []
    slots = generator.integers(0, len(held), size=max(len(stream) - len(held), 0)) if held else []
    for incoming, slot in zip(stream[len(held):].tolist(), np.asarray(slots).tolist()):
        if len(out) == count:
            break
        out.append(held[slot])
        held[slot] = incoming
    if len(out) < count:
        out.extend(held[position] for position in generator.permutation(len(held)))
    return np.asarray(out[:count], dtype=np.int64)


def _chunks(items: list[int], size: int) -> list[list[int]]:
    """Consecutive slices of ``size`` (the last may be shorter)."""
    return [items[start:start + size] for start in range(0, len(items), size)]


def _draw(indices: range, count: int, generator: np.random.Generator) -> np.ndarray:
    """``count`` of ``indices``: whole repeats, then a random subset without replacement for the remainder."""
    size = len(indices)
    if size == 0:
        return np.zeros(0, dtype=np.int64)
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
