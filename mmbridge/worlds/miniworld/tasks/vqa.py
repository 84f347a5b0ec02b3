"""Visual question answering on one scene: attributes, counting and spatial relations (short answers)."""

from __future__ import annotations

from mmbridge.worlds.miniworld.questions import (ATTRIBUTE_QUESTIONS, count_question, extreme_question,
                                                 nearest_question, relation_question)
from mmbridge.worlds.miniworld.scene import ObjectSpec, distractor_text, layout_scene, object_specs
from mmbridge.worlds.miniworld.splits import World
from mmbridge.worlds.miniworld.task import Episode, Task
from mmbridge.worlds.miniworld.tasks.common import focus_scene
from mmbridge.worlds.miniworld.vocabulary import SEEN_PAIRS

COUNT_CATEGORIES = (("colour",), ("shape",), ("colour", "shape"), ())
MAX_OBJECTS = 6


def build_attribute(world: World) -> Episode | None:
    """The colour, shape or size of the focus object among 1–3 objects."""
    scene = focus_scene(world, 1, 3)
    question = ATTRIBUTE_QUESTIONS[world.choice(list(ATTRIBUTE_QUESTIONS))](world, scene, scene.objects[0])
    return Episode([scene], [question]) if question else None


def build_counting(world: World) -> Episode:
    """How many objects of a colour, a shape, a colour–shape pair (the held-out pair when compositional) or at all."""
    attributes = ("colour", "shape") if world.compositional else world.choice(COUNT_CATEGORIES)
    colour, shape = world.focus_pair()
    exemplar = ObjectSpec(colour, shape, "small")
    if not attributes:
        pairs = [world.pair() for _ in range(world.integer(1, MAX_OBJECTS))]
    else:
        pairs = _counting_pairs(world, exemplar, attributes)
    texts = [distractor_text(world)] if world.chance(0.15) else []
    scene = layout_scene(world, object_specs(world, pairs), texts)
    return Episode([scene], [count_question(world, scene, exemplar, attributes)])


def _counting_pairs(world: World, exemplar: ObjectSpec, attributes: tuple[str, ...]) -> list[tuple[str, str]]:
    """0–5 pairs matching ``exemplar`` on ``attributes`` (never 0 objects in all), then non-matching ones."""
    matching_pool = [exemplar.pair] if len(attributes) == 2 else \
        [pair for pair in SEEN_PAIRS if _same(pair, exemplar, attributes)]
    other_pool = [pair for pair in SEEN_PAIRS if not _same(pair, exemplar, attributes)]
    matching = 0 if world.chance(0.06) else world.integer(1, 5)
    others = world.integer(1 if matching == 0 else 0, MAX_OBJECTS - matching)
    pairs = [world.pair(matching_pool) for _ in range(matching)] + [world.pair(other_pool) for _ in range(others)]
    return world.shuffled(pairs)


def _same(pair: tuple[str, str], exemplar: ObjectSpec, attributes: tuple[str, ...]) -> bool:
    colour, shape = pair
    return all({"colour": colour, "shape": shape}[name] == getattr(exemplar, name) for name in attributes)


def build_spatial(world: World) -> Episode | None:
    """Left/right/above/below (yes/no), the nearest object to the focus, or which object is furthest in a direction."""
    kind = world.choice(("relation", "relation", "nearest", "extreme"))
    scene = focus_scene(world, 3 if kind == "nearest" else 2, 4, text_chance=0.1)
    focus = scene.objects[0]
    if kind == "relation":
        question = relation_question(world, scene, focus)
    elif kind == "nearest":
        question = nearest_question(world, scene, focus)
    else:
        question = extreme_question(world, scene, focus)
    return Episode([scene], [question]) if question else None


TASKS = [
    Task("attribute", "colour, shape or size of one object", build_attribute),
    Task("counting", "how many objects of a colour, shape or kind", build_counting),
    Task("spatial", "left/right/above/below, nearest and furthest objects", build_spatial),
]
