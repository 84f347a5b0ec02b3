"""Text reading: words and numbers rendered in several fonts, colours and sizes, some of them small.

``text_reading`` draws on the default 224-px canvas; ``small_text`` asks the same questions
on an 896- or 1024-px canvas with text at most 2.8% of the side tall, so that at a 224-px
encoder input it shrinks to 2–6 px: the reading counterpart of ``small_objects`` for
comparing high-resolution strategies (AnyRes, UHD slices, Monkey windows, Fuyu patches).
"""

from __future__ import annotations

from mmbridge.worlds.miniworld.fonts import random_text_font
from mmbridge.worlds.miniworld.questions import Question
from mmbridge.worlds.miniworld.scene import (CANVAS, STANDARD_SCALE, TINY_SCALE, Scene, SizeScale, TextItem, TextSpec,
                                             filler_pairs, layout_scene, object_specs, random_string)
from mmbridge.worlds.miniworld.splits import World
from mmbridge.worlds.miniworld.task import Episode, Task
from mmbridge.worlds.miniworld.tasks.small_objects import LARGE_CANVASES
from mmbridge.worlds.miniworld.vocabulary import READING_COLOURS

SMALL_SIZES = (9, 13)
LARGE_SIZES = (16, 36)
SMALL_CHANCE = 0.35
SMALL_TEXT_MIN = 14  # pixels: small_text's smallest font size (the bitmap face keeps its fixed 11 px)
SMALL_TEXT_FRACTION = 0.028  # small_text's largest font size, as a fraction of the side (25 px at 896, 28 at 1024)


def reading_texts(world: World, count: int, sizes: tuple[int, int] | None = None) -> list[TextSpec]:
    """``count`` different strings in different colours, each in a random font and size.

    Sizes are drawn from ``sizes`` (pixels, both ends included) when given, else from
    :data:`SMALL_SIZES` with chance :data:`SMALL_CHANCE` and :data:`LARGE_SIZES` otherwise.
    """
    colours = world.sample(list(READING_COLOURS), count)
    strings: dict[str, str] = {}
    while len(strings) < count:
        text, kind = random_string(world)
        strings.setdefault(text, kind)
    specs = []
    for (text, kind), colour in zip(strings.items(), colours):
        size_range = sizes or (SMALL_SIZES if world.chance(SMALL_CHANCE) else LARGE_SIZES)
        font, size = random_text_font(world, world.integer(*size_range))
        specs.append(TextSpec(text, kind, font, size, colour, READING_COLOURS[colour]))
    return specs


def reading_episode(world: World, side: int = CANVAS, sizes: tuple[int, int] | None = None,
                    scale: SizeScale = STANDARD_SCALE) -> Episode | None:
    """1–3 texts (font sizes from ``sizes``, see :func:`reading_texts`) and 0–2 objects (``scale``) on a
    ``side``-pixel square; read the only text, the text in a colour, the top text, or all top to bottom."""
    count = world.integer(1, 3)
    objects = object_specs(world, filler_pairs(world, world.integer(0, 2)))
    scene = layout_scene(world, objects, reading_texts(world, count, sizes), width=side, height=side, scale=scale)
    question = _question(world, scene, world.choice(("single", "colour", "top", "all")) if count > 1 else "single")
    return Episode([scene], [question]) if question else None


def build_text_reading(world: World) -> Episode | None:
    """The reading questions on the default canvas, with mostly large and some small text."""
    return reading_episode(world)


def small_text_sizes(side: int) -> tuple[int, int]:
    """small_text's font sizes on a ``side``-pixel canvas: :data:`SMALL_TEXT_MIN` to :data:`SMALL_TEXT_FRACTION`
    of the side."""
    return SMALL_TEXT_MIN, int(SMALL_TEXT_FRACTION * side)


def build_small_text(world: World) -> Episode | None:
    """The reading questions on an 896- or 1024-px canvas with small text and tiny filler objects."""
    side = world.choice(LARGE_CANVASES)
    return reading_episode(world, side, small_text_sizes(side), TINY_SCALE)


def _question(world: World, scene: Scene, kind: str) -> Question | None:
    """The question of ``kind`` about the scene's texts, or ``None`` when their layout makes it ambiguous."""
    texts = scene.texts
    if kind == "single":
        item = texts[0] if len(texts) == 1 else None
        noun = "number" if item and item.spec.kind == "number" else "word"
        return Question(f"What {noun} is written in the image?", "short", item.text, [item.text]) if item else None
    if kind == "colour":
        item = world.choice(texts)
        return Question(f"What is written in {item.spec.colour}?", "short", item.text, [item.text])
    rows = sorted(texts, key=lambda item: item.box[1])
    if not _separate_rows(rows):
        return None
    if kind == "top":
        return Question("What is written at the top of the image?", "short", rows[0].text, [rows[0].text])
    joined = " ".join(item.text for item in rows)
    return Question("Read all the text in the image from top to bottom.", "short", joined, [joined])


def _separate_rows(rows: list[TextItem]) -> bool:
    """Whether every text ends above the next one starts (so "top to bottom" has one reading)."""
    return all(upper.box[3] < lower.box[1] for upper, lower in zip(rows, rows[1:]))


TASKS = [Task("text_reading", "read rendered words and numbers (several fonts and sizes, some small)",
              build_text_reading, compositional=False),
         Task("small_text", "read small words and numbers (<= 3% of the side tall) on 896-1024 px canvases",
              build_small_text, compositional=False)]
