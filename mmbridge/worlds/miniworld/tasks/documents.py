"""Interleaved documents: 2–4 scenes, each followed by a sentence about it (Flamingo/MMC4-style training data).

The record is an interleaved document (``texts``, ``images``: image ``i`` stands before text ``i``,
:mod:`mmbridge.data.formats.interleaved`) rather than a conversation; every text is one of the
scene's reference captions, so what follows an image can only be predicted by reading it.
"""

from __future__ import annotations

from mmbridge.worlds.miniworld.questions import caption_question
from mmbridge.worlds.miniworld.splits import World
from mmbridge.worlds.miniworld.task import Episode, Task
from mmbridge.worlds.miniworld.tasks.common import focus_scene


def build_document(world: World) -> Episode:
    """2–4 scenes of 1–4 objects, one caption each."""
    scenes = [focus_scene(world, 1, 4) for _ in range(world.integer(2, 4))]
    return Episode(scenes, [caption_question(world, scene, detailed=False) for scene in scenes], layout="document")


TASKS = [Task("interleaved_document", "2–4 scenes, each followed by a sentence about it (interleaved text)",
              build_document)]
