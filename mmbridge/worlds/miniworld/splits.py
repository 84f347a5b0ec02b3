"""Splits and the seeded random stream of each sample.

Every sample draws from its own generator seeded by ``(seed, split, task, index)``, so
samples are random-access and deterministic, and the streams of different splits (and
tasks) never coincide. :class:`World` wraps that generator with the split's rules:
train/val/test scenes use only :data:`SEEN_PAIRS`; in the compositional split the
questioned object always uses one of :data:`HELD_OUT_PAIRS`.
"""

from __future__ import annotations

import zlib
from typing import Sequence, TypeVar

import numpy as np

from mmbridge.boxes import check_box_format
from mmbridge.worlds.miniworld.vocabulary import HELD_OUT_PAIRS, POPULARITY, SEEN_PAIRS, SIZES, Pair

SPLITS: tuple[str, ...] = ("train", "val", "test", "compositional")
T = TypeVar("T")


def check_split(split: str) -> None:
    """Raise ``ValueError`` naming the valid splits when ``split`` is not one of them."""
    if split not in SPLITS:
        raise ValueError(f"unknown MiniWorld split {split!r}; known: {', '.join(SPLITS)}")


def sample_generator(task: str, split: str, index: int, seed: int = 0) -> np.random.Generator:
    """The generator of one sample, a pure function of ``(task, split, index, seed)``."""
    check_split(split)
    if index < 0 or seed < 0:
        raise ValueError(f"index and seed must be >= 0, got index={index}, seed={seed}")
    return np.random.default_rng([int(seed), SPLITS.index(split), zlib.crc32(task.encode()), int(index)])


class World:
    """The random choices of one sample, constrained by its split; ``index`` is the sample's position.

    ``box_format`` (``plain`` or ``qwen``, :mod:`mmbridge.boxes`) is how questions write boxes; it draws
    nothing, so a sample is the same scene and question in either format."""

    def __init__(self, rng: np.random.Generator, split: str, index: int = 0, box_format: str = "plain") -> None:
        check_split(split)
        self.rng = rng
        self.split = split
        self.index = index
        self.box_format = check_box_format(box_format, "MiniWorld box_format")

    @property
    def compositional(self) -> bool:
        return self.split == "compositional"

    @property
    def focus_pairs(self) -> tuple[Pair, ...]:
        """Pairs a questioned object may use: held-out pairs in the compositional split, seen pairs otherwise."""
        return HELD_OUT_PAIRS if self.compositional else SEEN_PAIRS

    def choice(self, items: Sequence[T]) -> T:
        """One item, uniformly."""
        return items[int(self.rng.integers(len(items)))]

    def sample(self, items: Sequence[T], count: int) -> list[T]:
        """``count`` distinct items in random order."""
        positions = self.rng.choice(len(items), size=count, replace=False)
        return [items[int(position)] for position in positions]

    def shuffled(self, items: Sequence[T]) -> list[T]:
        """A random permutation of ``items``."""
        return self.sample(items, len(items))

    def integer(self, low: int, high: int) -> int:
        """An integer in ``[low, high]`` (both included)."""
        return int(self.rng.integers(low, high + 1))

    def uniform(self, low: float, high: float) -> float:
        return float(self.rng.uniform(low, high))

    def chance(self, probability: float) -> bool:
        return bool(self.rng.random() < probability)

    def pair(self, pool: Sequence[Pair] | None = None, exclude: Sequence[Pair] = ()) -> Pair:
        """A (colour, shape) pair from ``pool`` (default: seen pairs), weighted by popularity."""
        candidates = [pair for pair in (pool if pool is not None else SEEN_PAIRS) if pair not in exclude]
        if not candidates:
            raise ValueError("no (colour, shape) pair is left to draw from")
        weights = np.array([POPULARITY[pair] for pair in candidates])
        return candidates[int(self.rng.choice(len(candidates), p=weights / weights.sum()))]

    def focus_pair(self, exclude: Sequence[Pair] = ()) -> Pair:
        """The pair of a questioned object: held out (uniformly drawn) in the compositional split, else seen."""
        if not self.compositional:
            return self.pair(SEEN_PAIRS, exclude)
        return self.choice([pair for pair in HELD_OUT_PAIRS if pair not in exclude])

    def sizes(self, count: int) -> list[str]:
        """Sizes for ``count`` objects on a small canvas: at most two large among four, one among five or six."""
        limit = {1: 1, 2: 2, 3: 2, 4: 2}.get(count, 1)
        sizes = [self.choice(SIZES) for _ in range(count)]
        large_positions = [position for position, size in enumerate(sizes) if size == "large"]
        for position in large_positions[limit:]:
            sizes[position] = "small"
        return sizes
