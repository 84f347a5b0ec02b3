"""Caption tasks (the alignment data): short one-sentence captions and detailed descriptions."""

from __future__ import annotations

from mmbridge.worlds.miniworld.questions import caption_question
from mmbridge.worlds.miniworld.splits import World
from mmbridge.worlds.miniworld.task import Episode, Task
from mmbridge.worlds.miniworld.tasks.common import focus_scene


def build_caption(world: World) -> Episode:
    """1–4 objects; the answer is one of several short reference captions."""
    scene = focus_scene(world, 1, 4)
    return Episode([scene], [caption_question(world, scene, detailed=False)])


def build_detailed_caption(world: World) -> Episode:
    """1–5 objects; a description of every object's size, colour and position, the text and the background."""
    scene = focus_scene(world, 1, 5, text_chance=0.3)
    return Episode([scene], [caption_question(world, scene, detailed=True)])


TASKS = [
    Task("caption", "short captions of scenes (alignment pre-training)", build_caption),
    Task("caption_detailed", "detailed descriptions: every object's size, colour and position", build_detailed_caption),
]
