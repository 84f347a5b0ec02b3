"""The fixed vocabulary of MiniWorld: colours, shapes, sizes, words, held-out pairs and pair popularity.

Everything a scene can contain and every word an answer can use is listed here, so
answers stay short and consistent ("red", "circle", "small", "3").
"""

from __future__ import annotations

import numpy as np

RGB = tuple[int, int, int]
Pair = tuple[str, str]  # (colour, shape)

# saturated object colours, at least 80 apart (Euclidean RGB) from each other and from every background
COLOURS: dict[str, RGB] = {
    "red": (220, 30, 30),
    "orange": (245, 130, 20),
    "yellow": (240, 210, 20),
    "green": (40, 160, 50),
    "cyan": (20, 190, 210),
    "blue": (30, 70, 220),
    "purple": (130, 50, 180),
    "pink": (240, 110, 180),
    "brown": (130, 80, 30),
}
COLOUR_JITTER = 10  # each channel of a drawn object varies by at most this much around its palette colour
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "diamond", "hexagon", "star", "cross")
SHAPE_PLURALS: dict[str, str] = {shape: shape + ("es" if shape.endswith("s") else "s") for shape in SHAPES}
SIZES: tuple[str, ...] = ("small", "large")
SIZE_SYNONYMS: dict[str, list[str]] = {"small": ["small", "little"], "large": ["large", "big"]}
PAIRS: tuple[Pair, ...] = tuple((colour, shape) for colour in COLOURS for shape in SHAPES)

# colour–shape pairs that never occur in train/val/test scenes; the compositional split asks about them.
# Every colour and every shape is held out at least once.
HELD_OUT_PAIRS: tuple[Pair, ...] = (
    ("red", "triangle"), ("orange", "hexagon"), ("yellow", "cross"), ("green", "star"), ("cyan", "square"),
    ("blue", "diamond"), ("purple", "circle"), ("pink", "triangle"), ("brown", "star"),
)
SEEN_PAIRS: tuple[Pair, ...] = tuple(pair for pair in PAIRS if pair not in HELD_OUT_PAIRS)

# light backgrounds (all channels >= 215), far from every object colour
BACKGROUNDS: dict[str, RGB] = {
    "white": (250, 250, 250), "light gray": (228, 228, 228), "beige": (240, 232, 215),
    "light blue": (222, 234, 248), "light green": (226, 244, 226), "cream": (250, 246, 228),
    "lavender": (236, 230, 248),
}
# dark text colours for distractor text: far from every object colour, so pixels stay countable
DARK_TEXT_COLOURS: dict[str, RGB] = {"black": (15, 15, 15), "dark gray": (75, 75, 75), "navy": (20, 30, 95)}
# distinct text colours for the reading task (questions may name them)
READING_COLOURS: dict[str, RGB] = {"black": (15, 15, 15), "red": (200, 20, 20), "blue": (25, 60, 200),
                                   "green": (20, 130, 40), "purple": (120, 40, 170), "orange": (225, 110, 10)}

WORDS: tuple[str, ...] = (
    "apple", "river", "stone", "cloud", "house", "train", "light", "green", "music", "paper", "water", "happy",
    "tiger", "bread", "chair", "plant", "smile", "ocean", "clock", "sugar", "north", "south", "party", "lemon",
    "robot", "pizza", "queen", "zebra", "honey", "magic", "star", "moon", "book", "tree", "fish", "bird", "cake",
    "door", "rain", "snow", "wind", "fire", "gold", "road", "ship", "park", "milk", "lamp", "open", "stop", "exit",
    "sale", "cat", "dog", "sun", "map", "box", "cup", "pen", "key",
)
CHART_LABELS: tuple[str, ...] = ("cats", "dogs", "cars", "fish", "birds", "books", "trees", "boats", "cups",
                                 "hats", "pens", "keys", "bikes", "eggs", "shoes", "maps")
NUMBER_WORDS: tuple[str, ...] = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine",
                                 "ten", "eleven", "twelve", "thirteen", "fourteen", "fifteen", "sixteen")
ORDINALS: tuple[str, ...] = ("zeroth", "first", "second", "third", "fourth", "fifth", "sixth")


def _popularity() -> dict[Pair, float]:
    """A fixed long-tailed frequency per pair (some pairs are common, as objects are in COCO)."""
    order = np.random.default_rng(20240607).permutation(len(PAIRS))
    return {PAIRS[int(position)]: 1.0 / (1.0 + rank / 8.0) for rank, position in enumerate(order)}


POPULARITY: dict[Pair, float] = _popularity()
