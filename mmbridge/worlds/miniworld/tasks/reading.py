"""Text reading: words and numbers rendered in several fonts, colours and sizes, some of them small."""

from __future__ import annotations

from mmbridge.worlds.miniworld.fonts import random_text_font
from mmbridge.worlds.miniworld.questions import Question
from mmbridge.worlds.miniworld.scene import (Scene, TextItem, TextSpec, filler_pairs, layout_scene, object_specs,
                                             random_string)
from mmbridge.worlds.miniworld.splits import World
from mmbridge.worlds.miniworld.task import Episode, Task
from mmbridge.worlds.miniworld.vocabulary import READING_COLOURS

SMALL_SIZES = (9, 13)
LARGE_SIZES = (16, 36)
SMALL_CHANCE = 0.35


def reading_texts(world: World, count: int) -> list[TextSpec]:
    """``count`` different strings in different colours, each in a random font and size."""
    colours = world.sample(list(READING_COLOURS), count)
    strings: dict[str, str] = {}
    while len(strings) < count:
        text, kind = random_string(world)
        strings.setdefault(text, kind)
    specs = []
    for (text, kind), colour in zip(strings.items(), colours):
        sizes = SMALL_SIZES if world.chance(SMALL_CHANCE) else LARGE_SIZES
        font, size = random_text_font(world, world.integer(*sizes))
        specs.append(TextSpec(text, kind, font, size, colour, READING_COLOURS[colour]))
    return specs


def build_text_reading(world: World) -> Episode | None:
    """1–3 texts and 0–2 objects; read the only text, the text in a colour, the top text, or all top to bottom."""
    count = world.integer(1, 3)
    objects = object_specs(world, filler_pairs(world, world.integer(0, 2)))
    scene = layout_scene(world, objects, reading_texts(world, count))
    question = _question(world, scene, world.choice(("single", "colour", "top", "all")) if count > 1 else "single")
    return Episode([scene], [question]) if question else None


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
              build_text_reading, compositional=False)]
