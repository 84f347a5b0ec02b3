"""Small objects in large images: a canvas of 896 px or more with objects at most 3% of its side.

At a 224-px encoder input these objects shrink to a few pixels, so this is the task
that needs high-resolution strategies (AnyRes, UHD slices, Monkey windows).
"""

from __future__ import annotations

from mmbridge.worlds.miniworld.questions import colour_question, count_question, existence_question, shape_question
from mmbridge.worlds.miniworld.scene import TINY_SCALE
from mmbridge.worlds.miniworld.splits import World
from mmbridge.worlds.miniworld.task import Episode, Task
from mmbridge.worlds.miniworld.tasks.common import focus_scene
from mmbridge.worlds.miniworld.tasks.existence import negative_pair

LARGE_CANVASES = (896, 1024)


def build_small_objects(world: World) -> Episode | None:
    """2–8 tiny objects; the colour or shape of the focus, a count, or whether a pair is present."""
    side = world.choice(LARGE_CANVASES)
    scene = focus_scene(world, 2, 8, text_chance=0.0, width=side, height=side, scale=TINY_SCALE)
    focus = scene.objects[0]
    kind = world.choice(("colour", "shape", "count", "exists"))
    if kind == "colour":
        question = colour_question(world, scene, focus)
    elif kind == "shape":
        question = shape_question(world, scene, focus)
    elif kind == "count":
        attributes = ("colour", "shape") if world.compositional else world.choice((("colour",), ("shape",), ()))
        question = count_question(world, scene, focus, attributes)
    else:
        present = {item.pair for item in scene.objects}
        pair = focus.pair if world.chance(0.5) else negative_pair(world, present, "random")
        question = existence_question(scene, pair) if pair else None
    return Episode([scene], [question]) if question else None


TASKS = [Task("small_objects", "tiny objects (<= 3% of the side) on 896-1024 px canvases", build_small_objects)]
