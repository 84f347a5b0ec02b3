"""Grounding: referring expression → box in 000–999 coordinates, and box → short description.

Boxes are written in the world's box format (:mod:`mmbridge.boxes`): plain ``[x0, y0, x1, y1]`` or Qwen-VL's
``<ref>phrase</ref><box>(x1,y1),(x2,y2)</box>``; the sample's ``box`` field is the canonical 000–999 box.
"""

from __future__ import annotations

from mmbridge.worlds.miniworld.questions import describe_region_question, grounding_question
from mmbridge.worlds.miniworld.splits import World
from mmbridge.worlds.miniworld.task import Episode, Task
from mmbridge.worlds.miniworld.tasks.common import focus_scene


def build_grounding(world: World) -> Episode | None:
    """"Give the bounding box of the small red circle." among 1–4 objects."""
    scene = focus_scene(world, 1, 4)
    question = grounding_question(world, scene, scene.objects[0])
    return Episode([scene], [question]) if question else None


def build_grounding_describe(world: World) -> Episode:
    """"What is the object in the region [x0, y0, x1, y1]?" → "large red circle"."""
    scene = focus_scene(world, 1, 4)
    return Episode([scene], [describe_region_question(world, scene, scene.objects[0])])


TASKS = [
    Task("grounding", "referring expression to bounding box (plain [x0, y0, x1, y1] in 000-999 or Qwen-VL <box>)",
         build_grounding),
    Task("grounding_describe", "bounding box to a short description of the object in it", build_grounding_describe),
]
