"""Multiple choice with lettered options (A-OKVQA / MMBench style): the answer is the option's letter."""

from __future__ import annotations

from mmbridge.worlds.miniworld.questions import (Question, as_multiple_choice, colour_question, count_question,
                                                 shape_question, size_question)
from mmbridge.worlds.miniworld.scene import Scene
from mmbridge.worlds.miniworld.splits import World
from mmbridge.worlds.miniworld.task import Episode, Task
from mmbridge.worlds.miniworld.tasks.common import focus_scene
from mmbridge.worlds.miniworld.vocabulary import COLOURS, SHAPES, SIZES

KINDS = ("colour", "shape", "size", "count", "present")
COUNT_OPTIONS = [str(count) for count in range(8)]


def build_multiple_choice(world: World) -> Episode | None:
    """A colour, shape, size, count or "which object is in the image" question with 2–4 options."""
    scene = focus_scene(world, 1, 4)
    focus = scene.objects[0]
    kind = world.choice(KINDS)
    if kind == "colour":
        question = _converted(world, colour_question(world, scene, focus), list(COLOURS), 4)
    elif kind == "shape":
        question = _converted(world, shape_question(world, scene, focus), list(SHAPES), 4)
    elif kind == "size":
        question = _converted(world, size_question(world, scene, focus), list(SIZES), 2)
    elif kind == "count":
        attributes = ("colour", "shape") if world.compositional else world.choice((("colour",), ("shape",), ()))
        question = _converted(world, count_question(world, scene, focus, attributes), COUNT_OPTIONS, 4)
    else:
        question = _present_question(world, scene)
    return Episode([scene], [question]) if question else None


def _converted(world: World, question: Question | None, pool: list[str], count: int) -> Question | None:
    return as_multiple_choice(world, question, pool, count) if question else None


def _present_question(world: World, scene: Scene) -> Question | None:
    """"Which of these objects is in the image?": the focus among absent askable pairs."""
    focus = scene.objects[0]
    present = {item.pair for item in scene.objects}
    absent = [f"{colour} {shape}" for colour, shape in world.focus_pairs if (colour, shape) not in present]
    gold = f"{focus.colour} {focus.shape}"
    question = Question("Which of these objects is in the image?", "short", gold, [gold])
    return as_multiple_choice(world, question, absent, 4)


TASKS = [Task("multiple_choice", "lettered-option questions about colour, shape, size, count and presence",
              build_multiple_choice)]
